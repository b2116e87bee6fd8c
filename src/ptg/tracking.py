"""Experiment tracking: every MLflow call of the project lives in this module.

MLflow only *tracks*. DVC decides what reruns and its outputs are the source of truth; a stage calls
``log_stage`` once at its end and never branches on whether tracking is on, reachable or off.

Where runs go (read from the environment at each call, nothing happens at import):

- ``PTG_TRACKING=off`` (or 0/false/no): a no-op tracker; nothing is imported, created or written.
- ``MLFLOW_TRACKING_URI`` when set (e.g. ``http://127.0.0.1:5000``), else ``sqlite:///<project>/mlflow.db`` where
  <project> is the DVC project of the working directory (``project_root``). For a
  sqlite store the experiment's artifacts go beside the database, in ``mlartifacts/`` (never the ./mlruns file
  store, which MLflow >= 3.13 refuses). Experiment: ``MLFLOW_EXPERIMENT_NAME``, default ``ptg``.
- ``PTG_MLFLOW_PARENT_RUN_ID``: the parent run of one pipeline execution, opened by
  ``python -m ptg.tracking run -- dvc repro`` or by the Prefect flow. Each stage execution is a nested run under
  it, named ``stage@round`` (or ``stage``). Without it (a plain ``dvc repro``) each stage logs a standalone run,
  tagged ``standalone=true``.

A stage run is tagged ``stage``, ``round``, ``git_commit`` (``git rev-parse HEAD`` of the code's repository, or
"unknown") and ``dvc_stage`` / ``dvc_hash``. ``dvc_hash`` is the md5 of the stage's inputs as DVC itself sees them
-- its command, the md5 DVC computes for each declared dependency and the values of its declared params (the
fields of its dvc.lock entry other than ``outs``) -- so two runs with the same ``dvc_hash`` are runs DVC considers
interchangeable. It is computed rather than read from dvc.lock because a stage logs while it runs, when dvc.lock
still holds the previous execution's entry; "unknown" outside a DVC repository.

A stage's model folder (an HF folder, or a guidance folder) is logged once as an MLflow pyfunc model whose data is
the folder itself (``loader_module="ptg.tracking"``: ``mlflow.pyfunc.load_model`` needs ``ptg`` importable and
gives an ``HFFolderModel``), registered as ``ptg-guidance`` / ``ptg-lm`` / ``ptg-lm-baseline`` with version tags
``run_id``, ``round``, ``stage`` and ``content_md5``. ``set_best_alias`` points an alias (``best``) at the version
with the best evaluated metric. Summary metrics are also logged on the parent as ``<stage>/<metric>`` at
``step=round`` so the MLflow UI charts them against the round.

When the tracking server is unreachable (or any MLflow call fails) a stage logs ``tracking skipped: ...``, writes
what it could not log to ``metrics/.tracking_pending/<stage>@<round>.json`` and carries on; HTTP retries and
timeouts are bounded (``MLFLOW_HTTP_REQUEST_*`` defaults below, and a 3 s health probe first). Replay the records
later into the then-configured MLflow with ``ptg backfill``. A pending record is a reference, not a second copy:
the pipeline's stages log their DVC metrics files (``metrics/...json``, the history CSVs), and the record names
those files with their md5, as it names the model folders and artifacts; ``backfill`` reads them back and refuses
a file that changed since (the stage ran again: replay before the next ``dvc repro`` overwrites them).

CLI:
    python -m ptg.tracking run [--name NAME] [--params params.yaml] -- dvc repro
    python -m ptg.tracking backfill [--dir metrics/.tracking_pending]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import yaml

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

PARENT_ENV = "PTG_MLFLOW_PARENT_RUN_ID"
SWITCH_ENV = "PTG_TRACKING"
EXPERIMENT = "ptg"
PENDING_DIR = Path("metrics") / ".tracking_pending"
GUIDANCE_MODEL, LM_MODEL, BASELINE_MODEL = "ptg-guidance", "ptg-lm", "ptg-lm-baseline"
STATUSES = ("FINISHED", "FAILED", "KILLED")
# Bounded HTTP retries so an unreachable server costs seconds (MLflow's defaults retry for minutes); an explicit
# environment setting wins. The timeout is per request and must leave room for uploading a model file.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
HEALTH_TIMEOUT_S = 3.0
LOG_MODELS_ENV = "PTG_LOG_MODELS"
LOADER_MODULE = "ptg.tracking"  # this module, also when run as __main__
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "tokenizers")

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------- records


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
            loaded[kind] = _split_metrics(value)[0] if kind == "metrics" else _history_rows(value)
        return dataclasses.replace(self, **loaded)


class StaleSourceError(RuntimeError):
    """A pending record's metrics or history file changed after its stage ran."""


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


class PendingVersionError(LookupError):
    """No registered version holds the evaluated model yet (its stage's logging is itself pending)."""


# ------------------------------------------------------------------------------------------------- small helpers


def project_root(start: Path | None = None) -> Path:
    """The DVC project holding ``start`` (default: the working directory): the nearest folder with ``.dvc/`` or
    ``dvc.yaml``, else ``start`` itself. Never derived from where ptg is installed."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir() or (folder / "dvc.yaml").is_file():
            return folder
    return start


def tracking_uri(start: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the sqlite store ``mlflow.db`` at the root of the DVC project of ``start``
    (the working directory by default): two checkouts sharing one environment keep separate stores. A stage that
    DVC runs knows its project from ``DVC_ROOT``, which ``dvc exp run --temp`` / ``--queue`` point at the project
    the experiment belongs to, not at the temporary copy it runs in (whose store would be deleted with it)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ["DVC_ROOT"]) if start is None and os.environ.get("DVC_ROOT") else project_root(start)
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def tracking_enabled() -> bool:
    """Whether to track: ``PTG_TRACKING`` is not off, and this process is the main one of a data-parallel launch
    (``accelerate launch`` / torchrun set RANK; the other ranks train and write nothing, ``ptg.distributed``)."""
    return (os.environ.get(SWITCH_ENV, "on").strip().lower() not in {"off", "0", "false", "no"}
            and os.environ.get("RANK", "0") == "0")


def log_models_mode(start: Path | None = None) -> str:
    """``$PTG_LOG_MODELS`` when set, else params' ``tracking.log_models`` of the DVC project (its default,
    ``best``, without a params.yaml or a tracking group)."""
    from ptg.config import LOG_MODELS, ParamsError, TrackingParams, load_group, read_params

    value = os.environ.get(LOG_MODELS_ENV)
    if value is not None:
        if value not in LOG_MODELS:
            raise ParamsError(f"{LOG_MODELS_ENV} must be one of {', '.join(LOG_MODELS)}; got {value!r}")
        return value
    params = project_root(start) / "params.yaml"
    if not params.is_file() or "tracking" not in read_params(params):
        return TrackingParams().log_models
    return load_group("tracking", params).log_models


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


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _split_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Numbers (bools included) become metrics; other entries of a stage's metrics JSON (e.g. ``objective``) tags."""
    numbers, others = {}, {}
    for key, value in flatten(metrics).items():
        if isinstance(value, bool | int | float):
            numbers[key] = float(value)
        elif value is not None:
            others[f"info.{key}"] = _param_value(value)
    return numbers, others


def _history_rows(history: pd.DataFrame | None) -> list[dict[str, float]]:
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


def _stage_tags(stage: str, round: int | None, dvc_stage: str | None) -> dict[str, str]:
    """Tags of a stage run, computed where the stage runs; never raises (tracking must not fail a stage)."""
    dvc_name, dvc_hash = dvc_stage or (stage if round is None else f"{stage}@{round}"), "unknown"
    try:
        dvc_name = dvc_stage or dvc_stage_name(stage, round)
        dvc_hash = dvc_stage_hash(dvc_name)
    except Exception as e:  # no DVC repository, no params.yaml, a stage DVC does not know...
        log.info("no DVC stage hash for %s: %s: %s", dvc_name, type(e).__name__, e)
    return {"stage": stage, "round": "" if round is None else str(round), "git_commit": git_commit(),
            "dvc_stage": dvc_name, "dvc_hash": dvc_hash, "cwd": str(Path.cwd())}


def _write_pending(kind: str, name: str, record: StageRecord | AliasRecord, error: str,
                   directory: Path = PENDING_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"kind": kind, "error": error, "created": datetime.now(UTC).isoformat(),
               "record": record.pending_form() if isinstance(record, StageRecord) else dataclasses.asdict(record)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def _stage_pending_for(model_dir: str, directory: Path = PENDING_DIR) -> bool:
    """Whether a pending stage record in ``directory`` logs the model folder ``model_dir``."""
    for path in directory.glob("*.json"):
        entry = json.loads(path.read_text())
        if entry["kind"] == "stage" and entry["record"]["model_dir"] == model_dir:
            return True
    return False


# ------------------------------------------------------------------------------------------------------ trackers


class Tracker(Protocol):
    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
                     ) -> str | None: ...

    def end_parent(self, run_id: str | None, status: str = "FINISHED") -> None: ...

    def log_stage(self, record: StageRecord) -> None: ...

    def set_best_alias(self, record: AliasRecord) -> str | None: ...


class NullTracker:
    """Tracking off: every call does nothing (and imports nothing), so callers never branch on it."""

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
                     ) -> str | None:
        return None

    def end_parent(self, run_id: str | None, status: str = "FINISHED") -> None:
        return None

    def log_stage(self, record: StageRecord) -> None:
        return None

    def set_best_alias(self, record: AliasRecord) -> str | None:
        return None


class MlflowTracker:
    """Logs to the MLflow at ``uri``; a failing call logs a warning (and, for stages, a pending record)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)  # read by MLflow's HTTP client, here and in the stages it spawns

    # -- plumbing

    def client(self) -> MlflowClient:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def check_reachable(self) -> None:
        """Fail within seconds when an HTTP tracking server does not answer its health check."""
        if self.uri.startswith(("http://", "https://")):
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as response:
                response.read()

    def create_store(self) -> None:
        """Create the store and its experiment now: once, before several processes open runs side by side
        (MLflow's sqlite schema migration fails when they create the same new database at once)."""
        self._guard("creating the tracking store", lambda: self.experiment_id(self.client()))

    def _guard(self, what: str, call: Callable[[], T],
               pending: Callable[[Exception], Path | None] | None = None) -> T | None:
        try:
            self.check_reachable()
            return call()
        except Exception as e:
            log.warning("tracking skipped: %s at %s failed: %s: %s", what, self.uri, type(e).__name__, e)
            path = pending(e) if pending is not None else None
            if path is not None:
                log.warning("what was not logged is in %s; replay it with `python -m ptg.tracking backfill`", path)
            return None

    def experiment_id(self, client: MlflowClient) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        return client.create_experiment(name, artifact_location=location)

    @staticmethod
    def existing_run(client: MlflowClient, run_id: str | None) -> Run | None:
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(run_id)
        except MlflowException:
            return None

    # -- parent runs

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
                     ) -> str | None:
        def call() -> str:
            from mlflow.entities import Param

            client = self.client()
            run = client.create_run(self.experiment_id(client), run_name=name,
                                    tags={"kind": "pipeline", "git_commit": git_commit(), **(tags or {})})
            client.log_batch(run.info.run_id,
                             params=[Param(k, _param_value(v)) for k, v in flatten(params).items()])
            log.info("parent run %s (%s) at %s", run.info.run_id, name, self.uri)
            return run.info.run_id

        return self._guard(f"opening parent run {name!r}", call)

    def end_parent(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self._guard(f"closing parent run {run_id}", lambda: self.client().set_terminated(run_id, status))

    # -- stages

    def log_stage(self, record: StageRecord) -> None:
        self._guard(f"logging {record.run_name}", lambda: self.replay_stage(record),
                    lambda e: _write_pending("stage", record.run_name, record, f"{type(e).__name__}: {e}"))

    def replay_stage(self, record: StageRecord) -> str:
        """Log ``record`` (now); returns the stage run's id. Raises on any MLflow error."""
        from mlflow.entities import Metric, Param

        client = self.client()
        parent = self.existing_run(client, record.parent_run_id)
        if record.parent_run_id and parent is None:
            log.warning("parent run %s not found at %s: logging %s standalone", record.parent_run_id, self.uri,
                        record.run_name)
        tags = dict(record.tags)
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.info.run_id
        else:
            tags["standalone"] = "true"
        experiment = parent.info.experiment_id if parent is not None else self.experiment_id(client)
        run_id = client.create_run(experiment, run_name=record.run_name, tags=tags).info.run_id
        status = "FAILED"
        try:
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in record.metrics.items()]
            metrics += [Metric(f"history/{k}", v, now, int(row["update"]))
                        for row in record.history for k, v in row.items() if k != "update"]
            client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in record.params.items()])
            for artifact in map(Path, record.artifacts):
                if artifact.is_dir():
                    client.log_artifacts(run_id, str(artifact), artifact.name)
                else:
                    client.log_artifact(run_id, str(artifact))
            if record.model_dir is not None:
                self._log_model(client, run_id, record)
            if parent is not None and record.step_metrics_on_parent and record.metrics:
                step = record.round if record.round is not None else 0
                client.log_batch(parent.info.run_id, metrics=[Metric(f"{record.stage}/{k}", v, now, step)
                                                              for k, v in record.metrics.items()])
            status = "FINISHED"
        finally:
            client.set_terminated(run_id, status)
        log.info("logged %s as run %s at %s", record.run_name, run_id, self.uri)
        return run_id

    def _log_model(self, client: MlflowClient, run_id: str, record: StageRecord) -> None:
        """The stage's folder as a model of its run, registered when a name is given."""
        version_tags = {"round": record.tags.get("round", ""), "stage": record.stage,
                        "dvc_hash": record.tags.get("dvc_hash", "unknown")}
        self._register(client, run_id, Path(record.model_dir), record.registered_name, version_tags)

    def _register(self, client: MlflowClient, run_id: str, model_dir: Path, registered_name: str | None,
                  version_tags: Mapping[str, str]) -> str | None:
        """Log ``model_dir`` into run ``run_id``: a decoder-only LM folder with MLflow's transformers flavour
        (bf16 weights, loadable as a text-generation pipeline), any other folder (a guidance, a seq2seq LM) as a
        pyfunc model whose data is the folder (``HFFolderModel``). Registers it as ``registered_name`` (when
        given) with ``version_tags`` plus run_id and content_md5; returns the version."""
        import mlflow

        md5 = folder_md5(model_dir)
        requirements = [f"{p}=={metadata.version(p)}" for p in MODEL_REQUIREMENTS]
        with mlflow.start_run(run_id=run_id):
            info = _log_causal_lm(model_dir, registered_name, requirements)
            if info is None:
                info = mlflow.pyfunc.log_model(name="model", loader_module=LOADER_MODULE, data_path=str(model_dir),
                                               pip_requirements=requirements,
                                               registered_model_name=registered_name)
        if registered_name is None:
            return None
        version = str(info.registered_model_version)
        for key, value in {**version_tags, "run_id": run_id, "content_md5": md5}.items():
            client.set_model_version_tag(registered_name, version, key, value)
        log.info("registered %s version %s", registered_name, version)
        return version

    def _drop_version(self, client: MlflowClient, name: str, version: Any) -> None:
        """Delete a registered version and the weights its logged model holds (log_models: best keeps one)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        model_id = _logged_model_id(version)
        if model_id:
            location = client.get_logged_model(model_id).artifact_location
            get_artifact_repository(location).delete_artifacts()
            client.delete_logged_model(model_id)
        client.delete_model_version(name, version.version)
        log.info("%s version %s superseded: deleted with its weights", name, version.version)

    # -- aliases

    def set_best_alias(self, record: AliasRecord) -> str | None:
        name = f"alias-{record.registered_name}-{record.alias}-{record.content_md5[:12]}"

        def pending(e: Exception) -> Path | None:
            # No version holds the model: worth replaying only when its own stage's record is pending too (a model
            # DVC did not retrain, logged to another store, never gets a version here).
            if isinstance(e, PendingVersionError) and not _stage_pending_for(record.model_dir):
                return None
            return _write_pending("alias", name, record, f"{type(e).__name__}: {e}")

        return self._guard(f"moving alias {record.alias!r} of {record.registered_name}",
                           lambda: self.replay_alias(record), pending)

    def replay_alias(self, record: AliasRecord) -> str:
        """Tag the versions holding the evaluated folder with ``eval.<metric>`` and point the alias at the version
        with the best value (ties: the newest). Returns that version. Raises on any MLflow error."""
        client = self.client()
        name, key = record.registered_name, f"eval.{record.metric}"
        versions = client.search_model_versions(f"name='{name}'")
        if record.log_best:
            return self._replace_best(client, record, versions)
        mine = [v for v in versions if v.tags.get("content_md5") == record.content_md5]
        if not mine:
            raise PendingVersionError(f"no version of {name} holds the evaluated model (content md5 "
                                      f"{record.content_md5}); its stage's logging may be pending")
        for version in mine:
            client.set_model_version_tag(name, version.version, key, repr(float(record.value)))
            version.tags[key] = repr(float(record.value))
        sign = 1.0 if record.greater_is_better else -1.0
        scored = [(sign * float(v.tags[key]), int(v.version)) for v in versions
                  if key in v.tags and math.isfinite(float(v.tags[key]))]
        best = str(max(scored)[1]) if scored else mine[-1].version
        client.set_registered_model_alias(name, record.alias, best)
        log.info("%s@%s -> version %s (%s)", name, record.alias, best, key)
        return best

    def _replace_best(self, client: MlflowClient, record: AliasRecord, versions: list[Any]) -> str:
        """log_models: best. Keep the alias holder unless the evaluated folder beats it (ties keep it); else log
        the folder into the stage run that wrote it (found by its content_md5 tag), register it, move the alias
        and delete every other version with its weights: one version per registered name holds weights. Runs that
        wrote identical bytes (a round that kept its warm start) resolve to the first of them, the folder's origin."""
        name, key = record.registered_name, f"eval.{record.metric}"
        value = repr(float(record.value))
        from mlflow.exceptions import MlflowException

        try:
            holder = client.get_model_version_by_alias(name, record.alias) if versions else None
        except MlflowException:  # no version holds the alias
            holder = None
        sign = 1.0 if record.greater_is_better else -1.0
        if holder is not None and holder.tags.get("content_md5") == record.content_md5:  # the same bytes again
            old = float(holder.tags.get(key, "nan"))
            if not math.isfinite(old) or (math.isfinite(record.value) and sign * record.value > sign * old):
                client.set_model_version_tag(name, holder.version, key, value)  # the tag keeps its best score
            return str(holder.version)
        if holder is not None and key in holder.tags and math.isfinite(float(holder.tags[key])) and (
                not math.isfinite(record.value) or sign * float(holder.tags[key]) >= sign * record.value):
            log.info("%s@%s stays version %s (%s %s against %s)", name, record.alias, holder.version, key,
                     holder.tags[key], value)
            return str(holder.version)
        runs = client.search_runs([self.experiment_id(client)], f"tags.content_md5 = '{record.content_md5}'",
                                  order_by=["attributes.start_time ASC"], max_results=1)
        if not runs:
            raise PendingVersionError(f"no run of {name}'s stage holds the evaluated model (content md5 "
                                      f"{record.content_md5}); its stage's logging may be pending")
        run = runs[0]
        version = self._register(client, run.info.run_id, Path(record.model_dir), name,
                                 {"round": run.data.tags.get("round", ""), "stage": run.data.tags.get("stage", ""),
                                  "dvc_hash": run.data.tags.get("dvc_hash", "unknown"), key: value})
        assert version is not None
        client.set_registered_model_alias(name, record.alias, version)
        for old in versions:
            self._drop_version(client, name, old)
        log.info("%s@%s -> version %s (%s %s)", name, record.alias, version, key, value)
        return version


def get_tracker(project: Path | None = None) -> Tracker:
    """The tracker the environment asks for (read at each call, so tests and callers can switch it), for the DVC
    project of ``project`` (default: the working directory)."""
    return MlflowTracker(tracking_uri(project)) if tracking_enabled() else NullTracker()


# ---------------------------------------------------------------------------------------------------- public API


def start_parent(name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                 project: Path | None = None) -> str | None:
    """Open the parent run of one pipeline execution in the store of ``project`` (default: the working
    directory's); its id (export it as ``PTG_MLFLOW_PARENT_RUN_ID`` to the stages, with ``MLFLOW_TRACKING_URI``),
    or None when tracking is off or the server is unreachable."""
    return get_tracker(project).start_parent(name, params, tags)


def end_parent(run_id: str | None, status: str = "FINISHED", project: Path | None = None) -> None:
    """Close a parent run with ``status`` (FINISHED, FAILED or KILLED); None is ignored."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}; got {status!r}")
    get_tracker(project).end_parent(run_id, status)


@contextlib.contextmanager
def parent_run(name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
               project: Path | None = None) -> Iterator[str | None]:
    """A parent run for the block: FINISHED when it returns, FAILED on an exception, KILLED on an interrupt."""
    run_id = start_parent(name, params, tags, project)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except Exception:
        raise
    except BaseException:  # KeyboardInterrupt, Prefect's cancellation / termination signals
        status = "KILLED"
        raise
    finally:
        end_parent(run_id, status, project)


def log_stage(stage: str, round: int | None, params: Mapping[str, Any], metrics: Mapping[str, Any] | str | Path,
              history: pd.DataFrame | str | Path | None = None, artifacts: Sequence[str | Path] = (),
              model_dir: str | Path | None = None, registered_name: str | None = None,
              step_metrics_on_parent: bool = True, dvc_stage: str | None = None) -> None:
    """Track one stage execution; call it once at the end of the stage, after its outputs are written.

    Opens a run named ``stage@round`` (``stage`` when round is None) nested under ``$PTG_MLFLOW_PARENT_RUN_ID``
    (standalone without it) and logs: ``params`` once, flattened to dotted keys; ``metrics`` (numbers; other
    entries, e.g. ``objective``, become ``info.*`` tags), a mapping or the JSON file the stage wrote (its DVC
    metrics file: a pending record then refers to the file instead of copying it); ``history``, one
    ``history/<column>`` metric per numeric column at ``step`` = the row's ``update``, a table or its CSV file;
    ``artifacts`` (files or folders); ``model_dir`` as a pyfunc model, registered as ``registered_name`` when given;
    and, with ``step_metrics_on_parent``, the metrics on the parent as ``<stage>/<metric>`` at ``step=round``.
    ``dvc_stage`` names the DVC stage whose hash tags the run when it is not ``stage`` of ``round`` (e.g.
    ``"baseline"`` for ``baseline_train_lm@1``). Never raises for tracking trouble: see the module docstring.
    """
    if registered_name is not None and model_dir is None:
        raise ValueError(f"log_stage({stage!r}): registered_name {registered_name!r} needs a model_dir")
    tracker = get_tracker()
    if isinstance(tracker, NullTracker):
        return
    sources = {}
    if isinstance(metrics, str | Path):
        sources["metrics"] = {"path": str(Path(metrics).resolve())}
        metrics, sources["metrics"]["md5"] = read_source("metrics", metrics)
    if isinstance(history, str | Path):
        sources["history"] = {"path": str(Path(history).resolve())}
        history, sources["history"]["md5"] = read_source("history", history)
    numbers, info = _split_metrics(metrics)
    if model_dir is not None and log_models_mode() != "all":  # the run names its folder; DVC keeps it, and with
        # log_models: best, set_best_alias logs it into this run once it is the best evaluated one
        info |= {"model_dir": str(Path(model_dir).resolve()), "content_md5": folder_md5(model_dir)}
        model_dir = registered_name = None
    record = StageRecord(
        stage=stage, round=round,
        params={k: _param_value(v) for k, v in flatten(params).items()}, metrics=numbers,
        history=_history_rows(history), artifacts=[str(Path(p).resolve()) for p in artifacts],
        model_dir=str(Path(model_dir).resolve()) if model_dir is not None else None,
        registered_name=registered_name, step_metrics_on_parent=step_metrics_on_parent,
        parent_run_id=os.environ.get(PARENT_ENV) or None, tags=_stage_tags(stage, round, dvc_stage) | info,
        sources=sources)
    tracker.log_stage(record)


def set_best_alias(registered_name: str, model_dir: str | Path, metric: str, value: float, alias: str = "best",
                   greater_is_better: bool = True, weights: bool = True) -> str | None:
    """Record that the model in ``model_dir`` scored ``value`` on ``metric`` and point ``alias`` at the best version.

    The versions of ``registered_name`` holding ``model_dir`` (matched by ``content_md5``, so a DVC-skipped
    train_lm still matches) get the tag ``eval.<metric>``; the alias moves to the version with the best tagged
    value. Call it from ``evaluate@r`` after ``log_stage``, e.g.
    ``set_best_alias("ptg-lm", round_dir(r) / "lm", "rougeL", summary["rougeL"])``. Returns the aliased version
    (None when tracking is off or skipped; then a pending record is written for ``backfill``).

    With ``tracking.log_models: best`` no stage logged its folder: the folder is logged now, into the run of the
    stage that wrote it, only if it beats the version holding ``alias``, and the superseded version is deleted
    with its weights. ``weights=False`` (the baseline arm) logs nothing under ``best``.
    """
    tracker = get_tracker()
    mode = log_models_mode()
    if isinstance(tracker, NullTracker) or mode == "none" or (mode == "best" and not weights):
        return None
    model_dir = Path(model_dir).resolve()
    return tracker.set_best_alias(AliasRecord(registered_name, str(model_dir), folder_md5(model_dir), metric,
                                              float(value), alias, greater_is_better, log_best=mode == "best"))


def backfill(directory: str | Path = PENDING_DIR) -> tuple[int, int]:
    """Replay the pending records in ``directory`` into the configured MLflow (stages first, then aliases);
    replayed records are deleted. Returns (replayed, still pending)."""
    tracker = get_tracker()
    if isinstance(tracker, NullTracker):
        raise RuntimeError(f"{SWITCH_ENV} is off: nothing to replay into")
    entries = [(path, json.loads(path.read_text())) for path in sorted(Path(directory).glob("*.json"))]
    entries.sort(key=lambda e: (e[1]["kind"] != "stage", e[1]["created"]))
    tracker.check_reachable()
    done = 0
    for path, entry in entries:
        try:
            if entry["kind"] == "stage":
                tracker.replay_stage(StageRecord(**entry["record"]).with_sources())
            else:
                tracker.replay_alias(AliasRecord(**entry["record"]))
        except Exception as e:
            log.warning("could not replay %s: %s: %s", path, type(e).__name__, e)
            continue
        path.unlink()
        done += 1
    log.info("backfill: %d replayed, %d still pending in %s", done, len(entries) - done, directory)
    return done, len(entries) - done


def run_command(command: Sequence[str], name: str | None = None, params_file: str | Path = "params.yaml") -> int:
    """Run ``command`` (e.g. ``dvc repro``) under a new parent run exported as ``PTG_MLFLOW_PARENT_RUN_ID``; the
    parent ends FINISHED, FAILED (non-zero exit) or KILLED (interrupt). Returns the command's exit code."""
    params_file = Path(params_file)
    params = (yaml.safe_load(params_file.read_text()) or {}) if params_file.is_file() else {}
    name = name or f"pipeline {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}"
    run_id = start_parent(name, params, {"command": " ".join(command), "params_file": str(params_file)})
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri())  # the command's stages log where the parent is
    if run_id:
        env[PARENT_ENV] = run_id
    status = "FAILED"
    try:
        code = subprocess.run(list(command), env=env, check=False).returncode
        status = "FINISHED" if code == 0 else "FAILED"
        return code
    except KeyboardInterrupt:
        status = "KILLED"
        return 130
    finally:
        end_parent(run_id, status)


def _logged_model_id(version: Any) -> str | None:
    """The logged model behind a registered version (MLflow 3 records it as the source ``models:/m-...``)."""
    model_id = getattr(version, "model_id", None)
    if not model_id and str(version.source).startswith("models:/m-"):
        model_id = str(version.source).removeprefix("models:/")
    return model_id or None


def _log_causal_lm(model_dir: Path, registered_name: str | None, requirements: list[str]) -> Any:
    """``model_dir`` with MLflow's transformers flavour (task text-generation, weights in bf16) when it is a
    decoder-only LM folder; None for anything else (a guidance folder, a seq2seq LM)."""
    if not (model_dir / "config.json").is_file():
        return None
    import mlflow
    import torch

    from ptg.models import is_seq2seq, load_lm, load_tokenizer

    model = load_lm(model_dir)
    if is_seq2seq(model):
        return None
    return mlflow.transformers.log_model(
        transformers_model={"model": model.to(torch.bfloat16), "tokenizer": load_tokenizer(model_dir)},
        name="model", task="text-generation", pip_requirements=requirements, registered_model_name=registered_name)


# ------------------------------------------------------------------------------------------------- pyfunc loader


class HFFolderModel:
    """What ``mlflow.pyfunc.load_model`` gives for a ptg model logged as a folder: ``path`` is that folder.

    - A guidance folder (``guidance.json``, ``backbone/`` with its tokenizer): ``predict`` takes a DataFrame (or
      records) with columns ``prompt`` and ``response`` and returns each response's per-token rewards (lists of
      floats, one per response token including the stop token), as the pipeline computes them on CPU.
    - An LM folder logged this way (a seq2seq LM): ``predict`` decodes greedily: prompts (a list, a Series, or a
      DataFrame's first column) -> completions. Decoder-only LMs are logged with the transformers flavour instead.
    ``params``: ``max_prompt_tokens`` (default 512), ``max_new_tokens`` / ``max_target_tokens`` (default 64)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        import pandas as pd
        import torch

        from ptg.models import (
            encode_prompts,
            encode_responses,
            eos_ids,
            is_seq2seq,
            load_lm,
            load_tokenizer,
            turn_end_id,
        )

        params = params or {}
        cpu = torch.device("cpu")
        if (self.path / "guidance.json").is_file():
            from ptg.guidance import load_guidance, token_rewards

            frame = pd.DataFrame(model_input)
            missing = sorted({"prompt", "response"} - set(frame.columns))
            if missing:
                raise ValueError(f"guidance input needs columns prompt and response; missing {', '.join(missing)}")
            guidance, tok = load_guidance(self.path), load_tokenizer(self.path / "backbone")
            prompts = encode_prompts(tok, frame["prompt"].astype(str).tolist(),
                                     int(params.get("max_prompt_tokens", 512)), is_seq2seq(guidance.backbone))
            responses = encode_responses(tok, frame["response"].astype(str).tolist(),
                                         int(params.get("max_target_tokens", 64)), turn_end_id(guidance.backbone, tok))
            return token_rewards(guidance, prompts, responses, tok.pad_token_id, cpu, torch.float32)
        from ptg.sampling import SamplingConfig, sample

        if not (self.path / "config.json").is_file():
            raise TypeError(f"{self.path} is neither a guidance nor an LM folder")
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0]
        prompts = [model_input] if isinstance(model_input, str) else [str(x) for x in model_input]
        model, tok = load_lm(self.path), load_tokenizer(self.path)
        ids = encode_prompts(tok, prompts, int(params.get("max_prompt_tokens", 512)), is_seq2seq(model))
        cfg = SamplingConfig(num_samples=1, max_new_tokens=int(params.get("max_new_tokens", 64)), temperature=0.0)
        drawn = sample(model, ids, cfg, eos_ids(model, tok), tok.pad_token_id, cpu, progress=False)
        return [tok.decode(group[0], skip_special_tokens=True).strip() for group in drawn]


def _load_pyfunc(data_path: str) -> HFFolderModel:
    """MLflow's pyfunc entry point (``loader_module``)."""
    return HFFolderModel(data_path)


# --------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptg.tracking", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a command (e.g. `dvc repro`) under a new MLflow parent run")
    run.add_argument("--name", help="parent run name (default: 'pipeline <date time>')")
    run.add_argument("--params", default="params.yaml", help="params file logged as the parent's params")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    replay = sub.add_parser("backfill", help="replay pending records into the configured MLflow")
    replay.add_argument("--dir", default=str(PENDING_DIR), help="folder of pending records")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tracking %(levelname)s %(message)s")
    if args.command == "run":
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not command:
            ap.error("run: give the command after --, e.g. python -m ptg.tracking run -- dvc repro")
        return run_command(command, args.name, args.params)
    try:
        _, pending = backfill(args.dir)
    except Exception as e:
        log.error("backfill failed: %s: %s", type(e).__name__, e)
        return 1
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main())
