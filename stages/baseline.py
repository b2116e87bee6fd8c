"""DVC stage `baseline`: plain MLE from the same base model on the same budget as PTG, evaluated the same way.

Round r of the baseline trains the baseline's LM_{r-1} for `train_lm.max_updates` updates with objective mle (a
fresh optimizer per round, as PTG's train_lm@r) and evaluates it exactly as `evaluate@r`, so every PTG round has
an MLE counterpart with the same number of LM updates. Writes data/baseline/<r>/{lm,predictions.parquet} and
metrics/baseline/<r>/{train_lm,evaluate}.json and metrics/baseline_history/<r>/train_lm_history.csv.
Run: python stages/baseline.py [--params params.yaml]
"""

import dataclasses

from ptg import evaluation, pipeline, tracking
from ptg.config import load_group, rounds


def main(params: str = "params.yaml") -> None:
    ctx = pipeline.start("baseline", params)
    cfg = load_group("train_lm", params)
    for item in rounds(params):
        r = item["round"]
        src = pipeline.round_dir(0) / "lm" if r == 1 else pipeline.baseline_dir(r - 1) / "lm"
        out, met = pipeline.baseline_dir(r), pipeline.METRICS / "baseline" / str(r)
        round_cfg = dataclasses.replace(cfg, objective="mle", seed=ctx.seed("baseline", r))
        summary, history = pipeline.train_and_save(
            src, out / "lm", round_cfg, None, ctx, met / "train_lm.json",
            pipeline.METRICS / "baseline_history" / str(r) / "train_lm_history.csv")
        tracking.log_stage("baseline_train_lm", r, dataclasses.asdict(round_cfg), summary, history=history,
                           model_dir=out / "lm", registered_name="ptg-lm-baseline", dvc_stage="baseline")
        scores, files = evaluation.evaluate_and_save(out / "lm", None, out / "predictions.parquet",
                                                     met / "evaluate.json", ctx)
        tracking.log_stage("baseline_evaluate", r, {}, scores, artifacts=files, dvc_stage="baseline")
        tracking.set_best_alias("ptg-lm-baseline", out / "lm", "rougeL", scores["rougeL"])


if __name__ == "__main__":
    pipeline.cli(main, __doc__, per_round=False)
