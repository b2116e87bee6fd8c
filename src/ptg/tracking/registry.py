"""The model registry: a stage's model folder as a registered version, and the ``best`` alias policy.

A decoder-only LM folder is logged with MLflow's transformers flavour (bf16 weights, loadable as a text-generation
pipeline); any other folder (a guidance, a seq2seq LM) as a pyfunc model whose data is the folder itself
(``loader_module="ptg.tracking"``: ``mlflow.pyfunc.load_model`` needs ``ptg`` importable and gives an
``HFFolderModel``). Versions of ``ptg-guidance`` / ``ptg-lm`` / ``ptg-lm-baseline`` carry the tags ``run_id``,
``round``, ``stage``, ``dvc_hash`` and ``content_md5``; ``set_best_alias`` points ``best`` at the version with the
best evaluated metric. ``tracking.log_models`` says which folders get weights in the store: ``all`` (the default:
every version keeps its weights), ``best`` (one version per registered name holds weights; a better one evaluated
later takes them over, and the superseded version keeps its record, tagged ``weights: deleted``) or ``none``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptg.tracking.provenance import folder_md5
from ptg.tracking.pyfunc import LOADER_MODULE
from ptg.tracking.records import AliasRecord, PendingVersionError, stage_pending_for, write_pending
from ptg.tracking.store import client, experiment_id, guarded, project_root, tracking_enabled

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("ptg.tracking")

GUIDANCE_MODEL, LM_MODEL, BASELINE_MODEL = "ptg-guidance", "ptg-lm", "ptg-lm-baseline"
LOG_MODELS_ENV = "PTG_LOG_MODELS"
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "tokenizers")


def log_models_mode(start: Path | None = None) -> str:
    """``$PTG_LOG_MODELS`` when set, else params' ``tracking.log_models`` of the DVC project (its default,
    ``all``, without a params.yaml or a tracking group)."""
    from ptg.config import LOG_MODELS, ParamsError, TrackingParams, load_group, read_params

    value = os.environ.get(LOG_MODELS_ENV)
    if value is not None:
        if value not in LOG_MODELS:
            raise ParamsError(f"{LOG_MODELS_ENV} must be one of {', '.join(LOG_MODELS)}; got {value!r}")
        return value
    path = project_root(start) / "params.yaml"
    values = read_params(path) if path.is_file() else {}
    # only the tracking group: ``ptg track`` tracks any DVC project, whose params need not be a ptg pipeline's
    return load_group("tracking", path, values).log_models if "tracking" in values else TrackingParams().log_models


def register(mlflow_client: MlflowClient, run_id: str, model_dir: Path, registered_name: str | None,
             version_tags: Mapping[str, str]) -> str | None:
    """Log ``model_dir`` into run ``run_id``, which must be the active run: a decoder-only LM folder with MLflow's
    transformers flavour, any other folder as a pyfunc model whose data is the folder (``HFFolderModel``).
    Registers it as ``registered_name`` (when given) with ``version_tags`` plus run_id and content_md5; returns
    the version."""
    import mlflow

    md5 = folder_md5(model_dir)
    requirements = [f"{p}=={metadata.version(p)}" for p in MODEL_REQUIREMENTS]
    info = log_causal_lm(model_dir, registered_name, requirements)
    if info is None:
        info = mlflow.pyfunc.log_model(name="model", loader_module=LOADER_MODULE, data_path=str(model_dir),
                                       pip_requirements=requirements, registered_model_name=registered_name)
    if registered_name is None:
        return None
    version = str(info.registered_model_version)
    for key, value in {**version_tags, "run_id": run_id, "content_md5": md5}.items():
        mlflow_client.set_model_version_tag(registered_name, version, key, value)
    log.info("registered %s version %s", registered_name, version)
    return version


def log_causal_lm(model_dir: Path, registered_name: str | None, requirements: list[str]) -> Any:
    """``model_dir`` with MLflow's transformers flavour (task text-generation, weights in bf16) when it is a
    decoder-only LM folder; None for anything else (a guidance folder, a seq2seq LM)."""
    if not (model_dir / "config.json").is_file():
        return None
    import mlflow
    import torch

    from ptg.lm.models import is_seq2seq, load_lm, load_tokenizer

    model = load_lm(model_dir)
    if is_seq2seq(model):
        return None
    return mlflow.transformers.log_model(
        transformers_model={"model": model.to(torch.bfloat16), "tokenizer": load_tokenizer(model_dir)},
        name="model", task="text-generation", pip_requirements=requirements, registered_model_name=registered_name)


def logged_model_id(version: Any) -> str | None:
    """The logged model behind a registered version (MLflow 3 records it as the source ``models:/m-...``)."""
    model_id = getattr(version, "model_id", None)
    if not model_id and str(version.source).startswith("models:/m-"):
        model_id = str(version.source).removeprefix("models:/")
    return model_id or None


def drop_weights(mlflow_client: MlflowClient, name: str, version: Any, by: str) -> None:
    """log_models: best. Delete the weights of a superseded version (its logged model's artifacts) and keep its
    record: the version, its tags (run, round, stage, DVC hash, content md5, scores) and its logged model stay,
    tagged ``weights: deleted`` and ``superseded_by``, so the registry's history and lineage are whole."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if version.tags.get("weights") == "deleted":
        return
    model_id = logged_model_id(version)
    if model_id:
        get_artifact_repository(mlflow_client.get_logged_model(model_id).artifact_location).delete_artifacts()
    mlflow_client.set_model_version_tag(name, version.version, "weights", "deleted")
    mlflow_client.set_model_version_tag(name, version.version, "superseded_by", by)
    log.info("%s version %s superseded by version %s: its weights deleted, its record kept", name,
             version.version, by)


def set_best_alias(registered_name: str, model_dir: str | Path, metric: str, value: float, alias: str = "best",
                   greater_is_better: bool = True, weights: bool = True) -> str | None:
    """Record that the model in ``model_dir`` scored ``value`` on ``metric`` and point ``alias`` at the best version.

    The versions of ``registered_name`` holding ``model_dir`` (matched by ``content_md5``, so a DVC-skipped
    train_lm still matches) get the tag ``eval.<metric>``; the alias moves to the version with the best tagged
    value. Call it from ``evaluate@r`` after ``log_stage``, e.g.
    ``set_best_alias("ptg-lm", round_dir(r) / "lm", "rougeL", summary["rougeL"])``. Returns the aliased version
    (None when tracking is off or skipped; then a pending record is written for ``backfill``).

    With ``tracking.log_models: best`` no stage logged its folder: the folder is logged now, into the run of the
    stage that wrote it, only if it beats the version holding ``alias``, and the superseded version's weights are
    deleted (its record stays). ``weights=False`` (the baseline arm) logs nothing under ``best``.
    """
    if not tracking_enabled():
        return None
    mode = log_models_mode()
    if mode == "none" or (mode == "best" and not weights):
        return None
    model_dir = Path(model_dir).resolve()
    record = AliasRecord(registered_name, str(model_dir), folder_md5(model_dir), metric, float(value), alias,
                         greater_is_better, log_best=mode == "best")
    name = f"alias-{record.registered_name}-{record.alias}-{record.content_md5[:12]}"

    def pending(e: Exception) -> Path | None:
        # No version holds the model: worth replaying only when its own stage's record is pending too (a model
        # DVC did not retrain, logged to another store, never gets a version here).
        if isinstance(e, PendingVersionError) and not stage_pending_for(record.model_dir):
            return None
        return write_pending("alias", name, record, f"{type(e).__name__}: {e}")

    return guarded(f"moving alias {record.alias!r} of {record.registered_name}",
                   lambda uri: replay_alias(record, uri), pending=pending)


def replay_alias(record: AliasRecord, uri: str) -> str:
    """Tag the versions holding the evaluated folder with ``eval.<metric>`` and point the alias at the version
    with the best value (ties: the newest). Returns that version. Raises on any MLflow error."""
    mlflow_client = client(uri)
    name, key = record.registered_name, f"eval.{record.metric}"
    versions = mlflow_client.search_model_versions(f"name='{name}'")
    if record.log_best:
        return replace_best(mlflow_client, uri, record, versions)
    mine = [v for v in versions if v.tags.get("content_md5") == record.content_md5]
    if not mine:
        raise PendingVersionError(f"no version of {name} holds the evaluated model (content md5 "
                                  f"{record.content_md5}); its stage's logging may be pending")
    for version in mine:
        mlflow_client.set_model_version_tag(name, version.version, key, repr(float(record.value)))
        version.tags[key] = repr(float(record.value))
    sign = 1.0 if record.greater_is_better else -1.0
    scored = [(sign * float(v.tags[key]), int(v.version)) for v in versions
              if key in v.tags and math.isfinite(float(v.tags[key]))]
    best = str(max(scored)[1]) if scored else mine[-1].version
    mlflow_client.set_registered_model_alias(name, record.alias, best)
    log.info("%s@%s -> version %s (%s)", name, record.alias, best, key)
    return best


def replace_best(mlflow_client: MlflowClient, uri: str, record: AliasRecord, versions: list[Any]) -> str:
    """log_models: best. Keep the alias holder unless the evaluated folder beats it (ties keep it); else log
    the folder into the stage run that wrote it (found by its content_md5 tag), register it, move the alias
    and delete every other version's weights, keeping their records: one version per registered name holds
    weights. Runs that
    wrote identical bytes (a round that kept its warm start) resolve to the first of them, the folder's origin."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name, key = record.registered_name, f"eval.{record.metric}"
    value = repr(float(record.value))
    try:
        holder = mlflow_client.get_model_version_by_alias(name, record.alias) if versions else None
    except MlflowException:  # no version holds the alias
        holder = None
    sign = 1.0 if record.greater_is_better else -1.0
    if holder is not None and holder.tags.get("content_md5") == record.content_md5:  # the same bytes again
        old = float(holder.tags.get(key, "nan"))
        if not math.isfinite(old) or (math.isfinite(record.value) and sign * record.value > sign * old):
            mlflow_client.set_model_version_tag(name, holder.version, key, value)  # the tag keeps its best score
        return str(holder.version)
    if holder is not None and key in holder.tags and math.isfinite(float(holder.tags[key])) and (
            not math.isfinite(record.value) or sign * float(holder.tags[key]) >= sign * record.value):
        log.info("%s@%s stays version %s (%s %s against %s)", name, record.alias, holder.version, key,
                 holder.tags[key], value)
        return str(holder.version)
    runs = mlflow_client.search_runs([experiment_id(mlflow_client, uri)],
                                     f"tags.content_md5 = '{record.content_md5}'",
                                     order_by=["attributes.start_time ASC"], max_results=1)
    if not runs:
        raise PendingVersionError(f"no run of {name}'s stage holds the evaluated model (content md5 "
                                  f"{record.content_md5}); its stage's logging may be pending")
    run = runs[0]
    with mlflow.start_run(run_id=run.info.run_id):
        version = register(mlflow_client, run.info.run_id, Path(record.model_dir), name,
                           {"round": run.data.tags.get("round", ""), "stage": run.data.tags.get("stage", ""),
                            "dvc_hash": run.data.tags.get("dvc_hash", "unknown"), key: value})
    assert version is not None
    mlflow_client.set_registered_model_alias(name, record.alias, version)
    for old in versions:
        drop_weights(mlflow_client, name, old, version)
    log.info("%s@%s -> version %s (%s %s)", name, record.alias, version, key, value)
    return version
