"""Scratch DVC workspaces: run the pipeline with another params file without touching ``params.yaml``.

``make quick`` and Prefect flow runs with a non-default params file use one: a folder holding the pipeline
definition (dvc.yaml, stages/), the params file copied in as its params.yaml, a link to the library sources (so
DVC tracks the same code), and its own DVC repository, data/ and metrics/. ``dvc repro`` there is a real DVC run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIPELINE_FILES = ("dvc.yaml", "stages")


def make_workspace(params_file: str | Path, directory: str | Path, repo: Path = REPO) -> Path:
    """Create (or refresh) a DVC workspace at ``directory`` running ``repo``'s pipeline with ``params_file``.

    Re-running keeps its data/, metrics/ and DVC cache, so ``dvc repro`` there only redoes what changed.
    """
    params_file, directory = Path(params_file).resolve(), Path(directory).resolve()
    if not params_file.is_file():
        raise FileNotFoundError(f"params file {params_file} not found")
    directory.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        target = directory / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        (shutil.copytree if (repo / name).is_dir() else shutil.copy2)(repo / name, target)
    src = directory / "src"
    if not src.exists():
        src.symlink_to(repo / "src", target_is_directory=True)
    shutil.copy2(params_file, directory / "params.yaml")
    if not (directory / ".dvc").is_dir():
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=directory, check=True, env=dvc_env())
        subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=directory, check=True, env=dvc_env())
    return directory


def dvc_env() -> dict[str, str]:
    """Environment for DVC subprocesses: this interpreter's bin folder first on PATH (so `dvc` and the stages'
    `python` are this venv's), and no analytics ping (the machine may be offline)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m ptg.workspace PARAMS_FILE DIRECTORY")
    print(make_workspace(sys.argv[1], sys.argv[2]))
