"""scripts/gpu_check.sh, the one prepared GPU check, in its dry mode on the CPU: every step runs (the CUDA tests
skip), the short round of configs/gpu.yaml at the quick profile's sizes completes, perf measures, and every figure
lands in the folder a device machine sends back."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_dry_on_the_cpu_and_writes_its_figures(tmp_path):
    out = tmp_path / "out"
    env = os.environ | {"OUT": str(out), "ROUND_DIR": str(tmp_path / "round"), "PY": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1100)
    steps = (out / "steps.txt").read_text() if (out / "steps.txt").is_file() else ""
    logs = {p.name: p.read_text()[-2000:] for p in out.glob("*.txt") if p.name != "steps.txt"}
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{logs}"
    names = [line.split(":")[0] for line in steps.splitlines()]
    assert names == ["card", "cuda_tests", "round", "round_metrics", "perf"] and "exit 0" in steps
    assert "gpu: none" in (out / "card.txt").read_text() or "device" in (out / "card.txt").read_text()
    assert "skipped" in (out / "cuda_tests.txt").read_text()  # no CUDA here: the CUDA tests skip, never fail
    round_ = json.loads((out / "round.json").read_text())["stages"]
    assert {"fit_guidance", "train_lm", "evaluate"} <= set(round_)
    perf = json.loads((out / "perf.json").read_text())
    assert perf["device"] == "cpu" and perf["sample"] and perf["train_lm"]
    assert len(list(out.iterdir())) <= 8 and not [p for p in out.iterdir() if p.is_dir()]  # what a device returns
