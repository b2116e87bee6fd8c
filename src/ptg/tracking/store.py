"""Whether runs are tracked and where: the switch, the store's URI, the health probe, the client and the experiment.

Everything here reads the environment at each call (nothing happens at import), so tests and callers can switch it.
Every MLflow call of the package goes through ``guarded``: a failure is a warning (and, where asked, a pending
record), never a failed stage.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("ptg.tracking")

SWITCH_ENV = "PTG_TRACKING"
DEFER_ENV = "PTG_TRACKING_DEFER"  # ptg.tracking.records reads it too
EXPERIMENT = "ptg"
# Bounded HTTP retries so an unreachable server costs seconds (MLflow's defaults retry for minutes); an explicit
# environment setting wins. The timeout is per request and must leave room for uploading a model file.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
HEALTH_TIMEOUT_S = 3.0

T = TypeVar("T")


def project_root(start: Path | None = None) -> Path:
    """The DVC project holding ``start`` (default: the working directory), as DVC finds it (the nearest folder with
    ``.dvc/``), else ``start`` itself. Never derived from where ptg is installed."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    start = (start or Path.cwd()).resolve()
    try:
        return Path(Repo.find_root(str(start))).resolve()
    except NotDvcRepoError:
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
    (``accelerate launch`` / torchrun set RANK; the other ranks train and write nothing, ``ptg.lm.distributed``)."""
    return (os.environ.get(SWITCH_ENV, "on").strip().lower() not in {"off", "0", "false", "no"}
            and os.environ.get("RANK", "0") == "0")


def client(uri: str) -> MlflowClient:
    """A client of the store at ``uri``, also made the fluent API's tracking and registry URI."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail within seconds when an HTTP tracking server does not answer its health check."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as response:
            response.read()


def experiment_id(mlflow_client: MlflowClient, uri: str) -> str:
    """``$MLFLOW_EXPERIMENT_NAME`` (default ``ptg``), created when missing; a sqlite store keeps the experiment's
    artifacts beside the database, in ``mlartifacts/``."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def bound_http_retries() -> None:
    """``HTTP_DEFAULTS`` into this process's environment where it has no setting of its own: read by MLflow's HTTP
    client, here and in the stages it spawns."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


class Deferred(Exception):  # noqa: N818 - not an error: the reason a record waits for its parent
    """A record left to the parent process that replays it (``PTG_TRACKING_DEFER``)."""


def guarded(what: str, call: Callable[[str], T], project: Path | None = None,
            pending: Callable[[Exception], Path | None] | None = None) -> T | None:
    """``call(uri)`` against the store of ``project`` when tracking is on and the store answers; None when tracking
    is off or anything fails (a warning, and the pending record ``pending`` writes, if any). A process whose parent
    replays its records (``PTG_TRACKING_DEFER``) writes the record at once and never touches MLflow."""
    if not tracking_enabled():
        return None
    if pending is not None and os.environ.get(DEFER_ENV, "").strip():
        pending(Deferred(what))
        return None
    uri = tracking_uri(project)
    bound_http_retries()
    try:
        check_reachable(uri)
        return call(uri)
    except Exception as e:
        log.warning("tracking skipped: %s at %s failed: %s: %s", what, uri, type(e).__name__, e)
        path = pending(e) if pending is not None else None
        if path is not None:
            log.warning("what was not logged is in %s; replay it with `ptg backfill`", path)
        return None


def create_store(project: Path | None = None) -> None:
    """Create the store and its experiment now: once, before several processes open runs side by side (MLflow's
    sqlite schema migration fails when they create the same new database at once)."""
    guarded("creating the tracking store", lambda uri: experiment_id(client(uri), uri), project)
