"""Runs: the parent run of one pipeline execution, the environment its child processes log under, the stage runs
nested in it, and the replay of pending records.

``PTG_MLFLOW_PARENT_RUN_ID`` names the parent run (opened by ``ptg run`` / ``ptg quick``, the bench or the
Prefect flow); each stage execution is a run nested under it (``mlflow.start_run(parent_run_id=...)``), named
``stage@round`` (or ``stage``). Without it (a plain ``dvc repro``) each stage logs a standalone run, tagged
``standalone=true``. Summary metrics are also logged on the parent as ``<stage>/<metric>`` at ``step=round`` so
the MLflow UI charts them against the round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ptg.tracking.provenance import DEFERRED_HASH, folder_md5, git_commit, lock_hash, settled_lock, stage_tags
from ptg.tracking.records import (
    DEFER_ENV,
    PENDING_DIR,
    AliasRecord,
    StageRecord,
    flatten,
    history_rows,
    param_value,
    read_pending,
    read_source,
    split_metrics,
    write_pending,
)
from ptg.tracking.registry import log_models_mode, register, replay_alias
from ptg.tracking.store import (
    SWITCH_ENV,
    bound_http_retries,
    check_reachable,
    client,
    experiment_id,
    guarded,
    project_root,
    tracking_enabled,
    tracking_uri,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("ptg.tracking")

PARENT_ENV = "PTG_MLFLOW_PARENT_RUN_ID"
STATUSES = ("FINISHED", "FAILED", "KILLED")


def start_parent(name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                 project: Path | None = None) -> str | None:
    """Open the parent run of one pipeline execution in the store of ``project`` (default: the working
    directory's); its id (give it to the stages with ``child_env``), or None when tracking is off or the server is
    unreachable."""
    def call(uri: str) -> str:
        from mlflow.entities import Param

        mlflow_client = client(uri)
        run = mlflow_client.create_run(experiment_id(mlflow_client, uri), run_name=name,
                                       tags={"kind": "pipeline", "git_commit": git_commit(), **(tags or {})})
        mlflow_client.log_batch(run.info.run_id,
                                params=[Param(k, param_value(v)) for k, v in flatten(params).items()])
        log.info("parent run %s (%s) at %s", run.info.run_id, name, uri)
        return run.info.run_id

    return guarded(f"opening parent run {name!r}", call, project)


def end_parent(run_id: str | None, status: str = "FINISHED", project: Path | None = None) -> None:
    """Close a parent run with ``status`` (FINISHED, FAILED or KILLED); None is ignored."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}; got {status!r}")
    if run_id:
        guarded(f"closing parent run {run_id}", lambda uri: client(uri).set_terminated(run_id, status), project)


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


def child_env(parent_run_id: str | None, project: Path | None = None,
              base: Mapping[str, str] | None = None, defer: Path | None = None) -> dict[str, str]:
    """The environment (``base``, default this process's) of a child process whose stages log where this process
    does: the store of ``project`` as ``MLFLOW_TRACKING_URI``, nested under ``parent_run_id`` (standalone when
    None, whatever ``base`` said); with ``defer`` (and a parent), the stages write their records into that folder
    for this process to replay (``replay_deferred``) instead of importing MLflow each."""
    env = dict(os.environ if base is None else base, MLFLOW_TRACKING_URI=tracking_uri(project))
    env.pop(PARENT_ENV, None)
    env.pop(DEFER_ENV, None)
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
        if defer is not None:
            env[DEFER_ENV] = str(Path(defer).resolve())
    return env


def deferral_dir(parent_run_id: str, project: Path | None = None) -> Path:
    """The folder the stages of parent run ``parent_run_id`` leave their records in (DVC's own tmp folder of
    ``project``, which DVC ignores)."""
    return project_root(project) / ".dvc" / "tmp" / "ptg-tracking" / parent_run_id


def replay_deferred(directory: Path, project: Path | None = None, final: bool = True) -> tuple[int, int]:
    """Log the records the stages left in ``directory`` (``child_env(..., defer=...)``) into the store of
    ``project`` (default: the working directory's). A stage's record is logged once DVC recorded the stage (its
    dvc.lock changed after the record was written: the record's dvc_hash is read from there, ``lock_hash``), an
    alias's once no stage record waits; ``final`` logs all that is left (the command ended), and what could not be
    logged moves to the project's ``PENDING_DIR`` for ``ptg backfill``. Returns (logged, left)."""
    if not directory.is_dir():
        return 0, 0
    entries = read_pending(directory)
    stages = [(p, e) for p, e in entries if e["kind"] == "stage"]

    def ready(path: Path, entry: dict[str, Any]) -> bool:
        """Final, or DVC has recorded the stage: its dvc.lock, settled, holds the stage's entry (whose hash a
        deferred record takes now, from the text that was checked)."""
        tags = entry["record"]["tags"]
        if final or tags.get("dvc_hash") != DEFERRED_HASH:
            return final
        workdir, name = tags.get("cwd", "."), tags["dvc_stage"]
        text = settled_lock(workdir, newer_than=path.stat().st_mtime)
        if text is None or (digest := lock_hash(workdir, name, text)) == "unknown":
            return False
        tags["dvc_hash"] = digest
        return True

    todo = [(p, e) for p, e in stages if ready(p, e)]
    if len(todo) == len(stages):
        todo += [(p, e) for p, e in entries if e["kind"] != "stage"]
    done = 0
    uri = tracking_uri(project)
    bound_http_retries()
    try:
        check_reachable(uri)
    except Exception as e:
        log.warning("tracking skipped: %s unreachable: %s: %s", uri, type(e).__name__, e)
        todo = []
    if todo:
        for path, entry in todo:
            try:
                if entry["kind"] == "stage":
                    replay_stage(StageRecord(**entry["record"]).with_sources(), uri)
                else:
                    replay_alias(AliasRecord(**entry["record"]), uri)
            except Exception as e:
                log.warning("could not log %s: %s: %s", path.name, type(e).__name__, e)
                continue
            path.unlink()
            done += 1
    left = sorted(directory.glob("*.json"))
    if final:
        pending = project_root(project) / PENDING_DIR
        for path in left:
            pending.mkdir(parents=True, exist_ok=True)
            shutil.move(path, pending / path.name)
            log.warning("what was not logged is in %s; replay it with `ptg backfill`", pending / path.name)
        shutil.rmtree(directory, ignore_errors=True)
    return done, len(left)


@contextlib.contextmanager
def replaying(directory: Path, project: Path | None = None, every_s: float = 1.0) -> Iterator[None]:
    """Log the records stages leave in ``directory`` into the store of ``project`` while the block runs (a thread,
    every ``every_s`` seconds, each once DVC recorded its stage) and all that is left when it ends."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a record half-seen now is logged on the next pass
                replay_deferred(directory, project, final=False)

    thread = threading.Thread(target=watch, name="ptg-tracking-replay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        replay_deferred(directory, project, final=True)


def run_command(command: Sequence[str], name: str | None = None, params_file: str | Path = "params.yaml",
                defer: bool = False) -> int:
    """Run ``command`` (e.g. ``dvc repro``) under a new parent run (``child_env``); the parent ends FINISHED,
    FAILED (non-zero exit) or KILLED (interrupt). Returns the command's exit code (130 on an interrupt). ``defer``
    (a ``dvc repro`` in this project): this process logs what the stages record (``replaying``), so no stage
    imports MLflow; not for ``dvc exp run --temp``, whose stages run in a copy that is gone when it ends."""
    params_file = Path(params_file)
    params = (yaml.safe_load(params_file.read_text()) or {}) if params_file.is_file() else {}
    name = name or f"pipeline {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}"
    tags = {"command": " ".join(command), "params_file": str(params_file)}
    try:
        with parent_run(name, params, tags) as run_id:
            if defer and run_id:
                directory = deferral_dir(run_id)
                with replaying(directory):
                    subprocess.run(list(command), env=child_env(run_id, defer=directory), check=True)
            else:
                subprocess.run(list(command), env=child_env(run_id), check=True)
    except subprocess.CalledProcessError as e:
        return e.returncode
    except KeyboardInterrupt:
        return 130
    return 0


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
    ``artifacts`` (files or folders); ``model_dir`` as a model, registered as ``registered_name`` when given;
    and, with ``step_metrics_on_parent``, the metrics on the parent as ``<stage>/<metric>`` at ``step=round``.
    ``dvc_stage`` names the DVC stage whose hash tags the run when it is not ``stage`` of ``round`` (e.g.
    ``"baseline"`` for ``baseline_train_lm@1``). Never raises for tracking trouble: an unreachable store leaves a
    pending record (``ptg backfill``).
    """
    if registered_name is not None and model_dir is None:
        raise ValueError(f"log_stage({stage!r}): registered_name {registered_name!r} needs a model_dir")
    if not tracking_enabled():
        return
    sources = {}
    if isinstance(metrics, str | Path):
        sources["metrics"] = {"path": str(Path(metrics).resolve())}
        metrics, sources["metrics"]["md5"] = read_source("metrics", metrics)
    if isinstance(history, str | Path):
        sources["history"] = {"path": str(Path(history).resolve())}
        history, sources["history"]["md5"] = read_source("history", history)
    numbers, info = split_metrics(metrics)
    if model_dir is not None and log_models_mode() != "all":  # the run names its folder; DVC keeps it, and with
        # log_models: best, set_best_alias logs it into this run once it is the best evaluated one
        info |= {"model_dir": str(Path(model_dir).resolve()), "content_md5": folder_md5(model_dir)}
        model_dir = registered_name = None
    record = StageRecord(
        stage=stage, round=round,
        params={k: param_value(v) for k, v in flatten(params).items()}, metrics=numbers,
        history=history_rows(history), artifacts=[str(Path(p).resolve()) for p in artifacts],
        model_dir=str(Path(model_dir).resolve()) if model_dir is not None else None,
        registered_name=registered_name, step_metrics_on_parent=step_metrics_on_parent,
        parent_run_id=os.environ.get(PARENT_ENV) or None,
        tags=stage_tags(stage, round, dvc_stage, deferred=bool(os.environ.get(DEFER_ENV))) | info,
        sources=sources)
    guarded(f"logging {record.run_name}", lambda uri: replay_stage(record, uri),
            pending=lambda e: write_pending("stage", record.run_name, record, f"{type(e).__name__}: {e}"))


def replay_stage(record: StageRecord, uri: str) -> str:
    """Log ``record`` (now) into the store at ``uri``; returns the stage run's id. Raises on any MLflow error (the
    run then ends FAILED)."""
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    if record.tags.get("dvc_hash") == DEFERRED_HASH:  # left to the parent: DVC has recorded the stage by now
        record.tags["dvc_hash"] = lock_hash(record.tags.get("cwd", "."), record.tags.get("dvc_stage", record.run_name))
    parent = None
    if record.parent_run_id:
        with contextlib.suppress(MlflowException):
            parent = mlflow_client.get_run(record.parent_run_id)
        if parent is None:
            log.warning("parent run %s not found at %s: logging %s standalone", record.parent_run_id, uri,
                        record.run_name)
    tags = dict(record.tags) if parent is not None else {**record.tags, "standalone": "true"}
    experiment = parent.info.experiment_id if parent is not None else experiment_id(mlflow_client, uri)
    with mlflow.start_run(experiment_id=experiment, run_name=record.run_name, tags=tags,
                          parent_run_id=parent.info.run_id if parent is not None else None) as run:
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in record.metrics.items()]
        metrics += [Metric(f"history/{k}", v, now, int(row["update"]))
                    for row in record.history for k, v in row.items() if k != "update"]
        mlflow_client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in record.params.items()])
        for artifact in map(Path, record.artifacts):
            if artifact.is_dir():
                mlflow_client.log_artifacts(run_id, str(artifact), artifact.name)
            else:
                mlflow_client.log_artifact(run_id, str(artifact))
        if record.model_dir is not None:
            register(mlflow_client, run_id, Path(record.model_dir), record.registered_name,
                     {"round": record.tags.get("round", ""), "stage": record.stage,
                      "dvc_hash": record.tags.get("dvc_hash", "unknown")})
        if parent is not None and record.step_metrics_on_parent and record.metrics:
            step = record.round if record.round is not None else 0
            mlflow_client.log_batch(parent.info.run_id, metrics=[Metric(f"{record.stage}/{k}", v, now, step)
                                                                 for k, v in record.metrics.items()])
    log.info("logged %s as run %s at %s", record.run_name, run_id, uri)
    return run_id


def backfill(directory: str | Path = PENDING_DIR) -> tuple[int, int]:
    """Replay the pending records in ``directory`` into the configured MLflow (stages first, then aliases);
    replayed records are deleted. Returns (replayed, still pending)."""
    if not tracking_enabled():
        raise RuntimeError(f"{SWITCH_ENV} is off: nothing to replay into")
    entries = read_pending(directory)
    uri = tracking_uri()
    bound_http_retries()
    check_reachable(uri)
    done = 0
    for path, entry in entries:
        try:
            if entry["kind"] == "stage":
                replay_stage(StageRecord(**entry["record"]).with_sources(), uri)
            else:
                replay_alias(AliasRecord(**entry["record"]), uri)
        except Exception as e:
            log.warning("could not replay %s: %s: %s", path, type(e).__name__, e)
            continue
        path.unlink()
        done += 1
    log.info("backfill: %d replayed, %d still pending in %s", done, len(entries) - done, directory)
    return done, len(entries) - done
