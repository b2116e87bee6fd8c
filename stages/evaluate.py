"""DVC stage `evaluate@r`: greedy predictions of LM_r on the test split, scored against all references.

Rounds before the last may evaluate a fixed subset (`evaluate.subset_items`); the last round evaluates the whole
test split. Writes data/rounds/r/predictions.parquet (schema Predictions), metrics/rounds/r/evaluate_items.csv
(per-item scores) and metrics/rounds/r/evaluate.json: ROUGE-1/2/L/Lsum and METEOR (x100), mean length, and round
r's guidance mean token reward on the predictions, on EOS and on the other tokens. The prompt task writes its
candidate prompts (schema PromptCandidates) and the test accuracy of the one chosen on validation instead
(the task's `evaluate`, `ptg.tasks`).
Run: python stages/evaluate.py --round r [--params params.yaml]
"""

import dataclasses

from ptg import config, pipeline, tasks, tracking
from ptg.guidance.model import load_guidance


def main(r: int, path: str = "params.yaml") -> None:
    ctx = pipeline.start(f"evaluate@{r}", config.load(path))
    params = ctx.params
    guidance = load_guidance(pipeline.round_dir(r) / "guidance")
    lm_dir = pipeline.round_dir(r) / "lm"
    evaluate = tasks.evaluation(params).evaluate
    scores, files = evaluate(lm_dir, guidance, pipeline.round_dir(r) / "predictions.parquet",
                             pipeline.round_metrics(r, "evaluate"), ctx, last_round=r == params.last_round,
                             seed=ctx.seed("evaluate", r))
    tracking.log_stage("evaluate", r, dataclasses.asdict(params.evaluate),
                       pipeline.round_metrics(r, "evaluate"), artifacts=files)
    metric = tasks.info(params).MAIN_METRIC
    tracking.set_best_alias(tracking.LM_MODEL, lm_dir, metric, scores[metric])
    # The guidance that trained the best LM.
    tracking.set_best_alias(tracking.GUIDANCE_MODEL, pipeline.round_dir(r) / "guidance", metric, scores[metric])


if __name__ == "__main__":
    pipeline.cli(main, __doc__)
