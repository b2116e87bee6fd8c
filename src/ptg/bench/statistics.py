"""The bench's statistics: per-item scores lined up by seed and item, paired differences with two-level
bootstrap CIs (``ptg.stats``), the guidance's held-out accuracy against length, and ``collect`` /
``collect_ablations``, which write the summary JSON, the tables and the plots of a finished bench."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ptg import pipeline, stats
from ptg.bench.experiments import ABLATION_REFERENCE, VALIDATION, arm_name, evaluate_items, finished, machine
from ptg.bench.tables import format_ablations, format_table, plot, plot_curves
from ptg.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

METRICS = ("rougeL", "rouge2", "meteor")


def aligned(tables: Sequence[dict[int, pd.Series]], shared_items: bool = True) -> tuple[list[int], list[np.ndarray]]:
    """The seeds every table has and, per table, a (seeds x items) matrix of its values lined up by item id
    (the index): with ``shared_items`` (one test split for every seed) the ids every seed and table has, so a
    column is one item throughout; without (each seed its own draw of texts), each seed's ids shared by the tables,
    sorted, the first n of them (n: the fewest any seed has)."""
    seeds = sorted(set.intersection(*(set(t) for t in tables)))
    ids = {s: sorted(set.intersection(*(set(t[s].index) for t in tables))) for s in seeds}
    if shared_items:
        common = sorted(set.intersection(*(set(v) for v in ids.values())))
        ids = {s: common for s in seeds}
    n = min(len(v) for v in ids.values())
    return seeds, [np.stack([t[s].loc[ids[s][:n]].to_numpy(float) for s in seeds]) for t in tables]


def round_differences(seed_dirs: list[Path], r: int) -> dict[str, Any]:
    """PTG - baseline on round r's test items for every metric (x100), paired over items and seeds."""
    ptg = {i: evaluate_items(d, r).set_index("id") for i, d in enumerate(seed_dirs)}
    base = {i: evaluate_items(d, r, baseline=True).set_index("id") for i, d in enumerate(seed_dirs)}
    out: dict[str, Any] = {"round": r, "seeds": len(seed_dirs)}
    for m in (*METRICS, "gen_len"):
        _, (a, b) = aligned([{i: f[m] for i, f in ptg.items()}, {i: f[m] for i, f in base.items()}])
        if m == "gen_len":
            out["words"] = {"ptg": float(a.mean(axis=1).mean()), "baseline": float(b.mean(axis=1).mean())}
        else:
            a, b = a * 100, b * 100
            out[m] = {"ptg": float(a.mean()), "baseline": float(b.mean())} | stats.paired_bootstrap(a - b)
            out["items"] = a.shape[1]
    return {k: out[k] for k in ("round", "items", "seeds", *METRICS, "words")}


def arm_differences(directory: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]], r: int
                    ) -> list[dict[str, Any]]:
    """Round r of PTG and of every arm against uniform MLE on the same test items, paired over items and seeds
    (two-level bootstrap), over the seeds where both finished; and token- against sequence-level credit."""
    results = directory / "results"
    runs = {"ptg": {s: results / f"seed-{s}" for s in seeds if finished(results, f"seed-{s}")}}
    runs |= {name: {s: results / arm_name(name, s) for s in seeds
                    if finished(results, arm_name(name, s)) and finished(results, f"seed-{s}")}
             for name, *_ in arms}
    base = {s: evaluate_items(results / f"seed-{s}", r, baseline=True).set_index("id")["rougeL"] for s in runs["ptg"]}
    arm_items = {name: {s: evaluate_items(d, r).set_index("id")["rougeL"] for s, d in by_seed.items()}
                 for name, by_seed in runs.items() if by_seed}

    def paired(a: dict[int, pd.Series], b: dict[int, pd.Series]) -> dict[str, Any]:
        common, (x, y) = aligned([a, b])
        x, y = x * 100, y * 100
        return {"seeds": common, "items": x.shape[1], "arm_score": float(x.mean()), "other": float(y.mean()),
                **stats.paired_bootstrap(x - y)}

    rows = [{"arm": name, "vs": "uniform MLE", **paired(items, base)} for name, items in arm_items.items()]
    if {"mle-pg-token", "mle-pg-sequence"} <= set(arm_items):
        rows.append({"arm": "mle-pg-token", "vs": "mle-pg-sequence",
                     **paired(arm_items["mle-pg-token"], arm_items["mle-pg-sequence"])})
    return rows


def guidance_accuracy(seed_dirs: list[Path], r: int) -> dict[str, Any]:
    """Held-out pairwise accuracy of round r's guidance over validation groups of every seed, with its CI, against
    chance and against ranking by length (direction chosen on the training groups)."""
    val, train = [], []
    for i, d in enumerate(seed_dirs):
        g = pd.read_csv(d / pipeline.round_metrics(r, "guidance_groups").with_suffix(".csv"))
        g["id"] = f"{i}:" + g["id"].astype(str)
        val.append(g[g["split"] == "validation"])
        train.append(g[g["split"] == "train"])
    return stats.guidance_vs_length(pd.concat(val, ignore_index=True), pd.concat(train, ignore_index=True))


def stage_seconds(seed_dirs: list[Path], r: int) -> dict[str, float]:
    """Mean seconds of round r's timed work over seeds (sampling, LM training of both arms)."""
    def mean(path: Path) -> float:
        return float(np.mean([read_json(d / path)["seconds"] for d in seed_dirs]))
    return {"sample": mean(pipeline.round_metrics(r, "sample")),
            "train_lm": mean(pipeline.round_metrics(r, "train_lm")),
            "baseline_train_lm": mean(pipeline.baseline_metrics(r, "train_lm"))}


def validation_curves(directory: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]]
                      ) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """Every arm's validation score (greedy ROUGE-L x100, ``train_lm.eval_every``) against the LM updates of all
    its rounds, per seed: {arm: {seed: [(update, score), ...]}}; arms without validation rows are left out."""
    results = directory / "results"
    def seed(s: int) -> str:
        return f"seed-{s}"

    folders = {"uniform MLE": (seed, "baseline_history"), "ptg": (seed, "rounds")}
    folders |= {name: (lambda s, name=name: arm_name(name, s), "rounds") for name, *_ in arms}
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for arm, (experiment, kind) in folders.items():
        for s in seeds:
            metrics_dir = results / experiment(s) / "metrics" / kind
            files = sorted(metrics_dir.glob("*/train_lm_history.csv"), key=lambda p: int(p.parent.name))
            points, offset = [], 0
            for f in files:
                h = pd.read_csv(f)
                if "val_score" in h:
                    rows = h.dropna(subset=["val_score"])
                    points += [(offset + int(u), float(v)) for u, v in zip(rows["update"], rows["val_score"],
                                                                           strict=True)]
                offset += int(h["update"].max())
            if points:
                curves.setdefault(arm, {})[s] = points
    return curves


def collect(directory: Path, out: Path, seeds: list[int], arms: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """Statistics over the finished seeds of ``directory`` (and the ``arms``' last round against uniform MLE);
    writes summary.json, table.md and by_round.png."""
    seed_dirs = [directory / "results" / f"seed-{s}" for s in seeds if finished(directory / "results", f"seed-{s}")]
    if not seed_dirs:
        raise FileNotFoundError(f"{directory}/results: no finished seed among {seeds}; run the bench first")
    rounds = sorted(int(p.name) for p in (seed_dirs[0] / "metrics" / "rounds").iterdir() if p.name.isdigit())
    summary: dict[str, Any] = {
        "seeds": [int(d.name.split("-")[1]) for d in seed_dirs], "machine": machine(),
        "seconds_per_seed": [read_json(d / "seconds.json")["seconds"] for d in seed_dirs],
        "cpu_seconds_per_seed": [read_json(d / "seconds.json").get("cpu_seconds") for d in seed_dirs], "rounds": []}
    for r in rounds:
        ev = [read_json(d / pipeline.round_metrics(r, "evaluate")) for d in seed_dirs]
        summary["rounds"].append(round_differences(seed_dirs, r) | {
            "guidance": guidance_accuracy(seed_dirs, r), "seconds": stage_seconds(seed_dirs, r),
            **{k: nanmean([e[k] for e in ev]) for k in ("reward_eos", "reward_other")}})
    if arms:
        summary["arms"] = arm_differences(directory, seeds, arms, rounds[-1])
    out.mkdir(parents=True, exist_ok=True)
    curves = validation_curves(directory, seeds, arms)
    if curves:
        summary["validation_curves"] = {arm: {str(s): pts for s, pts in by_seed.items()}
                                        for arm, by_seed in curves.items()}
        with atomic_path(out / "validation_curves.png") as tmp:
            plot_curves(curves, tmp.with_suffix(".png"))
            tmp.with_suffix(".png").rename(tmp)
    write_json(out / "summary.json", summary)
    table = format_table(summary)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(table + "\n")
    with atomic_path(out / "by_round.png") as tmp:
        plot(summary, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").rename(tmp)
    return summary


def _ablation_runs(results: Path) -> dict[str, dict[int, Path]]:
    """Finished ablation experiments under ``results``: {variant: {seed: folder}}."""
    runs: dict[str, dict[int, Path]] = {}
    for d in sorted(results.glob("abl-*-s*")):
        variant, _, seed = d.name.removeprefix("abl-").rpartition("-s")
        if seed.isdigit() and (d / "seconds.json").is_file():
            runs.setdefault(variant, {})[int(seed)] = d
    return runs


def collect_ablations(directory: Path, out: Path) -> list[dict[str, Any]]:
    """Round 1 of every ablation variant against the reference (the bench config) on the validation split, over
    every seed both ran with the same snapshot: PTG's ROUGE-L, its paired difference with the reference's PTG and
    with the reference's baseline (two-level bootstrap 95 % CI over validation items and seeds), the guidance's
    validation pairwise accuracy, output lengths. Writes ablations.json and ablations.md; returns the rows (none
    when no reference finished)."""
    runs = _ablation_runs(directory / "results")
    references = runs.pop(ABLATION_REFERENCE, {})
    if not references:
        return []
    trees = {seed: read_json(d / "seconds.json").get("tree") for seed, d in references.items()}
    rows = []
    for variant, by_seed in [(ABLATION_REFERENCE, references), *sorted(runs.items())]:
        # Only seeds whose run shares the reference's snapshot (code + bench params) are comparable.
        seeds = [s for s, d in sorted(by_seed.items())
                 if s in trees and read_json(d / "seconds.json").get("tree") == trees[s]]
        if not seeds:
            log.info("%s: no run with the snapshot of a reference seed; left out", variant)
            continue
        dirs = [by_seed[s] for s in seeds]
        # The variant's PTG, the reference's PTG and the reference's baseline, on the items all three scored.
        tables = [{s: evaluate_items(runs_of[s], 1, baseline).set_index("id") for s in seeds}
                  for runs_of, baseline in ((by_seed, False), (references, False), (references, True))]

        def scores(which: int, column: str = "rougeL", tables: list[dict[int, pd.DataFrame]] = tables
                   ) -> np.ndarray:
            return aligned([{s: t[s][column] for s in t} for t in tables])[1][which]

        info = read_json(dirs[0] / "seconds.json")
        evals = [read_json(d / pipeline.round_metrics(1, "evaluate")) for d in dirs]
        rows.append({"variant": "bench config" if variant == ABLATION_REFERENCE else variant,
                     "overrides": [o for o in info["overrides"] if not o.startswith("seed=") and o != VALIDATION],
                     "seeds": seeds, "items": scores(0).shape[1], "rougeL_ptg": float(scores(0).mean() * 100),
                     "rougeL_baseline": float(scores(2).mean() * 100),
                     "vs_reference": stats.paired_bootstrap((scores(0) - scores(1)) * 100),
                     "vs_baseline": stats.paired_bootstrap((scores(0) - scores(2)) * 100),
                     "val_accuracy": guidance_accuracy(dirs, 1)["guidance"],
                     "words_ptg": float(scores(0, "gen_len").mean()),
                     "words_baseline": float(scores(2, "gen_len").mean()),
                     "seconds": float(np.mean([read_json(d / "seconds.json")["seconds"] for d in dirs])),
                     **{k: nanmean([e.get(k, float("nan")) for e in evals]) for k in ("reward_eos", "reward_other")}})
    write_json(out / "ablations.json", rows)
    with atomic_path(out / "ablations.md") as tmp:
        tmp.write_text(format_ablations(rows) + "\n")
    return rows


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")
