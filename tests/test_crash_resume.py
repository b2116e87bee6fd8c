"""kill -9 of a stage process in the middle of its work: the next `dvc repro` completes, leaves no temporary
files, and every data output is byte-identical to an uninterrupted run's (dvc.lock's hashes; the metrics files,
which hold timings, are left out). The uninterrupted run is conftest's ``quick_pipeline`` (one torch thread, as
here). Each kill lands at a point of the stage's own progress, never after a timer: the test-only hook in
tests/pause_hook (``sitecustomize``) pauses the stage there and the test kills it while it waits."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, QUICK, REPO, run

from ptg.ops.workspace import make_workspace

pytestmark = pytest.mark.slow
HOOK = REPO / "tests" / "pause_hook"
# (stage command, where it is killed): mid-work (training, evaluation) and mid-write (an output written to its
# temporary path and not yet moved into place).
KILLED = (("sample.py --round 1", "ptg.io:atomic_path:exit"),
          ("fit_guidance.py --round 1", "ptg.io:atomic_path:exit"),
          ("train_lm.py --round 2", "ptg.lm.train:_micro_batch"),
          ("evaluate.py --round 1", "ptg.pipeline.evaluation:evaluate_lm"),
          ("baseline.py", "ptg.io:atomic_path:exit"))
ENV = {"PTG_TRACKING": "off", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _data_hashes(ws: Path) -> dict[str, str]:
    """md5 of every data output in dvc.lock (metrics and plots, with their timings, left out)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for st in lock.values() for out in st.get("outs", [])
            if out["path"].startswith("data/")}


def _killed_at(ws: Path, stage: str, at: str, marker: Path) -> None:
    """`dvc repro` in ``ws`` until ``stage`` reaches ``at`` and pauses there; kill -9 it; DVC must then fail."""
    env = os.environ | ENV | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")])),
                              "PTG_PAUSE_STAGE": f"stages/{stage}", "PTG_PAUSE_AT": at,
                              "PTG_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen(["dvc", "repro"], cwd=ws, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not marker.is_file():
            assert proc.poll() is None, f"dvc repro ended before stages/{stage} reached {at}"
            assert time.monotonic() < deadline, f"stages/{stage} never reached {at}"
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        assert proc.wait(timeout=300) != 0, f"dvc repro succeeded although stages/{stage} was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        marker.unlink(missing_ok=True)


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_kill_9_inside_any_stage_then_repro_gives_the_uninterrupted_outputs(quick_pipeline, tmp_path):
    ws = make_workspace(QUICK, tmp_path / "killed")
    for stage, at in KILLED:
        _killed_at(ws, stage, at, tmp_path / "paused")
        if at.endswith(":exit"):  # killed mid-write: what it wrote waits beside the output, never at its path
            assert [p for p in (ws / "data").rglob("*") if ".tmp-" in p.name]
    run(["dvc", "repro"], ws, env=ENV)
    leftovers = [p for p in (ws / "data").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
    killed, uninterrupted = _data_hashes(ws), _data_hashes(quick_pipeline)
    differing = sorted(k for k in killed if killed[k] != uninterrupted.get(k))
    assert killed == uninterrupted, {k: (_listing(ws / k), _listing(quick_pipeline / k)) for k in differing
                                     if (ws / k).is_dir()}
