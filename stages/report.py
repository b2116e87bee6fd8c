"""DVC stage `report`: PTG against the MLE baseline, round by round, as a table (printed) and plot data.

Reads every round's metrics and the baseline's; writes metrics/report/eval_by_round.csv (ROUGE / METEOR of PTG
and MLE after the same number of LM updates) and metrics/report/guidance_by_round.csv (guidance validation
ListMLE and pairwise ranking accuracy), plotted by `dvc plots show`.
Run: python stages/report.py [--params params.yaml]
"""


from ptg import config, pipeline, tasks, tracking
from ptg.io import atomic_path
from ptg.pipeline import viz
from ptg.pipeline.round_report import build_report, format_report


def main(path: str = "params.yaml") -> None:
    ctx = pipeline.start("report", config.load(path), with_torch=False)
    params = ctx.params
    evals, guidance = build_report([item["round"] for item in params.rounds], pipeline.METRICS,
                                   tasks.info(params))
    out = pipeline.METRICS / "report"
    with atomic_path(out / "metrics_by_round.png") as tmp:
        viz.metrics_by_round_png(out / "eval_by_round.csv", tmp.with_suffix(".png")).rename(tmp)
    print(format_report(evals, guidance))
    tracking.log_stage("report", None, {}, {}, artifacts=[out / "eval_by_round.csv", out / "guidance_by_round.csv",
                                                           out / "metrics_by_round.png"])


if __name__ == "__main__":
    pipeline.cli(main, __doc__, per_round=False)
