"""DVC stage `baseline`: the same training as PTG with uniform token weights, evaluated the same way.

Round r of the baseline trains the baseline's LM_{r-1} exactly as `train_lm@r` trains PTG's: the same objective,
normalisation, optimizer settings and budget (`train_lm.max_updates` or the round's `train_lm_updates`), and the
same seed, so the same examples in the same order. The one difference is the token weights: uniform instead of
the guidance's, and no policy-gradient term (`contrast` and `pg_*` do not apply: it is the uniform-MLE arm every
other arm is compared with; checkpoint selection on validation, `eval_every`, does). It is evaluated exactly as
`evaluate@r`. The prompt task's baseline is REINFORCE with sequence-level credit instead (each prompt's
classifier reward, standardised over the step's prompts, on every token: RLPrompt's), the same loss, entropy bonus
and sampling as PTG's (the task's `baseline_config`, `ptg.tasks`). Writes
data/baseline/<r>/{lm,predictions.parquet}, metrics/baseline/<r>/{train_lm,evaluate}.json (+ evaluate_items.csv) and
metrics/baseline_history/<r>/train_lm_history.csv.
Run: python stages/baseline.py [--params params.yaml]
"""

import dataclasses

from ptg import config, pipeline, tasks, tracking
from ptg.lm import distributed
from ptg.pipeline import training


def main(path: str = "params.yaml") -> None:
    ctx = pipeline.start("baseline", config.load(path))
    params = ctx.params
    task, evaluate = tasks.info(params), tasks.evaluation(params).evaluate
    for item in params.rounds:
        r = item["round"]
        src = pipeline.round_dir(0) / "lm" if r == 1 else pipeline.baseline_dir(r - 1) / "lm"
        out, met = pipeline.baseline_dir(r), pipeline.METRICS / "baseline" / str(r)
        # Uniform MLE: no guidance weights, no policy-gradient term (so the keys that set those do not rerun it).
        cfg = task.baseline_config(dataclasses.replace(params.budget("train_lm", r),
                                                       seed=ctx.seed("train_lm", r)), params)
        history_file = pipeline.METRICS / "baseline_history" / str(r) / "train_lm_history.csv"
        training.train_and_save(src, out / "lm", cfg, None, ctx, met / "train_lm.json", history_file)
        if not distributed.is_main():  # data-parallel training (accelerate launch): rank 0 evaluates and tracks
            continue
        tracking.log_stage("baseline_train_lm", r, dataclasses.asdict(cfg), met / "train_lm.json",
                           history=history_file, model_dir=out / "lm", registered_name=tracking.BASELINE_MODEL,
                           dvc_stage="baseline")
        scores, files = evaluate(out / "lm", None, out / "predictions.parquet", met / "evaluate.json", ctx,
                                 last_round=r == params.last_round, seed=ctx.seed("evaluate", r))
        tracking.log_stage("baseline_evaluate", r, {}, met / "evaluate.json", artifacts=files, dvc_stage="baseline")
        metric = task.MAIN_METRIC
        tracking.set_best_alias(tracking.BASELINE_MODEL, out / "lm", metric, scores[metric], weights=False)


if __name__ == "__main__":
    pipeline.cli(main, __doc__, per_round=False)
