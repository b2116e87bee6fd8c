"""Scratch DVC workspaces: run the pipeline with another params file without touching ``params.yaml``.

``make quick`` and Prefect flow runs with a non-default params file use one: a folder holding the pipeline
definition (dvc.yaml, stages/), the params file copied in as its params.yaml, a link to the library sources (so
DVC tracks the same code), and its own DVC repository, data/ and metrics/. ``dvc repro`` there is a real DVC run.

``workspace_lock`` keeps two runs out of one workspace: DVC locks the repository for one ``dvc repro``, but a
Prefect flow runs one ``dvc repro`` per stage and refreshes the workspace first, so a second flow could slip in
between two stages. The lock is an exclusive ``flock`` on ``<workspace>/.ptg-run.lock`` (taken before the workspace
is refreshed), released by the kernel when its process ends, ``kill -9`` included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIPELINE_FILES = ("dvc.yaml", "stages")
LOCK_FILE = ".ptg-run.lock"


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


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace."""


@contextlib.contextmanager
def workspace_lock(directory: str | Path) -> Iterator[Path]:
    """Hold ``directory`` for this process, or fail at once with who holds it (never waits)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise WorkspaceBusy(f"{directory}: another run holds this workspace ({holder}); wait for it to finish "
                                f"or run in another workspace (--workdir)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield directory
    finally:
        os.close(fd)  # releases the lock


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
