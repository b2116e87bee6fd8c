"""DVC stage `rank@r`: score every sample with the sequence-level preference and rank it within its input.

`rank.metric` is meteor (the paper's), rouge (ROUGE-L F1), chrf or bleu against the references, `file`: human
scores from `rank.scores_file` (columns id, text, score), or `reward_model`: the score of the sequence-classification
model at `rank.reward_model` for each sample after its prompt (`rank.reward_*`). With `rank.unfinished: last`, samples
that hit the token limit rank below every finished sample of their input (their score lowered). Writes
data/rounds/r/rankings.parquet (schema Rankings; rank 1 = best) and metrics/rounds/r/rank.json. The prompt task
scores each prompt by the frozen classifier's mean gap reward instead (`task`; the task's `score_samples`).
Run: python stages/rank.py --round r [--params params.yaml]
"""

import dataclasses

import pandas as pd

from ptg import config, pipeline, schemas, tasks, tracking
from ptg.guidance.ranking import rank_within_groups, unfinished_last
from ptg.io import read_table, write_json, write_table


def main(r: int, path: str = "params.yaml") -> None:
    params = config.load(path)
    rp, scoring = params.rank, tasks.scoring(params)
    ctx = pipeline.start(f"rank@{r}", params, with_torch=scoring.needs_torch_to_rank(params))
    samples = read_table(pipeline.round_dir(r) / "samples.parquet", schemas.Samples)
    scores, extra = scoring.score_samples(samples, ctx)
    if rp.unfinished == "last":
        scores = unfinished_last(pd.Series(scores, index=samples.index, dtype=float), samples["finished"])
    table = rank_within_groups(samples[["id", "sample_idx"]].assign(score=scores))
    out = pipeline.round_dir(r) / "rankings.parquet"
    write_table(table, out, schemas.Rankings)
    best = table[table["rank"] == 1]["score"]
    summary = {"metric": rp.metric, "mean_score": float(table["score"].mean()), "mean_best_score": float(best.mean()),
               **extra}
    write_json(pipeline.round_metrics(r, "rank"), summary)
    tracking.log_stage("rank", r, dataclasses.asdict(rp), pipeline.round_metrics(r, "rank"), artifacts=[out])


if __name__ == "__main__":
    pipeline.cli(main, __doc__)
