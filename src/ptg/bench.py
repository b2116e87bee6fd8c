"""`make bench`: does PTG beat its baseline here, and by how much? Seeds as DVC experiments, paired statistics.

The benchmark runs the whole pipeline with ``configs/bench.yaml`` once per seed, as DVC experiments
(``dvc exp run --temp -n bench-seed-<s> -S seed=<s>``) in a git + DVC repository of its own (``build/bench``:
the pipeline files, a snapshot of ``src/`` that its stages import, the bench params as its params.yaml), each
under an MLflow parent run in the checkout's tracking store. ``--jobs`` experiments run side by side (each in
DVC's temporary copy of the repository, sharing its cache and run cache), each stage on cores // jobs threads.
Each experiment stays comparable with ``dvc exp show`` there. Seeds that finished with the same bench params are
skipped (other params run them again) and an interrupted one resumes from DVC's run cache, so a stopped bench
continues where it stopped; editing the checkout while a bench runs does not change the code it runs.

The PTG arm and the baseline arm (same training, uniform token weights) are evaluated on the same test items;
``collect`` turns the per-item scores of every seed into paired differences (PTG - baseline) of ROUGE-L, ROUGE-2
and METEOR per round, with a two-level bootstrap 95 % CI over test items and seeds (``ptg.stats``), and the
guidance's held-out pairwise accuracy with its CI, against chance and against a length heuristic. Writes
``metrics/bench/summary.json``, ``metrics/bench/table.md`` and ``metrics/bench/by_round.png``.

Run: ptg bench [--params configs/bench.yaml] [--seeds 0 1 2] [--jobs 3] [--dir build/bench] [--collect-only]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ptg import stats, tracking
from ptg.config import rounds as config_rounds
from ptg.io import atomic_path, read_json, write_json
from ptg.workspace import PACKAGE, copy_pipeline, dvc_env

log = logging.getLogger(__name__)

METRICS = ("rougeL", "rouge2", "meteor")
GITIGNORE = "/data/\n/mlflow.db\n/mlartifacts/\n/results/\n__pycache__/\n"


def _run(cmd: list[str], cwd: Path, threads: int | None = None) -> float:
    """Run ``cmd`` in ``cwd``; raises on failure, returns the CPU seconds (user + system) of it and of every process
    it waited for. The stages import the snapshot of src/ (PYTHONPATH comes before the editable install's path),
    track to the checkout's MLflow store, find the model wheel in the checkout's cache (experiments run in DVC's
    temporary copies) and, with ``threads``, use that many threads each."""
    env = tracking.child_env(None, base=dvc_env()) | {
        "PYTHONPATH": str(cwd / "src"), "PTG_CACHE": str(Path(os.environ.get("PTG_CACHE", ".cache")).resolve())}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_utime + usage.ru_stime


def setup_repo(params_file: Path, directory: Path) -> Path:
    """A git + DVC repository at ``directory`` holding the packaged pipeline, a snapshot of the installed ptg
    package as src/ptg, and ``params_file`` as its params.yaml (created once; the pipeline files, code and params
    are refreshed and committed on every call)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / ".git").is_dir():
        _run(["git", "init", "-q"], directory)
        _run(["git", "config", "user.email", "bench@ptg.local"], directory)
        _run(["git", "config", "user.name", "ptg bench"], directory)
        _run(["dvc", "init", "-q"], directory)
        _run(["dvc", "config", "core.analytics", "false"], directory)
        (directory / ".gitignore").write_text(GITIGNORE)
    elif not subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=directory,
                            capture_output=True).returncode:
        _run(["git", "reset", "-q", "--hard"], directory)  # experiments start from the committed snapshot
    copy_pipeline(directory, ("dvc.yaml", "stages"))
    code = directory / "src" / "ptg"
    if code.is_dir():
        shutil.rmtree(code)
    shutil.copytree(PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "template"))
    shutil.copy2(params_file, directory / "params.yaml")
    _run(["git", "add", "-A"], directory)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=directory).returncode:
        _run(["git", "commit", "-q", "-m", f"bench pipeline from {PACKAGE} with {params_file.name}"], directory)
    return directory


def _with_overrides(params: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``params`` with DVC-style ``key.sub=value`` overrides applied (values parsed as YAML), for the parent run."""
    out = json.loads(json.dumps(params))
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _snapshot(directory: Path) -> str:
    """The git tree of the repository's HEAD: the pipeline, the src/ snapshot and the bench params it runs."""
    return subprocess.run(["git", "rev-parse", "HEAD^{tree}"], cwd=directory, check=True, capture_output=True,
                          text=True).stdout.strip()


def _export_metrics(directory: Path, name: str, dest: Path) -> None:
    """The metrics/ folder of experiment ``bench-<name>`` of the repository's HEAD (its git commit) into ``dest``."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, check=True, capture_output=True,
                          text=True).stdout.strip()
    ref = f"refs/exps/{head[:2]}/{head[2:]}/bench-{name}"
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "metrics"], cwd=directory, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")


def run_experiment(directory: Path, name: str, overrides: list[str], targets: Sequence[str] = (),
                   threads: int | None = None) -> Path:
    """Run (or resume) the DVC experiment ``name`` with ``-S`` ``overrides`` (through ``targets``, all stages by
    default) from the bench params, in a temporary copy of the repository (``dvc exp run --temp``: experiments
    run side by side and never touch the workspace); copy its metrics to results/<name>/ and return that folder.
    ``threads``: torch threads of its stages (default: torch's own choice)."""
    out = directory / "results" / name
    params = (directory / "params.yaml").read_text()
    # What the results depend on: the code and bench params (the snapshot), this experiment's overrides, targets.
    tree = _snapshot(directory)
    key = hashlib.md5(json.dumps([tree, overrides, list(targets)]).encode())
    if (out / "seconds.json").is_file():
        if read_json(out / "seconds.json").get("key") == key.hexdigest():
            log.info("%s: done before, skipped", name)
            return out
        log.warning("%s: finished with other code, bench params or overrides; running it again", name)
    # The parent MLflow run records the experiment's own params (the workspace keeps the bench params).
    parent_params = directory / ".dvc" / "tmp" / f"bench-{name}.params.yaml"
    parent_params.write_text(yaml.safe_dump(_with_overrides(yaml.safe_load(params) or {}, overrides)))
    t0 = time.perf_counter()
    sets = [a for o in overrides for a in ("-S", o)]
    cpu = _run([sys.executable, "-m", "ptg.cli", "track", "--name", f"bench {name}", "--params",
                str(parent_params), "--", "dvc", "exp", "run", "--temp", "-n", f"bench-{name}", *sets, *targets],
               directory, threads)
    seconds = time.perf_counter() - t0
    with atomic_path(out) as tmp:
        _export_metrics(directory, name, tmp)
        write_json(tmp / "seconds.json", {"seconds": seconds, "cpu_seconds": cpu, "threads": threads,
                                          "overrides": overrides, "targets": list(targets), "tree": tree,
                                          "key": key.hexdigest()})
    log.info("%s: %.0f s wall, %.0f s CPU", name, seconds, cpu)
    return out


def run_all(directory: Path, experiments: Sequence[tuple[str, list[str], Sequence[str]]], jobs: int) -> None:
    """Run ``experiments`` ((name, overrides, targets)), ``jobs`` at a time, each stage with cores // jobs
    threads; the first failure is raised after the others finish (each resumes on the next call)."""
    jobs = max(1, min(jobs, len(experiments)))
    if jobs > 1:
        tracking.create_store()  # once, before experiments open runs side by side
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_experiment, directory, name, overrides, targets, threads)
                   for name, overrides, targets in experiments]
    for future in futures:
        future.result()


def seed_experiment(seed: int) -> tuple[str, list[str], Sequence[str]]:
    """The whole pipeline with ``seed``: results/seed-<seed>/."""
    return f"seed-{seed}", [f"seed={seed}"], ()


def _items(seed_dir: Path, arm: str, r: int) -> pd.DataFrame:
    folder = "rounds" if arm == "ptg" else "baseline"
    return pd.read_csv(seed_dir / "metrics" / folder / str(r) / "evaluate_items.csv")


# The arms beside PTG (the bench config's train_lm@r) and uniform MLE (its baseline), each the whole PTG chain with
# these train_lm overrides (issue #19): MLE + alpha x policy gradient on K on-policy samples with a leave-one-out
# baseline, the credit sequence-level (METEOR per sample) or token-level (the guidance's rewards). Same samples
# per update, same alpha, same budget: the credit assignment is the only difference between the two.
ARMS: tuple[tuple[str, ...], ...] = (
    ("mle-pg-sequence", "train_lm.contrast=0.0", "train_lm.pg_coeff=0.5", "train_lm.pg_credit=sequence"),
    ("mle-pg-token", "train_lm.contrast=0.0", "train_lm.pg_coeff=0.5", "train_lm.pg_credit=token"),
)


def arm_name(arm: str, seed: int) -> str:
    return f"arm-{arm}-s{seed}"


def arm_experiments(seeds: Sequence[int], arms: Sequence[Sequence[str]], last_round: int
                    ) -> list[tuple[str, list[str], Sequence[str]]]:
    """Every arm with every seed, through the last round's evaluation (its uniform-MLE baseline is the seed
    experiment's: the baseline stage reads none of the keys an arm overrides). Seed-major."""
    return [(arm_name(name, seed), [f"seed={seed}", *overrides], [f"evaluate@{last_round}"])
            for seed in seeds for name, *overrides in arms]


def arm_differences(directory: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]], r: int
                    ) -> list[dict[str, Any]]:
    """Round r of PTG and of every arm against uniform MLE on the same test items, paired over items and seeds
    (two-level bootstrap), over the seeds where both finished; and token- against sequence-level credit."""
    results = directory / "results"

    def done(name: str) -> bool:
        return (results / name / "seconds.json").is_file()

    runs = {"ptg": {s: results / f"seed-{s}" for s in seeds if done(f"seed-{s}")}}
    runs |= {name: {s: results / arm_name(name, s) for s in seeds if done(arm_name(name, s)) and done(f"seed-{s}")}
             for name, *_ in arms}
    base = {s: _items(results / f"seed-{s}", "baseline", r).set_index("id") for s in runs["ptg"]}
    arm_items = {name: {s: _items(d, "ptg", r).set_index("id") for s, d in by_seed.items()}
                 for name, by_seed in runs.items() if by_seed}

    def paired(a: dict[int, pd.DataFrame], b: dict[int, pd.DataFrame]) -> dict[str, Any]:
        common = sorted(set(a) & set(b))
        ids = sorted(set.intersection(*(set(a[s].index) & set(b[s].index) for s in common)))
        x = np.stack([a[s].loc[ids, "rougeL"].to_numpy(float) for s in common]) * 100
        y = np.stack([b[s].loc[ids, "rougeL"].to_numpy(float) for s in common]) * 100
        return {"seeds": common, "items": len(ids), "arm_score": float(x.mean()), "other": float(y.mean()),
                **stats.paired_bootstrap(x - y)}

    rows = [{"arm": name, "vs": "uniform MLE", **paired(items, base)} for name, items in arm_items.items()]
    if {"mle-pg-token", "mle-pg-sequence"} <= set(arm_items):
        rows.append({"arm": "mle-pg-token", "vs": "mle-pg-sequence",
                     **paired(arm_items["mle-pg-token"], arm_items["mle-pg-sequence"])})
    return rows


def round_differences(seed_dirs: list[Path], r: int) -> dict[str, Any]:
    """PTG - baseline on round r's test items for every metric (x100), paired over items and seeds."""
    ptg = [_items(d, "ptg", r).set_index("id") for d in seed_dirs]
    base = [_items(d, "baseline", r).set_index("id") for d in seed_dirs]
    ids = sorted(set.intersection(*(set(f.index) & set(b.index) for f, b in zip(ptg, base, strict=True))))
    out: dict[str, Any] = {"round": r, "items": len(ids), "seeds": len(seed_dirs)}
    for m in METRICS:
        a = np.stack([f.loc[ids, m].to_numpy(float) for f in ptg]) * 100
        b = np.stack([f.loc[ids, m].to_numpy(float) for f in base]) * 100
        out[m] = {"ptg": float(a.mean()), "baseline": float(b.mean())} | stats.paired_bootstrap(a - b)
    out["words"] = {"ptg": float(np.mean([f.loc[ids, "gen_len"].mean() for f in ptg])),
                    "baseline": float(np.mean([f.loc[ids, "gen_len"].mean() for f in base]))}
    return out


def guidance_accuracy(seed_dirs: list[Path], r: int) -> dict[str, Any]:
    """Held-out pairwise accuracy of round r's guidance over validation groups of every seed, with its CI, against
    chance and against ranking by length (direction chosen on the training groups)."""
    val, train = [], []
    for i, d in enumerate(seed_dirs):
        g = pd.read_csv(d / "metrics" / "rounds" / str(r) / "guidance_groups.csv")
        g["id"] = f"{i}:" + g["id"].astype(str)
        val.append(g[g["split"] == "validation"])
        train.append(g[g["split"] == "train"])
    return stats.guidance_vs_length(pd.concat(val, ignore_index=True), pd.concat(train, ignore_index=True))


def stage_seconds(seed_dirs: list[Path], r: int) -> dict[str, float]:
    """Mean seconds of round r's timed work over seeds (sampling, LM training of both arms)."""
    def mean(path: str) -> float:
        return float(np.mean([read_json(d / "metrics" / path)["seconds"] for d in seed_dirs]))
    return {"sample": mean(f"rounds/{r}/sample.json"), "train_lm": mean(f"rounds/{r}/train_lm.json"),
            "baseline_train_lm": mean(f"baseline/{r}/train_lm.json")}


def machine() -> dict[str, Any]:
    """The CPU (model, cores, the flags that decide fp32/bf16 speed) and, where CUDA is present, the GPU."""
    flags = set()
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        flags = {f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text}
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                     model)
    out: dict[str, Any] = {"cpu": model, "cores": os.cpu_count(), "flags": sorted(flags)}
    import torch

    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def collect(directory: Path, out: Path, seeds: list[int], arms: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """Statistics over the finished seeds of ``directory`` (and the ``arms``' last round against uniform MLE);
    writes summary.json, table.md and by_round.png."""
    seed_dirs = [directory / "results" / f"seed-{s}" for s in seeds if (directory / "results" / f"seed-{s}"
                                                                        / "seconds.json").is_file()]
    if not seed_dirs:
        raise FileNotFoundError(f"{directory}/results: no finished seed among {seeds}; run the bench first")
    rounds = sorted(int(p.name) for p in (seed_dirs[0] / "metrics" / "rounds").iterdir() if p.name.isdigit())
    summary: dict[str, Any] = {
        "seeds": [int(d.name.split("-")[1]) for d in seed_dirs], "machine": machine(),
        "seconds_per_seed": [read_json(d / "seconds.json")["seconds"] for d in seed_dirs],
        "cpu_seconds_per_seed": [read_json(d / "seconds.json").get("cpu_seconds") for d in seed_dirs], "rounds": []}
    for r in rounds:
        ev = [read_json(d / "metrics" / "rounds" / str(r) / "evaluate.json") for d in seed_dirs]
        summary["rounds"].append(round_differences(seed_dirs, r) | {
            "guidance": guidance_accuracy(seed_dirs, r), "seconds": stage_seconds(seed_dirs, r),
            **{k: _nanmean([e[k] for e in ev]) for k in ("reward_eos", "reward_other")}})
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


ABLATION_REFERENCE = "reference"
VALIDATION = "evaluate.split=validation"


def ablation_name(variant: str, seed: int) -> str:
    """The experiment of ``variant`` (``reference`` = the bench config) with ``seed``: results/abl-<variant>-s<seed>."""
    return f"abl-{variant}-s{seed}"


def ablation_experiments(seeds: Sequence[int], variants: list[list[str]]
                         ) -> list[tuple[str, list[str], Sequence[str]]]:
    """Round 1 of the bench config and of each variant (``[name, key=value, ...]``) with each of ``seeds``, the LMs
    scored on the *validation* split, so that settings are chosen without looking at test: the reference (the
    bench config, PTG and its baseline) and each variant (PTG only; compared with the same seed's reference PTG
    and baseline). Seed-major, so that with fewer jobs than experiments the first seed finishes first."""
    out: list[tuple[str, list[str], Sequence[str]]] = []
    for seed in seeds:
        out.append((ablation_name(ABLATION_REFERENCE, seed), [f"seed={seed}", VALIDATION], ["evaluate@1", "baseline"]))
        out += [(ablation_name(name, seed), [f"seed={seed}", VALIDATION, *overrides], ["evaluate@1"])
                for name, *overrides in variants]
    return out


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
        ptg = [_items(d, "ptg", 1).set_index("id") for d in dirs]
        ref_ptg = [_items(references[s], "ptg", 1).set_index("id") for s in seeds]
        ref_base = [_items(references[s], "baseline", 1).set_index("id") for s in seeds]
        ids = sorted(set.intersection(*(set(f.index) for f in ptg + ref_ptg + ref_base)))

        def scores(frames: list[pd.DataFrame], column: str = "rougeL", ids: list[str] = ids) -> np.ndarray:
            return np.stack([f.loc[ids, column].to_numpy(float) for f in frames])

        info = read_json(dirs[0] / "seconds.json")
        evals = [read_json(d / "metrics" / "rounds" / "1" / "evaluate.json") for d in dirs]
        rows.append({"variant": "bench config" if variant == ABLATION_REFERENCE else variant,
                     "overrides": [o for o in info["overrides"] if not o.startswith("seed=") and o != VALIDATION],
                     "seeds": seeds, "items": len(ids), "rougeL_ptg": float(scores(ptg).mean() * 100),
                     "rougeL_baseline": float(scores(ref_base).mean() * 100),
                     "vs_reference": stats.paired_bootstrap((scores(ptg) - scores(ref_ptg)) * 100),
                     "vs_baseline": stats.paired_bootstrap((scores(ptg) - scores(ref_base)) * 100),
                     "val_accuracy": guidance_accuracy(dirs, 1)["guidance"],
                     "words_ptg": float(scores(ptg, "gen_len").mean()),
                     "words_baseline": float(scores(ref_base, "gen_len").mean()),
                     "seconds": float(np.mean([read_json(d / "seconds.json")["seconds"] for d in dirs])),
                     **{k: _nanmean([e.get(k, float("nan")) for e in evals]) for k in ("reward_eos", "reward_other")}})
    write_json(out / "ablations.json", rows)
    lines = ["| variant | overrides | seeds | val ROUGE-L PTG | Δ vs bench config [95% CI] | Δ vs baseline [95% CI] "
             "| guidance val acc [95% CI] (pairs) | words PTG / base | reward EOS / other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["val_accuracy"]
        lines.append(f"| {r['variant']} | {' '.join(r['overrides']) or '—'} | {','.join(map(str, r['seeds']))} "
                     f"| {r['rougeL_ptg']:.2f} | {_ci(r['vs_reference'])} | {_ci(r['vs_baseline'])} "
                     f"| {a['accuracy']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] ({int(a['pairs'])}) "
                     f"| {r['words_ptg']:.1f} / {r['words_baseline']:.1f} "
                     f"| {r['reward_eos']:.3f} / {r['reward_other']:.3f} |")
    with atomic_path(out / "ablations.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return rows


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


def plot_curves(curves: dict[str, dict[int, list[tuple[int, float]]]], path: Path) -> Path:
    """Validation ROUGE-L against LM updates, one panel per seed, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({s for by_seed in curves.values() for s in by_seed})
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.4), squeeze=False)
    for ax, s in zip(axes[0], seeds, strict=True):
        for arm, by_seed in curves.items():
            if s in by_seed:
                u, v = zip(*by_seed[s], strict=True)
                ax.plot(u, v, "o-", ms=3, label=arm)
        ax.set(xlabel="LM updates", ylabel="validation ROUGE-L", title=f"seed {s}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _ci(d: dict[str, float]) -> str:
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def format_table(summary: dict[str, Any]) -> str:
    """The README table: per round, both arms and the paired difference with its 95 % CI."""
    lines = ["| round | items x seeds | ROUGE-L PTG / base | ΔROUGE-L [95% CI] | ΔROUGE-2 [95% CI] | ΔMETEOR [95% CI] "
             "| words PTG / base | guidance val acc [95% CI] (pairs) | length heuristic acc | guidance − length |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rounds"]:
        g = row["guidance"]
        acc, length, diff = g["guidance"], g["length"], g["guidance_minus_length"]
        lines.append(
            f"| {row['round']} | {row['items']} x {row['seeds']} | {row['rougeL']['ptg']:.2f} / "
            f"{row['rougeL']['baseline']:.2f} | {_ci(row['rougeL'])} | {_ci(row['rouge2'])} | {_ci(row['meteor'])} "
            f"| {row['words']['ptg']:.1f} / {row['words']['baseline']:.1f} "
            f"| {acc['accuracy']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] ({int(acc['pairs'])}) "
            f"| {length['accuracy']:.3f} | {diff['diff']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}] |")
    if summary.get("arms"):
        lines += ["", "| arm (last round) | against | items x seeds | ROUGE-L arm / other | Δ ROUGE-L [95% CI] |",
                  "|---|---|---|---|---|"]
        lines += [f"| {a['arm']} | {a['vs']} | {a['items']} x {len(a['seeds'])} | {a['arm_score']:.2f} / "
                  f"{a['other']:.2f} | {_ci(a)} |" for a in summary["arms"]]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rounds"]
    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for arm, style in (("ptg", "o-"), ("baseline", "s--")):
        axes[0].plot(rounds, [r["rougeL"][arm] for r in rows], style, label="PTG" if arm == "ptg" else "baseline")
    axes[0].set(xlabel="round", ylabel="ROUGE-L (test)", title="both arms")
    axes[0].legend()
    mean = np.array([r["rougeL"]["mean"] for r in rows])
    err = np.array([[m - r["rougeL"]["lo"], r["rougeL"]["hi"] - m] for m, r in zip(mean, rows, strict=True)]).T
    axes[1].errorbar(rounds, mean, yerr=err, fmt="o-", capsize=4)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(xlabel="round", ylabel="PTG − baseline ROUGE-L", title="paired difference, 95% CI")
    for ax in axes:
        ax.set_xticks(rounds)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(params: Path, directory: Path, out: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]], jobs: int,
        collect_only: bool = False, ablations: Sequence[Sequence[str]] = (),
        ablation_seeds: Sequence[int] | None = None, ablations_only: bool = False) -> None:
    """Set up (or reuse) the bench repository with ``params``, run what is missing (the seeds, every arm of
    ``arms`` with every seed, then round 1 of each ablation ``(NAME, KEY=VALUE, ...)`` with ``ablation_seeds``),
    collect the statistics into ``out``."""
    if not collect_only:
        setup_repo(params, directory)
        experiments = [] if ablations_only else [seed_experiment(seed) for seed in seeds]
        if not ablations_only:
            experiments += arm_experiments(seeds, arms, len(config_rounds(directory / "params.yaml")))
        if ablations:
            experiments += ablation_experiments(ablation_seeds or seeds[:1], ablations)
        # References first (the seeds' PTG and baseline, the ablations' reference), then what differs from them
        # only in LM training: those start once the references ahead of them have, and find the shared stages
        # (samples, rankings, guidance, baseline) in DVC's run cache instead of computing them again side by side.
        def is_reference(e: tuple[str, list[str], Sequence[str]]) -> bool:
            return e[0].startswith(("seed-", f"abl-{ABLATION_REFERENCE}-"))

        run_all(directory, sorted(experiments, key=lambda e: not is_reference(e)), jobs)
    if not ablations_only:
        collect(directory, out, seeds, arms)
    collect_ablations(directory, out)
