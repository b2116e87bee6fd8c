"""DVC experiments in a bench repository of their own: the repository (the pipeline, a snapshot of the code, the
bench params), experiments run side by side and resumed (``dvc exp run --temp``, each under an MLflow parent
run, CPU seconds measured), their results exported, and the summarisation bench's plan (seeds, arms, ablations).
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

import pandas as pd
import yaml

from ptg import pipeline, tracking
from ptg.io import atomic_path, read_json, write_json
from ptg.ops.perf_round import cpu_seconds
from ptg.ops.workspace import PACKAGE, commit, copy_pipeline, dvc_env, init_repo

log = logging.getLogger(__name__)

GITIGNORE = "/data/\n/mlflow.db\n/mlartifacts/\n/results/\n__pycache__/\n"
Experiment = tuple[str, list[str], Sequence[str]]  # (name, -S overrides, targets: all stages when empty)


def run_tracked(cmd: list[str], cwd: Path, threads: int | None = None) -> float:
    """Run ``cmd`` in ``cwd``; raises on failure, returns the CPU seconds (user + system) of it and of every process
    it waited for. The stages import the snapshot of src/ (PYTHONPATH comes before the editable install's path),
    track to the checkout's MLflow store, find the model wheel in the checkout's cache (experiments run in DVC's
    temporary copies) and, with ``threads``, use that many threads each."""
    env = tracking.child_env(None, base=dvc_env()) | {
        "PYTHONPATH": str(cwd / "src"), "PTG_CACHE": str(Path(os.environ.get("PTG_CACHE", ".cache")).resolve())}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return cpu_seconds(cmd, cwd, env)


def setup_repo(params_file: Path, directory: Path) -> Path:
    """A git + DVC repository at ``directory`` holding the packaged pipeline, a snapshot of the installed ptg
    package as src/ptg, and ``params_file`` as its params.yaml (created once; the pipeline files, code and params
    are refreshed and committed on every call)."""
    directory.mkdir(parents=True, exist_ok=True)
    existed = (directory / ".git").is_dir()
    init_repo(directory, git=True, gitignore=GITIGNORE)
    if existed and not subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=directory,
                                      capture_output=True).returncode:
        subprocess.run(["git", "reset", "-q", "--hard"], cwd=directory, check=True)  # start from the snapshot
    copy_pipeline(directory, ("dvc.yaml", "stages"))
    code = directory / "src" / "ptg"
    if code.is_dir():
        shutil.rmtree(code)
    shutil.copytree(PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "template"))
    shutil.copy2(params_file, directory / "params.yaml")
    commit(directory, ["."], f"bench pipeline from {PACKAGE} with {params_file.name}")
    return directory


def with_overrides(params: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
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


def snapshot(directory: Path) -> str:
    """The git tree of the repository's HEAD: the pipeline, the src/ snapshot and the bench params it runs."""
    return subprocess.run(["git", "rev-parse", "HEAD^{tree}"], cwd=directory, check=True, capture_output=True,
                          text=True).stdout.strip()


def export_metrics(directory: Path, name: str, dest: Path) -> None:
    """The metrics/ folder of experiment ``bench-<name>`` of the repository's HEAD (its git commit) into ``dest``."""
    from dvc.repo.experiments.refs import ExpRefInfo

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, check=True, capture_output=True,
                          text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", str(ExpRefInfo(head, f"bench-{name}")), "metrics"],
                             cwd=directory, check=True, capture_output=True).stdout
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
    tree = snapshot(directory)
    key = hashlib.md5(json.dumps([tree, overrides, list(targets)]).encode())
    if (out / "seconds.json").is_file():
        if read_json(out / "seconds.json").get("key") == key.hexdigest():
            log.info("%s: done before, skipped", name)
            return out
        log.warning("%s: finished with other code, bench params or overrides; running it again", name)
    # The parent MLflow run records the experiment's own params (the workspace keeps the bench params).
    parent_params = directory / ".dvc" / "tmp" / f"bench-{name}.params.yaml"
    parent_params.write_text(yaml.safe_dump(with_overrides(yaml.safe_load(params) or {}, overrides)))
    t0 = time.perf_counter()
    sets = [a for o in overrides for a in ("-S", o)]
    # --wait-for-lock: experiments starting side by side take the repository's lock in turn (without it, the one
    # that asks second fails at once: "Unable to acquire lock").
    cpu = run_tracked([sys.executable, "-m", "ptg.cli", "track", "--name", f"bench {name}", "--params",
                       str(parent_params), "--", "dvc", "--wait-for-lock", "exp", "run", "--temp", "-n",
                       f"bench-{name}", *sets, *targets], directory, threads)
    seconds = time.perf_counter() - t0
    with atomic_path(out) as tmp:
        export_metrics(directory, name, tmp)
        write_json(tmp / "seconds.json", {"seconds": seconds, "cpu_seconds": cpu, "threads": threads,
                                          "overrides": overrides, "targets": list(targets), "tree": tree,
                                          "key": key.hexdigest()})
    log.info("%s: %.0f s wall, %.0f s CPU", name, seconds, cpu)
    return out


def run_all(directory: Path, experiments: Sequence[Experiment], jobs: int) -> None:
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


def finished(results: Path, name: str) -> bool:
    """Whether experiment ``name`` finished (its results/<name>/seconds.json is written last)."""
    return (results / name / "seconds.json").is_file()


def evaluate_items(run: Path, r: int, baseline: bool = False) -> pd.DataFrame:
    """Round r's per-item evaluation (evaluate_items.csv) of the PTG arm (or the baseline) of a finished run."""
    metrics = pipeline.baseline_metrics(r, "evaluate") if baseline else pipeline.round_metrics(r, "evaluate")
    return pd.read_csv(run / metrics.with_name("evaluate_items.csv"))


def machine() -> dict[str, Any]:
    """The CPU (model, cores, the flags that decide fp32/bf16 speed) and, where CUDA is present, the GPU."""
    import torch

    from ptg.lm.precision import cpu_info

    model, flags = cpu_info()
    out: dict[str, Any] = {"cpu": model or platform.processor(), "cores": os.cpu_count(),
                           "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def seed_experiment(seed: int) -> Experiment:
    """The whole pipeline with ``seed``: results/seed-<seed>/."""
    return f"seed-{seed}", [f"seed={seed}"], ()


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
                    ) -> list[Experiment]:
    """Every arm with every seed, through the last round's evaluation (its uniform-MLE baseline is the seed
    experiment's: the baseline stage reads none of the keys an arm overrides). Seed-major."""
    return [(arm_name(name, seed), [f"seed={seed}", *overrides], [f"evaluate@{last_round}"])
            for seed in seeds for name, *overrides in arms]


ABLATION_REFERENCE = "reference"
VALIDATION = "evaluate.split=validation"


def ablation_name(variant: str, seed: int) -> str:
    """The experiment of ``variant`` (``reference`` = the bench config) with ``seed``: results/abl-<variant>-s<seed>."""
    return f"abl-{variant}-s{seed}"


def ablation_experiments(seeds: Sequence[int], variants: list[list[str]]
                         ) -> list[Experiment]:
    """Round 1 of the bench config and of each variant (``[name, key=value, ...]``) with each of ``seeds``, the LMs
    scored on the *validation* split, so that settings are chosen without looking at test: the reference (the
    bench config, PTG and its baseline) and each variant (PTG only; compared with the same seed's reference PTG
    and baseline). Seed-major, so that with fewer jobs than experiments the first seed finishes first."""
    out: list[Experiment] = []
    for seed in seeds:
        out.append((ablation_name(ABLATION_REFERENCE, seed), [f"seed={seed}", VALIDATION], ["evaluate@1", "baseline"]))
        out += [(ablation_name(name, seed), [f"seed={seed}", VALIDATION, *overrides], ["evaluate@1"])
                for name, *overrides in variants]
    return out
