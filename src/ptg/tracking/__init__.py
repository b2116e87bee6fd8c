"""Experiment tracking: every MLflow call of the project lives in this package.

MLflow only *tracks*. DVC decides what reruns and its outputs are the source of truth; a stage calls ``log_stage``
once at its end and never branches on whether tracking is on, reachable or off. The package by concern:

- ``store``: whether and where runs go. ``PTG_TRACKING=off`` (or 0/false/no): nothing is imported, created or
  written. ``MLFLOW_TRACKING_URI`` when set (e.g. ``http://127.0.0.1:5000``), else ``sqlite:///<project>/mlflow.db``
  where <project> is the DVC project of the working directory; for a sqlite store the experiment's artifacts go
  beside the database, in ``mlartifacts/`` (never the ./mlruns file store, which MLflow >= 3.13 refuses).
  Experiment: ``MLFLOW_EXPERIMENT_NAME``, default ``ptg``. HTTP retries and timeouts are bounded and a 3 s health
  probe comes first, so an unreachable server costs seconds.
- ``runs``: the parent run of one pipeline execution (``PTG_MLFLOW_PARENT_RUN_ID``, given to child processes by
  ``child_env``), the stage runs nested under it, named ``stage@round``, and ``backfill``.
- ``records``: what a stage asks to track, and the pending files (``metrics/.tracking_pending/<stage>@<round>.json``)
  it waits in while the store is unreachable; ``ptg backfill`` replays them.
- ``registry``: model folders as registered versions (``ptg-guidance`` / ``ptg-lm`` / ``ptg-lm-baseline``) and the
  ``best`` alias policy (``tracking.log_models``).
- ``provenance``: a stage run's tags ``git_commit``, ``dvc_stage`` and ``dvc_hash`` (the md5 of the stage's inputs as
  DVC sees them), and ``folder_md5``.
- ``pyfunc``: ``HFFolderModel``, what ``mlflow.pyfunc.load_model`` gives for a logged guidance folder.

Import the package (``from ptg import tracking``); its names below are the public API.
"""

from ptg.tracking.provenance import dvc_stage_hash, dvc_stage_name, folder_md5, git_commit
from ptg.tracking.pyfunc import LOADER_MODULE, HFFolderModel
from ptg.tracking.pyfunc import load_pyfunc as _load_pyfunc  # MLflow's entry point for loader_module="ptg.tracking"
from ptg.tracking.records import (
    PENDING_DIR,
    AliasRecord,
    PendingVersionError,
    StageRecord,
    StaleSourceError,
    flatten,
)
from ptg.tracking.registry import (
    BASELINE_MODEL,
    GUIDANCE_MODEL,
    LM_MODEL,
    LOG_MODELS_ENV,
    log_models_mode,
    logged_model_id,
    set_best_alias,
)
from ptg.tracking.runs import (
    PARENT_ENV,
    STATUSES,
    backfill,
    child_env,
    deferral_dir,
    end_parent,
    log_stage,
    parent_run,
    replay_deferred,
    replaying,
    run_command,
    start_parent,
)
from ptg.tracking.store import (
    EXPERIMENT,
    HTTP_DEFAULTS,
    SWITCH_ENV,
    create_store,
    project_root,
    tracking_enabled,
    tracking_uri,
)

__all__ = [
    "BASELINE_MODEL", "EXPERIMENT", "GUIDANCE_MODEL", "HTTP_DEFAULTS", "LM_MODEL", "LOADER_MODULE", "LOG_MODELS_ENV",
    "PARENT_ENV", "PENDING_DIR", "STATUSES", "SWITCH_ENV", "AliasRecord", "HFFolderModel", "PendingVersionError",
    "StageRecord", "StaleSourceError", "_load_pyfunc", "backfill", "child_env", "create_store", "deferral_dir",
    "dvc_stage_hash",
    "dvc_stage_name", "end_parent", "flatten", "folder_md5", "git_commit", "log_models_mode", "log_stage",
    "logged_model_id", "parent_run", "project_root", "replay_deferred", "replaying", "run_command", "set_best_alias",
    "start_parent",
    "tracking_enabled", "tracking_uri",
]
