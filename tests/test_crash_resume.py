"""kill -9 of a stage process in the middle of its work: the next `dvc repro` completes, leaves no temporary
files, and every data output is byte-identical to an uninterrupted run's (dvc.lock's hashes; the metrics files,
which hold timings, are left out)."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_pipeline import BIN, run

from ptg.workspace import make_workspace

pytestmark = pytest.mark.slow
KILLED = ("sample.py --round 1", "fit_guidance.py --round 1", "train_lm.py --round 2", "evaluate.py --round 1",
          "baseline.py")


def _stage_pids(ws: Path, needles: tuple[str, ...]) -> dict[str, int]:
    """The pid of each process running ``stages/<needle>`` in ``ws``, for the needles running now."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if os.readlink(d / "cwd") != str(ws):
                continue
        except OSError:
            continue
        found |= {n: int(d.name) for n in needles if f"stages/{n}" in cmd}
    return found


def _data_hashes(ws: Path) -> dict[str, str]:
    """md5 of every data output in dvc.lock (metrics and plots, with their timings, left out)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for st in lock.values() for out in st.get("outs", [])
            if out["path"].startswith("data/")}


def _repro(ws: Path) -> subprocess.Popen:
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PTG_TRACKING": "off",
                        "DVC_NO_ANALYTICS": "1"}
    return subprocess.Popen(["dvc", "repro"], cwd=ws, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _timed_repro(ws: Path) -> dict[str, float]:
    """An uninterrupted `dvc repro` in ``ws``; returns how long each KILLED stage's process ran (seconds, as
    polled), so that a kill can land inside the stage on this machine however fast it is."""
    proc, seen = _repro(ws), {}
    while proc.poll() is None:
        now = time.monotonic()
        for needle in _stage_pids(ws, KILLED):
            seen[needle] = (seen.get(needle, (now,))[0], now)
        time.sleep(0.02)
    assert proc.returncode == 0, "the uninterrupted dvc repro failed"
    assert set(seen) == set(KILLED), f"never saw {sorted(set(KILLED) - set(seen))} run"
    return {needle: last - first for needle, (first, last) in seen.items()}


def _killed_mid_stage(ws: Path, needle: str, delay: float) -> None:
    proc = _repro(ws)
    deadline = time.monotonic() + 600
    while (pid := _stage_pids(ws, (needle,)).get(needle)) is None:
        assert proc.poll() is None, f"dvc repro ended before stages/{needle} ran"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0, f"stages/{needle} finished before the kill {delay:.2f} s in"


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_kill_9_inside_any_stage_then_repro_gives_the_uninterrupted_outputs(tmp_path, monkeypatch):
    # One torch thread in both workspaces: "byte-identical" then holds whatever else loads the machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reference = make_workspace(REPO / "configs" / "quick.yaml", tmp_path / "reference")
    durations = _timed_repro(reference)
    ws = make_workspace(REPO / "configs" / "quick.yaml", tmp_path / "killed")
    rng = random.Random(0)
    for needle in KILLED:
        # Somewhere inside the stage (model load, the work, or the write), drawn from its own measured length.
        _killed_mid_stage(ws, needle, rng.uniform(0.15, 0.75) * durations[needle])
    run(["dvc", "repro"], ws)
    leftovers = [p for p in (ws / "data").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
    killed, uninterrupted = _data_hashes(ws), _data_hashes(reference)
    differing = sorted(k for k in killed if killed[k] != uninterrupted.get(k))
    assert killed == uninterrupted, {k: (_listing(ws / k), _listing(reference / k)) for k in differing
                                     if (ws / k).is_dir()}
