"""`ptg perf --bench-round`: what one bench round costs, stage by stage, for this code or another checkout's.

Round 1 of a bench params file (the checkout's ``configs/bench.yaml``) runs in a scratch folder the way DVC runs it,
one process per stage: ``prepare``, ``base_model`` and ``preferences`` first (set-up, reported apart), then the
round's stages (``ROUND_STAGES``: sample@1, rank@1, fit_guidance@1, train_lm@1, evaluate@1 and the baseline).
Each stage's cost is its CPU seconds (user + system, the process and every child it waited for) and its wall
seconds; the md5 of every file under data/ is kept, so two runs' artifacts compare byte for byte.

``compare`` runs two checkouts (the old code and this one) alternately on the same machine, each with its own
stage scripts, library (``PYTHONPATH``) and bench params, and reports each stage's CPU-second ratio new / old.
Run: ptg perf --bench-round [--compare OLD_CHECKOUT] [--repeats N] [--threads N]
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SETUP_STAGES = ("prepare", "base_model", "preferences")
ROUND_STAGES = ("sample", "rank", "fit_guidance", "train_lm", "evaluate", "baseline")
BENCH_PARAMS = Path("configs") / "bench.yaml"


def cpu_seconds(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run ``cmd`` in ``cwd``; raises on failure, returns the CPU seconds (user + system) of it and of every process
    it waited for."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_utime + usage.ru_stime


def stage_command(checkout: Path, stage: str, r: int = 1) -> list[str]:
    """The command dvc.yaml of ``checkout`` runs for ``stage`` (round ``r`` of a per-round one), in one process
    (``${launcher}`` is python), with this interpreter."""
    spec = yaml.safe_load((checkout / "dvc.yaml").read_text())["stages"][stage]
    cmd = spec.get("do", spec)["cmd"].replace("${key}", str(r)).replace("${launcher}", "python")
    words = cmd.split()
    if words[0] != "python" or any("${" in w for w in words):
        raise ValueError(f"{checkout / 'dvc.yaml'}: stage {stage}: cannot run {cmd!r} outside DVC")
    return [sys.executable, *words[1:]]


def file_md5s(root: Path) -> dict[str, str]:
    """md5 of every file under ``root``, by path relative to it."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_round(checkout: Path, directory: Path, threads: int | None = None, params_file: Path = BENCH_PARAMS,
              precision: str | None = None) -> dict[str, Any]:
    """Round 1 of ``checkout``'s ``params_file`` (its bench params; ``precision`` in place of its own) in
    ``directory`` (emptied first), one process per stage; returns {"stages": {stage: {"cpu_s", "wall_s"}},
    "data_md5": {path: md5}}."""
    checkout = checkout.resolve()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    shutil.copytree(checkout / "stages", directory / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((checkout / params_file).read_text())
    params |= {"progress": False} | ({"precision": precision} if precision else {})
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = os.environ | {"PYTHONPATH": str(checkout / "src"), "PTG_TRACKING": "off",
                        "PTG_CACHE": str(Path(os.environ.get("PTG_CACHE", ".cache")).resolve())}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    stages: dict[str, dict[str, float]] = {}
    for stage in (*SETUP_STAGES, *ROUND_STAGES):
        t0 = time.perf_counter()
        cpu = cpu_seconds(stage_command(checkout, stage), directory, env)
        stages[stage] = {"cpu_s": cpu, "wall_s": time.perf_counter() - t0}
        log.info("%s: %s %.1f CPU-s, %.1f s wall", checkout.name, stage, cpu, stages[stage]["wall_s"])
    return {"checkout": str(checkout), "stages": stages, "data_md5": file_md5s(directory / "data")}


def round_cpu(result: dict[str, Any]) -> float:
    """CPU seconds of the round's stages (set-up excluded)."""
    return sum(result["stages"][s]["cpu_s"] for s in ROUND_STAGES)


def compare(old: Path, new: Path, work: Path, repeats: int = 1, threads: int | None = None,
            precision: str | None = None, params_file: Path = BENCH_PARAMS) -> dict[str, Any]:
    """``old`` and ``new`` checkouts' bench rounds, alternating (old, new, old, new, ...), ``repeats`` each; per
    stage the lowest CPU seconds of each and the ratio new / old, the round's total, and which data files differ."""
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for i in range(repeats):
        for name, checkout in (("old", old), ("new", new)):
            runs[name].append(run_round(checkout, work / f"round-{name}", threads, params_file, precision))
            log.info("%s run %d: round %.0f CPU-s", name, i + 1, round_cpu(runs[name][-1]))
    best = {name: {s: min(r["stages"][s]["cpu_s"] for r in rs) for s in (*SETUP_STAGES, *ROUND_STAGES)}
            for name, rs in runs.items()}
    md5 = {name: rs[-1]["data_md5"] for name, rs in runs.items()}
    differ = sorted(p for p in md5["old"].keys() | md5["new"].keys() if md5["old"].get(p) != md5["new"].get(p))
    total = {name: sum(b[s] for s in ROUND_STAGES) for name, b in best.items()}
    return {"old": str(old.resolve()), "new": str(new.resolve()), "repeats": repeats, "threads": threads,
            "precision": precision or "each checkout's",
            "cpu_s": best, "ratio": {s: best["new"][s] / best["old"][s] for s in best["new"]},
            "round_cpu_s": total, "round_ratio": total["new"] / total["old"], "data_files_differ": differ,
            "runs": runs}


def format_comparison(result: dict[str, Any], target: float = 0.5) -> str:
    lines = ["| stage | old CPU-s | new CPU-s | new / old |", "|---|---|---|---|"]
    for stage in (*SETUP_STAGES, *ROUND_STAGES):
        lines.append(f"| {stage}{' (set-up)' if stage in SETUP_STAGES else ''} | {result['cpu_s']['old'][stage]:.0f} "
                     f"| {result['cpu_s']['new'][stage]:.0f} | {result['ratio'][stage]:.2f} |")
    lines.append(f"| **the round** ({', '.join(ROUND_STAGES)}) | {result['round_cpu_s']['old']:.0f} "
                 f"| {result['round_cpu_s']['new']:.0f} | **{result['round_ratio']:.2f}** (target <= {target}) |")
    differ = result["data_files_differ"]
    same = "identical" if not differ else f"{len(differ)} files differ: " + ", ".join(differ[:8])
    lines.append(f"data artifacts: {same}")
    return "\n".join(lines)


def checkout_of(repo: Path, rev: str, directory: Path) -> Path:
    """A git worktree of ``repo`` at ``rev`` in ``directory`` (added once, moved to ``rev`` on every call)."""
    if not (directory / ".git").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(directory), rev], cwd=repo, check=True,
                       capture_output=True)
    subprocess.run(["git", "checkout", "-q", "--detach", rev], cwd=directory, check=True)
    return directory
