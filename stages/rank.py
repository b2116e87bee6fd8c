"""DVC stage `rank@r`: score every sample with the sequence-level preference and rank it within its input.

`rank.metric` is meteor (the paper's), rouge (ROUGE-L F1), chrf or bleu against the references, or `file`:
human scores from `rank.scores_file` (columns id, text, score). Writes data/rounds/r/rankings.parquet
(schema Rankings; rank 1 = best) and metrics/rounds/r/rank.json.
Run: python stages/rank.py --round r [--params params.yaml]
"""

import dataclasses
from pathlib import Path

from ptg import metrics, pipeline, schemas, tracking
from ptg.config import load_group
from ptg.io import read_table, write_json, write_table
from ptg.ranking import human_scores, rank_within_groups


def main(r: int, params: str = "params.yaml") -> None:
    pipeline.start(f"rank@{r}", params)
    rp = load_group("rank", params)
    samples = read_table(pipeline.round_dir(r) / "samples.parquet", schemas.Samples)
    if rp.metric == "file":
        scores = human_scores(samples, read_table(Path(rp.scores_file), schemas.HumanScores), rp.scores_file)
    else:
        refs = pipeline.read_examples("train", "validation").set_index("id")["references"]
        scores = metrics.score(rp.metric, samples["text"].tolist(), [list(refs[i]) for i in samples["id"]])
    table = rank_within_groups(samples[["id", "sample_idx"]].assign(score=scores))
    out = pipeline.round_dir(r) / "rankings.parquet"
    write_table(table, out, schemas.Rankings)
    best = table[table["rank"] == 1]["score"]
    summary = {"metric": rp.metric, "mean_score": float(table["score"].mean()), "mean_best_score": float(best.mean())}
    write_json(pipeline.round_metrics(r, "rank"), summary)
    tracking.log_stage("rank", r, dataclasses.asdict(rp), summary, artifacts=[out])


if __name__ == "__main__":
    pipeline.cli(main, __doc__)
