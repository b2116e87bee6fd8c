"""ptg as a user installs it: a wheel built from this checkout, installed without extras into a fresh virtual
environment as `make setup` installs (scripts/install.sh: uv, the versions constraints.txt pins, torch's CPU
build), runs `ptg quick` in one project folder and the pipeline's first stage, then a DVC experiment, in a second
project made by `ptg init`. Each project keeps its own MLflow store (mlflow.db at its root); nothing is written next
to the installed package, and no path is resolved from where ptg is installed except the packaged pipeline itself."""

import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-5000:]}"
    return done.stdout


def _runs(store: Path) -> list[tuple[str, str]]:
    """(run name, experiment name) of every run in an MLflow sqlite store."""
    with sqlite3.connect(store) as db:
        return db.execute("SELECT runs.name, experiments.name FROM runs JOIN experiments "
                          "ON runs.experiment_id = experiments.experiment_id").fetchall()


def test_a_wheel_in_a_fresh_venv_runs_quick_and_projects_keep_their_own_stores(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(REPO)], tmp_path, dict(os.environ))
    (wheel,) = dist.glob("ptg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"ptg/template/dvc.yaml", "ptg/template/params.yaml", "ptg/template/configs/quick.yaml",
                "ptg/template/stages/train_lm.py", "ptg/template/flows/ptg_flow.py"} <= names
        # The pipeline ships as files (the checkout's links followed), identical to the checkout's.
        assert archive.read("ptg/template/dvc.yaml") == (REPO / "dvc.yaml").read_bytes()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, dict(os.environ))
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI", "DVC_ROOT", "PTG_MLFLOW_PARENT_RUN_ID"}}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin"  # git, not .venv
    # As `make setup` installs (scripts/install.sh: uv, the pinned versions, torch's CPU build), the wheel alone.
    _run(["bash", str(REPO / "scripts" / "install.sh"), str(venv / "bin" / "python"), str(wheel)], tmp_path,
         env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}, timeout=1800)
    torch_build = _run(["python", "-c", "import torch; print(torch.__version__)"], tmp_path, env).strip()
    assert torch_build.endswith("+cpu"), torch_build  # never the multi-GB CUDA build
    installed = _run(["python", "-m", "pip", "list", "--format=freeze"], tmp_path, env)
    assert not [line for line in installed.splitlines() if line.lower().startswith("nvidia-")]
    assert "init" in _run(["ptg", "--help"], tmp_path, env) and "quick" in _run(["ptg", "--help"], tmp_path, env)
    # The core install has no Prefect (the `orchestration` extra): the command that needs it says so.
    done = subprocess.run(["ptg", "prefect-setup"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "pip install 'ptg[orchestration]'" in done.stderr
    package = Path(_run(["python", "-c", "import ptg, os; print(os.path.dirname(ptg.__file__))"], tmp_path,
                        env).strip())
    assert package.is_relative_to(venv)  # the wheel's ptg, not this checkout's

    # Project A: `ptg quick` (the whole pipeline on tiny models) in a temporary project folder.
    first = tmp_path / "first"
    first.mkdir()
    out = _run(["ptg", "quick"], first, env)
    assert "PTG vs baseline" in out
    quick = first / "build" / "quick"
    assert (quick / "src" / "ptg").resolve() == package  # DVC tracks the installed code
    assert (quick / "metrics" / "report" / "eval_by_round.csv").is_file()
    first_runs = _runs(quick / "mlflow.db")
    assert ("ptg quick", "ptg") in first_runs and ("train_lm@2", "ptg") in first_runs

    # Project B: `ptg init`, one stage, then a DVC experiment in a temporary copy: its run lands in B's store.
    second = tmp_path / "second"
    _run(["ptg", "init", str(second), "--params", str(package / "template" / "configs" / "quick.yaml")],
         tmp_path, env)
    _run(["ptg", "run", "prepare"], second, env)
    _run(["dvc", "exp", "run", "--temp", "prepare", "-S", "data.max_train=8", "-n", "fewer"], second, env)
    assert "fewer" in _run(["dvc", "exp", "show", "--no-pager", "--csv"], second, env)
    second_runs = _runs(second / "mlflow.db")
    assert sorted(name for name, _ in second_runs) == ["prepare", "prepare", "ptg run"]
    assert _runs(quick / "mlflow.db") == first_runs  # B wrote nothing into A's store
    leaked = [p for p in venv.rglob("*") if p.name in {"mlflow.db", "mlartifacts", "mlruns", "metrics", "data"}
              and p.is_relative_to(package)]
    assert not leaked
