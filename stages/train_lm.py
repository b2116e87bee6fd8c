"""DVC stage `train_lm@r`: train LM_{r-1} into LM_r with round r's frozen guidance as per-token weights.

`train_lm.objective`: wmle (guidance-weighted MLE on the references, default; `contrast` turns the rewards into
weights of a chosen spread; `pg_coeff` adds a policy-gradient term on K on-policy samples with sequence- or token-
level credit) or reinforce (the LM's own samples, token rewards + entropy bonus; sampling settings from `sample`).
With `eval_every`, the checkpoint that scores best on the validation split is kept. The budget is
`train_lm.max_updates`, or the round's `train_lm_updates` in `rounds`. The data order is seeded by (seed,
"train_lm", r) alone, so the baseline's round r sees the same examples in the same order. Writes data/rounds/r/lm
and metrics/rounds/r/train_lm.json (+ train_lm_history.csv).
Run: python stages/train_lm.py --round r [--params params.yaml]
"""

import dataclasses

from ptg import config, pipeline, tracking
from ptg.guidance.model import load_guidance
from ptg.pipeline import training


def main(r: int, path: str = "params.yaml") -> None:
    ctx = pipeline.start(f"train_lm@{r}", config.load(path))
    params = ctx.params
    cfg = dataclasses.replace(params.budget("train_lm", r), seed=ctx.seed("train_lm", r))
    guidance = load_guidance(pipeline.round_dir(r) / "guidance")
    out = pipeline.round_dir(r) / "lm"
    metrics_file = pipeline.round_metrics(r, "train_lm")
    history_file = pipeline.round_metrics(r, "train_lm_history").with_suffix(".csv")
    training.train_and_save(pipeline.round_dir(r - 1) / "lm", out, cfg, guidance, ctx, metrics_file, history_file)
    tracking.log_stage("train_lm", r, dataclasses.asdict(cfg), metrics_file, history=history_file, model_dir=out,
                       registered_name=tracking.LM_MODEL)


if __name__ == "__main__":
    pipeline.cli(main, __doc__)
