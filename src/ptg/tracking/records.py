"""What a stage asks to track, as JSON-serialisable records, and the pending files they wait in while the store is
unreachable (``ptg backfill`` replays them: ``ptg.tracking.runs.backfill``).

A stage run by a parent that replays its records itself (``ptg run``, ``ptg quick``, the Prefect flow:
``PTG_TRACKING_DEFER`` names the folder) writes its record there at once, with no MLflow import or store access in
the stage, and the parent logs it as soon as DVC has recorded the stage (``ptg.tracking.runs.replaying``).

A pending record is a reference, not a second copy: the pipeline's stages log their DVC metrics files
(``metrics/...json``, the history CSVs), and the record names those files with their md5, as it names the model
folders and artifacts; replaying reads them back and refuses a file that changed since (the stage ran again: replay
before the next ``dvc repro`` overwrites them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

PENDING_DIR = Path("metrics") / ".tracking_pending"
DEFER_ENV = "PTG_TRACKING_DEFER"


def deferred_dir() -> Path | None:
    """The folder a parent process replays this process's records from (``PTG_TRACKING_DEFER``), if any."""
    value = os.environ.get(DEFER_ENV, "").strip()
    return Path(value) if value else None


def pending_dir() -> Path:
    """Where a record that is not logged now waits: the parent's folder when deferred, else ``PENDING_DIR``."""
    return deferred_dir() or PENDING_DIR


@dataclass
class StageRecord:
    """What one stage execution asks to track, JSON-serialisable so that it can wait in a pending file."""

    stage: str
    round: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    model_dir: str | None = None
    registered_name: str | None = None
    step_metrics_on_parent: bool = True
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # The files ``metrics`` / ``history`` were read from ({"metrics": {"path": ..., "md5": ...}, ...}): a pending
    # record keeps these references instead of the numbers, and ``with_sources`` reads them back.
    sources: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.stage if self.round is None else f"{self.stage}@{self.round}"

    def pending_form(self) -> dict[str, Any]:
        """The record as a pending file holds it: what its source files hold is left to them."""
        data = dataclasses.asdict(self)
        if "metrics" in self.sources:
            data["metrics"] = {}
        if "history" in self.sources:
            data["history"] = []
        return data

    def with_sources(self) -> StageRecord:
        """The record with ``metrics`` / ``history`` read from its source files; a ``StaleSourceError`` when a file
        is gone or changed since the stage ran."""
        loaded: dict[str, Any] = {}
        for kind, source in self.sources.items():
            path = Path(source["path"])
            value, md5 = read_source(kind, path) if path.is_file() else (None, "missing")
            if md5 != source["md5"]:
                raise StaleSourceError(f"{path} ({kind} of {self.run_name}) changed since the stage ran (md5 "
                                       f"{source['md5']} -> {md5}): the stage ran again, and logged or left "
                                       f"pending its own record; delete this pending record to drop it")
            loaded[kind] = split_metrics(value)[0] if kind == "metrics" else history_rows(value)
        return dataclasses.replace(self, **loaded)


@dataclass
class AliasRecord:
    """A request to tag the version holding a model folder with its evaluated metric and move ``alias``."""

    registered_name: str
    model_dir: str
    content_md5: str
    metric: str
    value: float
    alias: str = "best"
    greater_is_better: bool = True
    log_best: bool = False  # tracking.log_models: best: log the folder now if it beats the alias holder


class StaleSourceError(RuntimeError):
    """A pending record's metrics or history file changed after its stage ran."""


class PendingVersionError(LookupError):
    """No registered version holds the evaluated model yet (its stage's logging is itself pending)."""


def read_source(kind: str, path: str | Path) -> tuple[Any, str]:
    """A stage's ``metrics`` JSON (a mapping) or ``history`` CSV (a table), read once, and the md5 of its bytes
    (``folder_md5`` of the file)."""
    data = Path(path).read_bytes()
    if kind == "metrics":
        value = json.loads(data)
    else:
        import pandas as pd

        value = pd.read_csv(io.BytesIO(data))
    return value, hashlib.md5(data).hexdigest()


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def param_value(value: Any) -> str:
    """A param as MLflow stores it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def split_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Numbers (bools included) become metrics; other entries of a stage's metrics JSON (e.g. ``objective``) tags."""
    numbers, others = {}, {}
    for key, value in flatten(metrics).items():
        if isinstance(value, bool | int | float):
            numbers[key] = float(value)
        elif value is not None:
            others[f"info.{key}"] = param_value(value)
    return numbers, others


def history_rows(history: pd.DataFrame | None) -> list[dict[str, float]]:
    """Numeric, finite cells of each row; ``update`` (the step) is kept, row order is the fallback step."""
    if history is None:
        return []
    rows = []
    for i, row in enumerate(history.to_dict("records")):
        cells = {k: float(v) for k, v in row.items()
                 if isinstance(v, bool | int | float) and math.isfinite(float(v))}
        cells.setdefault("update", float(i))
        rows.append(cells)
    return rows


def write_pending(kind: str, name: str, record: StageRecord | AliasRecord, error: str,
                  directory: Path | None = None) -> Path:
    """``record`` as ``directory/<name>.json`` (default ``pending_dir()``; written atomically), with the reason it
    was not logged into the store."""
    directory = directory or pending_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"kind": kind, "error": error, "created": datetime.now(UTC).isoformat(),
               "record": record.pending_form() if isinstance(record, StageRecord) else dataclasses.asdict(record)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def read_pending(directory: str | Path = PENDING_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """The pending files in ``directory`` (path, content) in replay order: stages first (a version must exist
    before an alias can point at it), each kind oldest first."""
    entries = [(path, json.loads(path.read_text())) for path in sorted(Path(directory).glob("*.json"))]
    entries.sort(key=lambda e: (e[1]["kind"] != "stage", e[1]["created"]))
    return entries


def stage_pending_for(model_dir: str, directory: Path | None = None) -> bool:
    """Whether a pending stage record in ``directory`` (default ``pending_dir()``) logs the model folder
    ``model_dir``."""
    for path in (directory or pending_dir()).glob("*.json"):
        entry = json.loads(path.read_text())
        if entry["kind"] == "stage" and entry["record"]["model_dir"] == model_dir:
            return True
    return False
