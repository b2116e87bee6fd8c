"""DVC stage `rank@r`: score every sample with the sequence-level preference and rank it within its input.

`rank.metric` is meteor (the paper's), rouge (ROUGE-L F1), chrf or bleu against the references, `file`: human
scores from `rank.scores_file` (columns id, text, score), or `reward_model`: the score of the sequence-classification
model at `rank.reward_model` for each sample after its prompt (`rank.reward_*`). With `rank.unfinished: last`, samples
that hit the token limit rank below every finished sample of their input (their score lowered). Writes
data/rounds/r/rankings.parquet (schema Rankings; rank 1 = best) and metrics/rounds/r/rank.json.
Run: python stages/rank.py --round r [--params params.yaml]
"""

import dataclasses
from pathlib import Path

import pandas as pd

from ptg import metrics, pipeline, schemas, tracking
from ptg.config import ParamsError, RankParams, load_group
from ptg.io import read_table, write_json, write_table
from ptg.ranking import human_scores, rank_within_groups, unfinished_last


def model_scores(rp: RankParams, samples: pd.DataFrame, ctx: pipeline.Context) -> list[float]:
    """metric reward_model: each sample's text scored by the reward model, after its prompt unless reward_input is
    response."""
    from ptg.reward_model import load_reward_model, reward_scores  # torch and transformers: only this metric

    try:
        model, tokenizer = load_reward_model(rp.reward_model, ctx.device)
    except (OSError, ValueError) as e:
        raise ParamsError(f"rank.reward_model: {e}") from e
    prompts = None
    if rp.reward_input == "prompt+response":
        by_id = pipeline.read_examples("train", "validation").set_index("id")["prompt"]
        prompts = [by_id[i] for i in samples["id"]]
    return reward_scores(model, tokenizer, prompts, samples["text"].tolist(), rp.reward_batch_size, rp.reward_label,
                         rp.reward_direction, ctx.device, ctx.dtype, ctx.progress)


def main(r: int, params: str = "params.yaml") -> None:
    rp = load_group("rank", params)
    ctx = pipeline.start(f"rank@{r}", params, with_torch=rp.metric == "reward_model")
    samples = read_table(pipeline.round_dir(r) / "samples.parquet", schemas.Samples)
    if rp.metric == "file":
        scores = human_scores(samples, read_table(Path(rp.scores_file), schemas.HumanScores), rp.scores_file)
    elif rp.metric == "reward_model":
        scores = model_scores(rp, samples, ctx)
    else:
        refs = pipeline.read_examples("train", "validation").set_index("id")["references"]
        scores = metrics.score(rp.metric, samples["text"].tolist(), [list(refs[i]) for i in samples["id"]])
    if rp.unfinished == "last":
        scores = unfinished_last(pd.Series(scores, index=samples.index, dtype=float), samples["finished"])
    table = rank_within_groups(samples[["id", "sample_idx"]].assign(score=scores))
    out = pipeline.round_dir(r) / "rankings.parquet"
    write_table(table, out, schemas.Rankings)
    best = table[table["rank"] == 1]["score"]
    summary = {"metric": rp.metric, "mean_score": float(table["score"].mean()), "mean_best_score": float(best.mean())}
    write_json(pipeline.round_metrics(r, "rank"), summary)
    tracking.log_stage("rank", r, dataclasses.asdict(rp), pipeline.round_metrics(r, "rank"), artifacts=[out])


if __name__ == "__main__":
    pipeline.cli(main, __doc__)
