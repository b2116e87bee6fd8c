"""`ptg bench --task prompt`: the prompt task over seeds, each a DVC experiment with its own few-shot draw and training
seed (``seed`` and ``data.seed``), run by ``ptg.bench.experiments`` (resumable: a finished experiment is skipped).

Compared on the test split of each seed, paired by text and bootstrapped over texts and seeds
(``stats.paired_bootstrap``): PTG (REINFORCE on the guidance's token rewards, the seed experiment's train_lm) against
REINFORCE with the classifier's sequence-level reward (the seed experiment's baseline: RLPrompt's credit, at the
classifier budget of ``task.baseline_budget``), the arms (``ARMS``: policy gradient with sequence-level,
return-preserving token and placebo credit, compared with each other too: ``PAIRS``), and the prompts that need no
training (empty, manual; with and without contextual calibration) beside the majority class. Classifier calls are the
budget: each method's (prompt, text) pairs spent on its training signal. Writes summary.json, table.md and
accuracy_vs_calls.png to ``--out``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ptg import pipeline, stats
from ptg.bench.experiments import evaluate_items, finished, machine, run_all, setup_repo
from ptg.bench.statistics import aligned
from ptg.bench.tables import ci
from ptg.config import load as load_params
from ptg.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

# Arms beside PTG (the paper's REINFORCE on the guidance's rewards) and the sequence-level baseline (RLPrompt's
# REINFORCE): policy gradient with K = 4 prompts per start and a leave-one-out baseline, 4 starts an update (the 16
# prompts an update of PTG and the baseline), with sequence-level credit (RLOO), return-preserving token credit
# (spread: each prompt's advantage shared out over its tokens by the guidance, beta 0.5 as chosen on the RL bench's
# validation seeds) and its placebo (the shares permuted within each prompt). Each arm scores its 16 prompts an
# update on every training text, so 4 updates a round spend what rank@r spends (16 x 4 prompts): the sequence-level
# baseline's classifier budget (task.baseline_budget: calls). PTG's chain from train_lm on (samples, rankings and
# guidance come from DVC's run cache).
PG = ("train_lm.objective=pg", "train_lm.batch_size=4", "train_lm.pg_samples=4", "train_lm.max_updates=4",
      "train_lm.pg_spread=0.5")
ARMS: tuple[tuple[str, ...], ...] = (("pg-sequence", *PG, "train_lm.pg_credit=sequence"),
                                     ("pg-spread", *PG, "train_lm.pg_credit=spread"),
                                     ("pg-placebo", *PG, "train_lm.pg_credit=placebo"))
# Direct comparisons besides every method against the sequence-level baseline: (method, against).
PAIRS = (("pg-spread", "pg-sequence"), ("pg-spread", "pg-placebo"), ("ptg", "pg-sequence"))
# Prompts without training (PTG's last evaluation): best-of-N from the untrained policy, the empty and manual prompts.
FIXED = ("best_of_n", "empty", "empty_calibrated", "manual", "manual_calibrated")


def seed_name(seed: int) -> str:
    return f"prompt-s{seed}"


def arm_name(arm: str, seed: int) -> str:
    return f"prompt-{arm}-s{seed}"


def experiments(seeds: Sequence[int], arms: Sequence[Sequence[str]], last_round: int
                ) -> list[tuple[str, list[str], Sequence[str]]]:
    """The seed experiments (the whole pipeline), then every arm through the last round's evaluation."""
    out: list[tuple[str, list[str], Sequence[str]]] = [
        (seed_name(s), [f"seed={s}", f"data.seed={s}"], ()) for s in seeds]
    out += [(arm_name(name, s), [f"seed={s}", f"data.seed={s}", *overrides], [f"evaluate@{last_round}"])
            for s in seeds for name, *overrides in arms]
    return out


def _items(run: Path, folder: str, r: int) -> pd.DataFrame:
    return evaluate_items(run, r, baseline=folder == "baseline").set_index("id")


def training_calls(run: Path, folder: str, guided: bool = True) -> int:
    """(prompt, text) pairs the classifier scored for a method's training signal, over its rounds: the ranking of
    rank@r when the method trains on the guidance (``guided``), plus what its own training scored (a
    sequence-level credit at every update: the baseline, the policy-gradient arms)."""
    metrics = run / "metrics"
    ranked = sum(int(read_json(p).get("classifier_pairs_train", 0))
                 for p in sorted((metrics / "rounds").glob("*/rank.json"))) if folder == "rounds" and guided else 0
    return ranked + sum(int(read_json(p).get("classifier_pairs", 0))
                        for p in sorted((metrics / folder).glob("*/train_lm.json")))


def _paired(a: dict[int, pd.Series], b: dict[int, pd.Series]) -> dict[str, Any]:
    """Accuracy (x100) of a and b over the seeds both have, and a - b, paired by text within each seed (each seed
    draws its own texts)."""
    common, (x, y) = aligned([a, b], shared_items=False)
    x, y = x * 100, y * 100
    return {"seeds": common, "items": x.shape[1], "accuracy": float(x.mean()), "other": float(y.mean()),
            **stats.paired_bootstrap(x - y)}


def collect(directory: Path, out: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Statistics over the finished experiments; writes summary.json, table.md and accuracy_vs_calls.png."""
    results = directory / "results"
    runs = {s: results / seed_name(s) for s in seeds if finished(results, seed_name(s))}
    if not runs:
        raise FileNotFoundError(f"{results}: no finished prompt-task seed among {list(seeds)}; run the bench first")
    last = load_params(directory / "params.yaml").last_round
    methods: dict[str, dict[int, Path]] = {"ptg": dict(runs)}
    methods |= {name: {s: results / arm_name(name, s) for s in runs if finished(results, arm_name(name, s))}
                for name, *_ in arms}
    correct = {m: {s: _items(d, "rounds", last)["correct"] for s, d in by_seed.items()}
               for m, by_seed in methods.items()}
    correct["sequence"] = {s: _items(d, "baseline", last)["correct"] for s, d in runs.items()}
    for fixed in FIXED:
        correct[fixed] = {s: _items(d, "rounds", last)[f"{fixed}_correct"] for s, d in runs.items()}
    evaluated = {s: read_json(d / pipeline.round_metrics(last, "evaluate")) for s, d in runs.items()}
    calls = {m: float(np.mean([training_calls(d, "rounds", guided=m != "pg-sequence") for d in by_seed.values()]))
             for m, by_seed in methods.items() if by_seed}
    calls["sequence"] = float(np.mean([training_calls(d, "baseline") for d in runs.values()]))
    rows = [{"method": m, "vs": "sequence", "calls": calls[m], **_paired(correct[m], correct["sequence"])}
            for m in methods if correct[m]]
    rows += [{"method": m, "vs": vs, "calls": calls.get(m, 0.0), **_paired(correct[m], correct[vs])}
             for m, vs in PAIRS if correct.get(m) and correct.get(vs)]
    rows += [{"method": m, "vs": vs, "calls": calls.get(m, 0.0), **_paired(correct[m], correct[vs])}
             for vs in ("manual", "best_of_n") for m in ("ptg", "sequence")]
    summary = {
        "seeds": sorted(runs), "machine": machine(), "rows": rows,
        "accuracy": {m: float(np.mean([c.mean() for c in by_seed.values()]) * 100)
                     for m, by_seed in correct.items() if by_seed},
        "calls": calls, "majority_rate": float(np.mean([e["majority_rate"] for e in evaluated.values()]) * 100),
        "prompts": {m: {str(s): read_json(d / pipeline.round_metrics(last, "evaluate"))["prompt"]
                        for s, d in by_seed.items()} for m, by_seed in methods.items()}
        | {"sequence": {str(s): read_json(d / pipeline.baseline_metrics(last, "evaluate"))["prompt"]
                        for s, d in runs.items()}},
        "seconds_per_seed": [read_json(d / "seconds.json")["seconds"] for d in runs.values()],
        "cpu_seconds_per_seed": [read_json(d / "seconds.json").get("cpu_seconds") for d in runs.values()]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    table = format_table(summary)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(table + "\n")
    with atomic_path(out / "accuracy_vs_calls.png") as tmp:
        plot(summary, tmp.with_suffix(".png")).rename(tmp)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    acc, calls = summary["accuracy"], summary["calls"]
    lines = ["| method | test accuracy (%) | classifier calls in training | vs | difference (pp, 95% CI) |",
             "|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['method']} | {row['accuracy']:.1f} | {row['calls']:.0f} | {row['vs']} "
                     f"| {ci(row, digits=1)} |")
    lines.append(f"| sequence-level REINFORCE | {acc['sequence']:.1f} | {calls['sequence']:.0f} | | |")
    for fixed in FIXED:
        lines.append(f"| {fixed.replace('_', ' ')} prompt | {acc[fixed]:.1f} | 0 | | |")
    lines.append(f"| majority class | {summary['majority_rate']:.1f} | 0 | | |")
    n = summary["rows"][0]["items"]
    return "\n".join(lines) + (f"\n\nseeds {summary['seeds']}, {n} test texts each; paired bootstrap over texts "
                                "and seeds")


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Test accuracy against the classifier calls each method's training signal cost."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.4), layout="tight")
    ax = fig.subplots()
    for method, accuracy in summary["accuracy"].items():
        calls = summary["calls"].get(method, 0.0)
        ax.scatter([calls], [accuracy], label=method, marker="o" if method in summary["calls"] else "x")
    ax.axhline(summary["majority_rate"], color="grey", linestyle=":", label="majority class")
    ax.set_xlabel("classifier (prompt, text) pairs in training")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return path


def run(params: Path, directory: Path, out: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]], jobs: int,
        collect_only: bool = False) -> dict[str, Any]:
    """Set up (or reuse) the bench repository with ``params``, run what is missing, collect."""
    if not collect_only:
        setup_repo(params, directory)
        planned = experiments(seeds, arms, load_params(directory / "params.yaml").last_round)
        run_all(directory, planned, jobs)
    return collect(directory, out, seeds, arms)
