"""DVC projects of the ptg pipeline: ``ptg init`` for a user's project, and scratch workspaces that run the
pipeline with another params file without touching ``params.yaml`` (``ptg quick``, Prefect runs with a non-default
params file, the tests).

The pipeline definition ships inside the package (``ptg/template/``: dvc.yaml, params.yaml, stages/, configs/,
flows/, prefect.yaml; in a checkout these are links to the checkout's own files, and a wheel carries copies), so a
project works the same from a checkout, an editable install or a wheel. A project is a folder holding copies of
those files, ``src/ptg`` as a link to the installed package (so DVC's deps on ``src/ptg/*.py`` track the code that
runs), its params file as params.yaml, and its own DVC repository, data/, metrics/ and MLflow store (``mlflow.db``
at the project root, ``ptg.tracking.tracking_uri``): two projects sharing one environment never share runs.

``param_overrides`` / ``write_overrides`` set a run's top-level params (rounds, launcher) in a workspace's
params.yaml. ``workspace_lock`` keeps two runs out of one workspace: DVC locks the repository for one ``dvc
repro``, but a Prefect flow runs one ``dvc repro`` per stage and refreshes the workspace first, so a second flow
could slip in between two stages. The lock is an exclusive ``flock`` on ``<workspace>/.ptg-run.lock`` (taken
before the workspace is refreshed), released by the kernel when its process ends, ``kill -9`` included;
``workspace_slot`` queues Prefect deployment runs of one workspace behind each other (a global concurrency limit
per workspace).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGE = Path(str(importlib.resources.files("ptg")))  # the installed package; in a checkout, its src/ptg
TEMPLATE = PACKAGE / "template"
PIPELINE_FILES = ("dvc.yaml", "stages", "configs", "flows", "prefect.yaml")
CODE_LINK = Path("src") / "ptg"
LOCK_FILE = ".ptg-run.lock"
# src/ptg (the code link) is committed: `dvc exp run --temp` copies only what git tracks.
# A deployment run holds its workspace's slot under a lease it renews every 3/4 of this; a run killed with its
# worker frees the slot when the lease expires (the server checks every 15 s). 60 s is the server's minimum.
SLOT_LEASE_S = 60
GITIGNORE = "/mlflow.db\n/mlartifacts/\n/build/\n/.cache/\n.ptg-run.lock\n__pycache__/\n"


def template_file(name: str | Path) -> Path:
    """A file of the packaged pipeline, e.g. ``template_file("configs/quick.yaml")``."""
    path = TEMPLATE / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: not in the ptg package's pipeline template (installed from an "
                                f"incomplete wheel?); it has {sorted(p.name for p in TEMPLATE.iterdir())}")
    return path


def copy_pipeline(directory: Path, names: tuple[str, ...] = PIPELINE_FILES) -> None:
    """Replace ``directory``'s pipeline files with the packaged ones (``__pycache__`` left out)."""
    for name in names:
        source, target = template_file(name), directory / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def link_code(directory: Path) -> None:
    """``directory/src/ptg`` -> the installed package, so DVC's deps on ``src/ptg/*.py`` are the code that runs."""
    src, link = directory / "src", directory / CODE_LINK
    if src.is_symlink():  # a workspace made before src/ptg was its own link
        src.unlink()
    src.mkdir(exist_ok=True)
    if link.is_symlink() and link.resolve() == PACKAGE:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        raise FileExistsError(f"{link} is a folder; a ptg project links it to the installed package ({PACKAGE})")
    link.symlink_to(PACKAGE, target_is_directory=True)


def make_workspace(params_file: str | Path | None, directory: str | Path, git: bool = False) -> Path:
    """Create (or refresh) a DVC project at ``directory`` running the packaged pipeline with ``params_file`` as
    its params.yaml (None: the packaged default params.yaml, kept if the project already has one).

    Re-running keeps its data/, metrics/, DVC cache and MLflow store, so ``dvc repro`` there only redoes what
    changed. ``git``: a git repository too (``git init`` unless ``directory`` already is one, and the pipeline
    committed), so ``dvc exp run`` works; without it, DVC runs without SCM.
    """
    directory = Path(directory).resolve()
    if (directory / "dvc.yaml").resolve() == template_file("dvc.yaml").resolve():
        raise ValueError(f"{directory} is the checkout ptg runs from: its pipeline files are the template itself. "
                         f"Run the pipeline there with `ptg run`, or make a project in another folder")
    if params_file is not None:
        params_file = Path(params_file).resolve()
        if not params_file.is_file():
            raise FileNotFoundError(f"params file {params_file} not found")
    directory.mkdir(parents=True, exist_ok=True)
    copy_pipeline(directory)
    link_code(directory)
    if params_file is not None:
        shutil.copy2(params_file, directory / "params.yaml")
    elif not (directory / "params.yaml").is_file():
        shutil.copy2(template_file("params.yaml"), directory / "params.yaml")
    init_repo(directory, git)
    if git:
        # Only what this call wrote is committed: the user's own changes (data, params edits) stay theirs.
        paths = [*PIPELINE_FILES, str(CODE_LINK), ".gitignore", ".dvc", ".dvcignore"]
        if params_file is not None or not _tracked(directory, "params.yaml"):
            paths.append("params.yaml")
        commit(directory, paths, "ptg pipeline")
    return directory


# DVC's cache.type of a new project: outputs hard-linked to the cache where the file system allows, else copied.
# Not reflink first: DVC (3.67, dvc/output.py commit) links a directory output's files back only when hardlink is
# the first type, so "reflink,hardlink,copy" left every model folder a second copy on ext4.
CACHE_TYPES = "hardlink,copy"


def init_repo(directory: Path, git: bool, gitignore: str = GITIGNORE) -> None:
    """A DVC repository at ``directory`` (and, with ``git``, a git one with ``gitignore`` as its .gitignore),
    unless it is one already; DVC's analytics off (the machine may be offline), outputs linked to the cache
    (``CACHE_TYPES``)."""
    if git and shutil.which("git") is None:
        raise FileNotFoundError("git not found on PATH: install it, or make the project without (`--no-git`; then "
                                "`dvc exp` is not available there)")
    if git and not (directory / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=directory, check=True)
    if not (directory / ".dvc").is_dir():
        subprocess.run(["dvc", "init", "-q", *([] if git else ["--no-scm"])], cwd=directory, check=True,
                       env=dvc_env())
        # DVC's analytics off, and outputs hard-linked to the cache where the file system allows (a copy where it
        # does not): a default run's 3 GB of models are stored once, not twice. Linked outputs are read-only; ptg
        # replaces an output (a temporary beside it, then a rename), never edits one in place.
        from dvc.config import Config

        with Config(dvc_dir=str(directory / ".dvc")).edit("repo") as conf:
            conf["core"]["analytics"] = False
            conf["cache"]["type"] = CACHE_TYPES
    if git and not (directory / ".gitignore").is_file():
        (directory / ".gitignore").write_text(gitignore)


def commit(directory: Path, paths: list[str], message: str) -> None:
    """Stage ``paths`` of the git repository ``directory`` and commit them if they changed: as the user's git
    identity when one is set, else as ptg (``dvc exp`` needs a commit to start from)."""
    subprocess.run(["git", "add", "--", *paths], cwd=directory, check=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=directory).returncode:
        who = [] if subprocess.run(["git", "config", "user.email"], cwd=directory, capture_output=True
                                   ).returncode == 0 else ["-c", "user.name=ptg", "-c", "user.email=ptg@localhost"]
        subprocess.run(["git", *who, "commit", "-q", "-m", message, "--", *paths], cwd=directory, check=True)


def param_overrides(rounds: int | None = None, launcher: str | None = None) -> dict[str, Any]:
    """The top-level params.yaml values a run's options set (none for an option left at None): ``rounds`` as the
    chain 1..N in the format ptg.config reads, ``launcher`` as given (checked by ``write_overrides``)."""
    overrides: dict[str, Any] = {}
    if rounds is not None:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1; got {rounds}")
        overrides["rounds"] = {str(r): {"prev": r - 1} for r in range(1, rounds + 1)}
    if launcher is not None:
        overrides["launcher"] = launcher
    return overrides


# The quick profile's sizes (configs/quick.yaml): its tiny models and its budgets, as (group, key).
QUICK_SIZES = [("model", k) for k in ("policy", "guidance", "guidance_layers", "max_prompt_tokens",
                                      "max_target_tokens")] + \
    [("data", k) for k in ("max_train", "max_validation", "max_test", "max_input_chars")] + \
    [("sample", k) for k in ("max_new_tokens", "batch_size", "train_inputs", "validation_inputs")] + \
    [("fit_guidance", k) for k in ("lr", "batch_groups", "max_updates", "eval_every", "head_hidden")] + \
    [("train_lm", k) for k in ("lr", "batch_size", "grad_accum", "max_updates", "eval_every")] + \
    [("evaluate", k) for k in ("max_new_tokens", "batch_size", "subset_items")]


def at_quick_sizes(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (a params.yaml's values) at the quick profile's sizes: its tiny models and budgets, one round;
    everything else (task, data source, objectives, precision, device) as ``params`` says. A smoke test of a
    params file: what runs is that file's pipeline, small."""
    import yaml

    quick = yaml.safe_load(template_file("configs/quick.yaml").read_text())
    out = {group: dict(values) if isinstance(values, dict) else values for group, values in params.items()}
    for group, key in QUICK_SIZES:
        out.setdefault(group, {})[key] = quick[group][key]
    return out | param_overrides(rounds=1) | {"progress": False}


def write_overrides(directory: Path, overrides: dict[str, Any]) -> Path:
    """Set the top-level ``overrides`` in ``directory``'s params.yaml, atomically; a bad value raises naming the
    file, key and value and leaves the file as it was. Returns the params file."""
    import yaml

    from ptg.config import load
    from ptg.io import atomic_path

    path = Path(directory) / "params.yaml"
    values = yaml.safe_load(path.read_text())
    values.update(overrides)
    load(path, values)  # the launcher and rounds, with every group
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _tracked(directory: Path, path: str) -> bool:
    return subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=directory,
                          capture_output=True).returncode == 0


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


def workspace_limit_name(root: Path) -> str:
    """The global concurrency limit of workspace ``root``: one per resolved path (a limit name cannot hold '/')."""
    root = Path(root).resolve()
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", root.name)[:40]
    return f"ptg-workspace-{stem}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def workspace_slot(root: Path) -> Iterator[None]:
    """For a Prefect deployment run: wait for, then hold, the one slot of ``root``'s global concurrency limit, so a
    second deployment run for the same workspace queues behind the first (runs for other workspaces do not). The
    limit (limit 1) is created here when missing: Prefect never creates one on acquisition (with ``strict=False``
    it only warns and runs unlimited), hence ``strict=True``. Other runs (``python flows/ptg_flow.py``, a flow
    called in Python) skip this and rely on ``workspace_lock`` alone."""
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency
    from prefect.context import FlowRunContext
    from prefect.exceptions import ObjectAlreadyExists

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.deployment_id is None:
        yield
        return
    name = workspace_limit_name(root)
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    get_run_logger().info(f"Waiting for the slot of global concurrency limit {name!r} (workspace {root})")
    # A failed lease renewal (a busy server) does not stop the run: the file lock still keeps others out.
    with concurrency(name, occupy=1, lease_duration=SLOT_LEASE_S, strict=True, raise_on_lease_renewal_failure=False,
                     holder=ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id)):
        get_run_logger().info(f"Holding workspace {root} (global concurrency limit {name!r})")
        yield
