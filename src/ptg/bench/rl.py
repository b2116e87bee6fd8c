"""`ptg bench --task rl` (`make bench-rl`): token-level credit where credit assignment decides. The LM learns by
policy gradient alone from the base policy (``configs/bench-rl.yaml``: ``train_lm.objective: pg``, K on-policy
samples per input, reward ``rank.metric``), and every ``eval_every`` updates its held-out reward on fixed
validation inputs is measured (greedy and sampled): learning curves. Each seed is a DVC experiment (``ptg.bench
.experiments``, resumable) whose guidance round and baseline every arm shares through DVC's run cache:

- ``spread``: return-preserving token credit (the seed experiment's train_lm@1: each sample's RLOO advantage
  shared out over its tokens by the guidance, its sum kept);
- ``sequence``: sequence-level credit, RLOO (the seed experiment's baseline: the same preference, no guidance);
- ``placebo``: spread with each sample's shares permuted among its tokens (the same unevenness, no knowledge);
- ``token``: the paper's token credit (the guidance's rewards alone, leave-one-out baseline);
- ``grpo``: the peer, TRL's GRPOTrainer with the same reward function, prompts, K, learning rate and budget
  (``ptg.lm.grpo``), on the first ``peer_seeds`` seeds.

Primary figure: the area under the held-out reward curve above the untrained policy's (the mean over checkpoints
after the start of reward - reward at the start: sample efficiency), per validation input, paired with
sequence-level credit and with the placebo by input and seed (two-level bootstrap, ``ptg.stats``); also the final
test ROUGE-L and METEOR of each arm at its validation best, paired with sequence-level credit by test item. Writes
summary.json, table.md and curves.png to ``--out``.
"""

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
from ptg.bench.tables import ci, plot_curves
from ptg.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

ARMS: tuple[tuple[str, ...], ...] = (
    ("placebo", "train_lm.pg_credit=placebo"),
    ("token", "train_lm.pg_credit=token"),
    ("grpo", "train_lm.objective=grpo", "train_lm.pg_credit=sequence"),
)
PEER = "grpo"
REWARDS = ("reward_sampled", "reward_greedy")
TEST_METRICS = ("rougeL", "meteor")


def seed_name(seed: int) -> str:
    return f"rl-s{seed}"


def arm_name(arm: str, seed: int) -> str:
    return f"rl-{arm}-s{seed}"


def experiments(seeds: Sequence[int], arms: Sequence[Sequence[str]], peer_seeds: int | None = None
                ) -> list[tuple[str, list[str], Sequence[str]]]:
    """The seed experiments (the whole pipeline: the spread arm and the sequence-level baseline), then every arm
    through round 1's evaluation, seed-major; the peer arm only on the first ``peer_seeds`` seeds (all: None)."""
    out: list[tuple[str, list[str], Sequence[str]]] = [(seed_name(s), [f"seed={s}"], ()) for s in seeds]
    for i, s in enumerate(seeds):
        out += [(arm_name(name, s), [f"seed={s}", *overrides], ["evaluate@1"]) for name, *overrides in arms
                if name != PEER or peer_seeds is None or i < peer_seeds]
    return out


def area(curve: pd.DataFrame, column: str) -> pd.Series:
    """Per validation input (``id``), the area under its held-out reward curve above the start: the mean over the
    checkpoints after update 0 of reward(update) - reward(0). curve: rows (update, id, ``column``)."""
    wide = curve.pivot(index="id", columns="update", values=column).sort_index(axis=1)
    if 0 not in wide.columns or wide.shape[1] < 2:
        raise ValueError(f"a learning curve needs update 0 and a later checkpoint; got updates {list(wide.columns)}")
    return wide.drop(columns=0).sub(wide[0], axis=0).mean(axis=1)


def _folder(method: str) -> str:
    return "baseline" if method == "sequence" else "rounds"


def _run_dirs(results: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]]) -> dict[str, dict[int, Path]]:
    """{method: {seed: experiment folder}} of the finished experiments."""
    base = {s: results / seed_name(s) for s in seeds if finished(results, seed_name(s))}
    runs = {"spread": dict(base), "sequence": dict(base)}
    runs |= {name: {s: results / arm_name(name, s) for s in base if finished(results, arm_name(name, s))}
             for name, *_ in arms}
    return {m: by_seed for m, by_seed in runs.items() if by_seed}


def curves_of(run: Path, method: str) -> pd.DataFrame:
    return pd.read_csv(run / "metrics" / _folder(method) / "1" / "train_lm_curve.csv")


def _paired(a: dict[int, pd.Series], b: dict[int, pd.Series], scale: float = 1.0) -> dict[str, Any]:
    """a and b (per seed, indexed by item) over the seeds and items both have, and a - b paired by item and seed."""
    common, (x, y) = aligned([a, b])
    x, y = x * scale, y * scale
    return {"seeds": common, "items": x.shape[1], "value": float(x.mean()), "other": float(y.mean()),
            **stats.paired_bootstrap(x - y)}


def collect(directory: Path, out: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Statistics over the finished experiments; writes summary.json, table.md and curves.png."""
    results = directory / "results"
    runs = _run_dirs(results, seeds, arms)
    if not runs:
        raise FileNotFoundError(f"{results}: no finished seed among {list(seeds)}; run `ptg bench --task rl` first")
    curves = {m: {s: curves_of(d, m) for s, d in by_seed.items()} for m, by_seed in runs.items()}
    areas = {c: {m: {s: area(f, c) for s, f in by_seed.items()} for m, by_seed in curves.items()} for c in REWARDS}
    tests = {k: {m: {s: evaluate_items(d, 1, baseline=m == "sequence").set_index("id")[k]
                     for s, d in by_seed.items()} for m, by_seed in runs.items()} for k in TEST_METRICS}
    rows = []
    for m in runs:
        row: dict[str, Any] = {"method": m, "seeds": sorted(runs[m])}
        for c in REWARDS:
            row[f"area_{c}"] = float(np.mean([a.mean() for a in areas[c][m].values()]))
            row[f"start_{c}"] = float(np.mean([f[f["update"] == 0][c].mean() for f in curves[m].values()]))
            for vs in ("sequence", "placebo", "grpo"):
                if vs != m and vs in runs:
                    row[f"{c}_vs_{vs}"] = _paired(areas[c][m], areas[c][vs])
            if "sequence" in runs and m != "sequence":
                seq = row[f"{c}_vs_sequence"]["other"]
                row[f"{c}_ratio_to_sequence"] = row[f"{c}_vs_sequence"]["value"] / seq if seq else float("nan")
        for k in TEST_METRICS:
            row[k] = float(np.mean([t.mean() for t in tests[k][m].values()]) * 100)
            if m != "sequence" and "sequence" in runs:
                row[f"{k}_vs_sequence"] = _paired(tests[k][m], tests[k]["sequence"], scale=100.0)
        trained = [read_json(d / "metrics" / _folder(m) / "1" / "train_lm.json") for d in runs[m].values()]
        row["seconds_per_update"] = float(np.mean([t["seconds_per_update"] for t in trained]))
        row["best_update"] = [t.get("best_update") for t in trained]
        rows.append(row)
    seed_runs = runs.get("spread", runs.get("sequence", {}))
    fits = [read_json(d / pipeline.round_metrics(1, "fit_guidance")) for d in seed_runs.values()]
    diagnostics = {k: float(np.nanmean([f.get(k, np.nan) for f in fits]))
                   for k in ("val_accuracy", "val_accuracy_clear", "reward_cv", "occlusion_spearman")}
    # Each experiment once: the seed experiments hold both spread and sequence.
    experiment_dirs = [*seed_runs.values(), *(d for m, by_seed in runs.items() if m not in ("spread", "sequence")
                                              for d in by_seed.values())]
    seconds = [read_json(d / "seconds.json") for d in experiment_dirs]
    summary = {"seeds": sorted(seed_runs), "machine": machine(), "rows": rows, "guidance": diagnostics,
               "cpu_seconds": float(sum(s.get("cpu_seconds") or 0.0 for s in seconds)),
               "wall_seconds": float(sum(s["seconds"] for s in seconds)),
               "curves": {m: {str(s): f.groupby("update")["reward_sampled"].mean().round(6).to_dict()
                              for s, f in by_seed.items()} for m, by_seed in curves.items()}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(format_table(summary) + "\n")
    points = {m: {s: [(int(u), float(v)) for u, v in f.groupby("update")["reward_sampled"].mean().items()]
                  for s, f in by_seed.items()} for m, by_seed in curves.items()}
    with atomic_path(out / "curves.png") as tmp:
        plot_curves(points, tmp.with_suffix(".png"), ylabel="held-out reward (sampled)")
        tmp.with_suffix(".png").rename(tmp)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The README table: per method, the area under the held-out reward curve (sampled and greedy) with its paired
    differences against sequence-level credit, the placebo and TRL's GRPO, the final test scores, then the
    guidance diagnostics and what the bench cost on which machine."""
    lines = ["| method | seeds | area, sampled (x100) | vs sequence [95% CI] | vs placebo [95% CI] "
             "| vs GRPO [95% CI] | area, greedy (x100) | vs sequence [95% CI] | vs GRPO [95% CI] | test ROUGE-L "
             "| vs sequence [95% CI] | test METEOR | vs sequence [95% CI] | s / update |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def diff(row: dict[str, Any], key: str, scale: float = 100.0) -> str:
        d = row.get(key)
        if d is None:
            return "—"
        return ci({k: d[k] * scale for k in ("mean", "lo", "hi")}, digits=2)

    for r in summary["rows"]:
        lines.append(
            f"| {r['method']} | {len(r['seeds'])} | {100 * r['area_reward_sampled']:.2f} "
            f"| {diff(r, 'reward_sampled_vs_sequence')} | {diff(r, 'reward_sampled_vs_placebo')} "
            f"| {diff(r, 'reward_sampled_vs_grpo')} | {100 * r['area_reward_greedy']:.2f} "
            f"| {diff(r, 'reward_greedy_vs_sequence')} | {diff(r, 'reward_greedy_vs_grpo')} | {r['rougeL']:.2f} "
            f"| {diff(r, 'rougeL_vs_sequence', 1.0)} | {r['meteor']:.2f} | {diff(r, 'meteor_vs_sequence', 1.0)} "
            f"| {r['seconds_per_update']:.1f} |")
    g = summary["guidance"]
    lines.append(f"\nguidance (held-out, mean over seeds): pairwise accuracy {g['val_accuracy']:.3f}, on clear pairs "
                 f"{g['val_accuracy_clear']:.3f}, within-sample reward CV {g['reward_cv']:.3f}, Spearman with "
                 f"occlusion credit {g['occlusion_spearman']:.3f}; seeds {summary['seeds']}")
    m = summary["machine"]
    lines.append(f"\ncost: {summary['cpu_seconds'] / 60:.0f} core-minutes over the experiments "
                 f"({summary['wall_seconds'] / 60:.0f} experiment-minutes, side by side as --jobs ran them) on "
                 f"{m.get('gpu') or m['cpu']}, {m['cores']} cores, {' '.join(m['flags'])}")
    return "\n".join(lines)


def run(params: Path, directory: Path, out: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]], jobs: int,
        collect_only: bool = False, peer_seeds: int | None = None) -> dict[str, Any]:
    """Set up (or reuse) the bench repository with ``params``, run what is missing, collect."""
    if not collect_only:
        setup_repo(params, directory)
        run_all(directory, experiments(seeds, arms, peer_seeds), jobs)
    return collect(directory, out, seeds, arms)
