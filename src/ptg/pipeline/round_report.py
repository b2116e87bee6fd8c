"""PTG against the MLE baseline, round by round, from the per-round metrics JSON files.

``build_report`` (the `report` stage) writes metrics/report/{eval_by_round,guidance_by_round}.csv for `dvc plots`;
``ptg report`` prints the table from them (``make run`` does, after ``dvc repro``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ptg.io import atomic_path, read_json

if TYPE_CHECKING:
    from ptg.tasks import TaskInfo

# A task with references (summarisation, copy; ptg.pipeline.evaluation.evaluate_references): ROUGE / METEOR and length.
REFERENCE_EVAL_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "meteor", "gen_len")
GUIDANCE_KEYS = ("val_loss", "val_accuracy", "val_pairs", "kept_start", "best_update", "val_loss_start",
                 "val_accuracy_start")
# How far from uniform the round trained (train_lm.json; absent for objectives without reference weights).
WEIGHT_KEYS = ("reward_cv", "weight_cv", "weight_p90_p10", "weight_clipped")


def reference_row(ptg: dict[str, Any], mle: dict[str, Any]) -> dict[str, Any]:
    """What the report shows beside a task with references' EVAL_KEYS: the guidance's mean token reward on PTG's
    predictions, on their EOS and on the other tokens."""
    return {"ptg_guidance_score": ptg["guidance_score"], "reward_eos": ptg["reward_eos"],
            "reward_other": ptg["reward_other"]}


def build_report(round_ids: list[int], metrics_dir: Path, task: TaskInfo) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Collect every round's evaluation (PTG and its baseline: the task's ``EVAL_KEYS`` and ``report_row``) and
    guidance fit; write and return both tables."""
    eval_rows, guidance_rows = [], []
    keys = task.EVAL_KEYS
    for r in round_ids:
        ptg = read_json(metrics_dir / "rounds" / str(r) / "evaluate.json")
        mle = read_json(metrics_dir / "baseline" / str(r) / "evaluate.json")
        fit = read_json(metrics_dir / "rounds" / str(r) / "fit_guidance.json")
        train = read_json(metrics_dir / "rounds" / str(r) / "train_lm.json")
        row = {"round": r, "split": ptg.get("split", "test"), **{f"ptg_{k}": ptg[k] for k in keys},
               **{f"mle_{k}": mle[k] for k in keys}, **task.report_row(ptg, mle)}
        eval_rows.append(row)
        guidance_rows.append({"round": r, **{k: fit[k] for k in GUIDANCE_KEYS},
                              **{k: train.get(k, float("nan")) for k in WEIGHT_KEYS}})
    evals, guidance = pd.DataFrame(eval_rows), pd.DataFrame(guidance_rows)
    for frame, name in ((evals, "eval_by_round.csv"), (guidance, "guidance_by_round.csv")):
        with atomic_path(metrics_dir / "report" / name) as tmp:
            frame.to_csv(tmp, index=False)
    return evals, guidance


def format_report(evals: pd.DataFrame, guidance: pd.DataFrame) -> str:
    acc = [f"{a:.3f} ({int(n)} pairs){' kept start' if k else ''}" for a, n, k in
           zip(guidance["val_accuracy"], guidance["val_pairs"], guidance["kept_start"], strict=True)]
    if "ptg_accuracy" in evals:  # the prompt task
        shown = pd.DataFrame({
            "round": evals["round"], "PTG acc": evals["ptg_accuracy"], "base acc": evals["mle_accuracy"],
            "PTG top-3": evals["ptg_accuracy_top3"], "base top-3": evals["mle_accuracy_top3"],
            "PTG prompt": evals["ptg_prompt"], "base prompt": evals["mle_prompt"], "guidance val acc": acc})
        return ("PTG (REINFORCE on token-level guidance) vs baseline (REINFORCE on the classifier's sequence-level "
                f"reward) on the {evals['split'].iloc[0]} split: accuracy of the prompt chosen on validation, and "
                "the mean of the top 3\n" + shown.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    shown = pd.DataFrame({
        "round": evals["round"], "PTG ROUGE-L": evals["ptg_rougeL"], "base ROUGE-L": evals["mle_rougeL"],
        "PTG METEOR": evals["ptg_meteor"], "base METEOR": evals["mle_meteor"],
        "PTG words": evals["ptg_gen_len"], "base words": evals["mle_gen_len"], "guidance val acc": acc,
        "weight CV": guidance["weight_cv"] if "weight_cv" in guidance else float("nan")})
    return ("PTG vs baseline (uniform token weights; same examples, order and updates) on the "
            f"{evals['split'].iloc[0]} split, greedy; ROUGE/METEOR x100; weight CV: median within-reference "
            "coefficient of variation of PTG's token weights (0 = uniform)\n"
            + shown.to_string(index=False, float_format=lambda x: f"{x:.2f}"))


def read_report(metrics_dir: Path = Path("metrics")) -> str:
    """The table of a finished run, from the CSVs the report stage wrote under ``metrics_dir``/report."""
    out = metrics_dir / "report"
    return format_report(pd.read_csv(out / "eval_by_round.csv"), pd.read_csv(out / "guidance_by_round.csv"))
