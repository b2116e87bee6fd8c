"""Where a run's results came from: the code's git commit, the DVC stage's name and input hash, a folder's md5.

``dvc_hash`` is the md5 of the stage's inputs as DVC itself sees them -- its command, the md5 DVC computes for each
declared dependency and the values of its declared params (the fields of its dvc.lock entry other than ``outs``) --
so two runs with the same ``dvc_hash`` are runs DVC considers interchangeable. It is computed rather than read from
dvc.lock because a stage logs while it runs, when dvc.lock still holds the previous execution's entry; "unknown"
outside a DVC repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

log = logging.getLogger("ptg.tracking")


def git_commit(repo: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding the ptg code that runs (its checkout; "unknown" for a wheel
    install)."""
    repo = repo or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def dvc_stage_name(stage: str, round: int | None, params_file: str | Path = "params.yaml") -> str:
    """DVC's name for ``stage`` of ``round``: ``foreach`` over the ``rounds`` mapping names items by key
    (``sample@1``); a stage without a round keeps its name. A round not in ``params_file`` is a ValueError."""
    if round is None:
        return stage
    rounds = (yaml.safe_load(Path(params_file).read_text()) or {}).get("rounds")
    if not isinstance(rounds, Mapping) or str(round) not in rounds:
        raise ValueError(f"{params_file}: no round {round} in `rounds`")
    return f"{stage}@{round}"


def dvc_stage_hash(name: str, root: str | Path = ".") -> str:
    """md5 of DVC stage ``name``'s inputs: its command, DVC's md5 of each declared dependency and the values of its
    declared params, i.e. its dvc.lock entry without ``outs`` (see the module docstring)."""
    from dvc.repo import Repo  # DVC is heavy and only needed here

    with Repo(Repo.find_root(str(root))) as repo:
        (stage,) = repo.stage.collect(name)
        fingerprint = {"cmd": stage.cmd, "deps": {dep.def_path: dep.get_hash().value for dep in stage.deps}}
    return hashlib.md5(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def folder_md5(path: str | Path) -> str:
    """md5 over the relative paths and bytes of every file under ``path`` (or of the file ``path``)."""
    path = Path(path)
    digest = hashlib.md5()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


DEFERRED_HASH = "deferred"  # the dvc_hash of a record whose parent computes it (``lock_hash``)


LOCK_QUIET_S = 0.5  # how long dvc.lock must have been left alone before it is read while DVC may still write it


def settled_lock(workdir: str | Path, newer_than: float = 0.0, quiet_s: float | None = None) -> str | None:
    """The text of ``workdir``'s dvc.lock if it was written after ``newer_than`` (an mtime) and then left alone for
    ``quiet_s`` seconds (default ``LOCK_QUIET_S``) and did not change while it was read; None otherwise. DVC
    rewrites dvc.lock in place (truncate, then write) after each stage, so a reader that only checked the mtime
    could see half a file."""
    lock = Path(workdir) / "dvc.lock"
    quiet_s = LOCK_QUIET_S if quiet_s is None else quiet_s
    try:
        before = lock.stat()
        if before.st_mtime <= newer_than or time.time() - before.st_mtime < quiet_s:
            return None
        text = lock.read_text()
        after = lock.stat()
    except OSError:
        return None
    return text if (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size) else None


def lock_hash(workdir: str | Path, name: str, text: str | None = None) -> str:
    """``dvc_stage_hash`` of stage ``name`` read from ``workdir``'s dvc.lock (or its ``text``) once DVC recorded the
    stage there: the same fields (its command, the md5 of each dependency, the values of its params), without
    loading DVC; "unknown" when the lock has no such stage."""
    try:
        text = (Path(workdir) / "dvc.lock").read_text() if text is None else text
        entry = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["stages"][name]
        deps = {dep["path"]: dep["md5"] for dep in entry.get("deps", [])} | dict(entry.get("params", {}))
        fingerprint = {"cmd": entry["cmd"], "deps": deps}
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        log.info("no DVC stage hash for %s in %s: %s: %s", name, workdir, type(e).__name__, e)
        return "unknown"
    return hashlib.md5(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def stage_tags(stage: str, round: int | None, dvc_stage: str | None, deferred: bool = False) -> dict[str, str]:
    """Tags of a stage run, computed where the stage runs (``deferred``: the dvc_hash is left to the parent that
    replays the record, ``lock_hash``); never raises (tracking must not fail a stage)."""
    dvc_name, dvc_hash = dvc_stage or (stage if round is None else f"{stage}@{round}"), "unknown"
    try:
        dvc_name = dvc_stage or dvc_stage_name(stage, round)
        dvc_hash = DEFERRED_HASH if deferred else dvc_stage_hash(dvc_name)
    except Exception as e:  # no DVC repository, no params.yaml, a stage DVC does not know...
        log.info("no DVC stage hash for %s: %s: %s", dvc_name, type(e).__name__, e)
    return {"stage": stage, "round": "" if round is None else str(round), "git_commit": git_commit(),
            "dvc_stage": dvc_name, "dvc_hash": dvc_hash, "cwd": str(Path.cwd())}
