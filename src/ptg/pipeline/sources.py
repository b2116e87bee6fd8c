"""Fingerprints of the local files and folders that params point at, for the DVC stage ``sources``.

DVC tracks only the paths written in dvc.yaml, and ``data.source``, ``model.policy`` and the others are paths (or hub
ids) from params: edited in place, DVC would see nothing. The ``sources`` stage runs on every ``dvc repro`` (it is
cheap: no file is read) and writes one fingerprint file per consumer (``GROUPS``); the stage that reads a path
depends on its fingerprint file, so editing the data reruns ``prepare`` and editing a model folder reruns
``base_model``, and what they write reruns the rest only if it changed.

A fingerprint lists every file under the path with its size and modification time, not its bytes: a
multi-gigabyte model folder is not re-read on every run. So a file touched without a change, or a fresh copy of the
folder, reruns its reader once, whose unchanged output then stops the chain. A spec that is not an existing path
(a hub id, a built-in name such as ``python-docstrings``) is recorded as written: it changes only with the params
(a hub id's revision is a param of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ptg.config import Params

# fingerprint file -> the params it covers, as "group.key"; prepare reads data, base_model model, and rank, train_lm,
# evaluate and baseline score with the scorer (human scores, a reward model, the prompt task's classifier).
GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data.source",),
    "model": ("model.policy", "model.guidance"),
    "scorer": ("rank.scores_file", "rank.reward_model", "task.classifier"),
}


def fingerprint(spec: str | None) -> dict[str, Any]:
    """``spec`` as written, and, when it names an existing file or folder, every file under it as [relative path,
    size in bytes, modification time in ns], sorted."""
    out: dict[str, Any] = {"spec": spec}
    if spec is None:
        return out
    path = Path(spec).expanduser()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    else:
        return out
    return out | {"files": [[name, (s := p.stat()).st_size, s.st_mtime_ns] for name, p in files]}


def fingerprints(params: Params) -> dict[str, dict[str, Any]]:
    """{fingerprint file: {param: fingerprint}} for every group of ``GROUPS``."""
    def value(key: str) -> str | None:
        group, name = key.split(".")
        return getattr(getattr(params, group), name)

    return {file: {key: fingerprint(value(key)) for key in covered} for file, covered in GROUPS.items()}
