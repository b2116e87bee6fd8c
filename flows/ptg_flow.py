"""Prefect flow ``ptg-pipeline``: the DVC pipeline as one task per stage, under one MLflow parent run.

Each task runs ``dvc repro --single-item <stage>`` and is named after the stage (``prepare``, ``base_model``,
``sample@1`` ... ``evaluate@2``, ``baseline``, ``report``), in the pipeline's order. DVC decides what reruns and
skips up-to-date stages, so re-running a failed flow resumes at the stage that failed. Stages that download,
use the accelerator or write large folders are retried with a back-off; pure ones are not. The flow opens the
MLflow parent run (``ptg.tracking``) and closes it with the flow's final state; device and precision come from the
params file (``device: auto``), never from here.

With the repository's params.yaml the pipeline runs in the repository itself; with another params file, a given
``workdir``, or a ``rounds`` or ``launcher`` override it runs in a scratch DVC workspace
(``ptg.ops.workspace.make_workspace``; default build/<params file stem>, the folder ``make quick`` uses for
configs/quick.yaml). The overrides are written into the workspace's params.yaml (``ptg.ops.workspace.param_overrides``):
``rounds=N`` runs rounds 1..N (that chain), ``launcher`` is the command fit_guidance, train_lm and baseline start
with (e.g. "accelerate launch --multi_gpu --num_processes 4": data parallel on 4 GPUs; docs/reference.md).

Run locally, no server needed (Prefect starts a temporary local API):
    python flows/ptg_flow.py --params configs/quick.yaml [--rounds 1] [--launcher CMD] [--workdir DIR]
Deployments (a Prefect server, work pools, workers): see prefect.yaml.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import typer
import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from ptg import tracking
from ptg.ops.prefect_setup import FLOW
from ptg.ops.workspace import dvc_env, make_workspace, param_overrides, workspace_lock, workspace_slot, write_overrides

REPO = Path(__file__).resolve().parents[1]  # the project this flow file belongs to (a checkout or `ptg init`'s)
# Stages that download (base_model), run the model on the accelerator or write large folders: worth a retry.
RETRIED_STAGES = frozenset({"base_model", "sample", "fit_guidance", "train_lm", "evaluate", "baseline"})
RETRIES = 2
RETRY_DELAYS_S = [30, 120]
WORKSPACES = REPO / "build"  # `make quick` uses build/quick too


def _resolve(params_file: str) -> Path:
    path = Path(params_file)
    return path.resolve() if path.exists() or path.is_absolute() else (REPO / path).resolve()


def workdir_of(params_file: str, workdir: str | None, overrides: dict[str, Any]) -> Path:
    """The folder ``dvc repro`` runs in: the repository for its own params.yaml as it is, else a scratch workspace
    (never the repository's params.yaml rewritten)."""
    params = _resolve(params_file)
    if params == REPO / "params.yaml" and workdir is None and not overrides:
        return REPO
    return Path(workdir or WORKSPACES / params.stem).resolve()


@task(cache_policy=NO_CACHE)
def prepare_workdir(params_file: str, root: Path, overrides: dict[str, Any] | None = None) -> str:
    """Make or refresh the scratch workspace ``root`` (nothing to do for the repository itself) and write
    ``overrides`` (``ptg.ops.workspace.param_overrides``) into its params.yaml; a bad value fails here, naming the key
    and value, before any stage runs, and leaves the params file as it was."""
    params = _resolve(params_file)
    if root == REPO:
        return str(REPO)
    root = make_workspace(params, root)
    if overrides:
        write_overrides(root, overrides)
    return str(root)


def stage_order(listed: list[str]) -> list[str]:
    """The pipeline order of DVC's stage names as ``dvc stage list`` gives them (dvc.yaml order, each ``foreach``
    stage's rounds in a row): each run of per-round stages (``name@round``) is regrouped round by round, in the
    order dvc.yaml defines those stages, so round r's stages all run before round r + 1's."""
    out: list[str] = []
    i = 0
    while i < len(listed):
        j = i
        while j < len(listed) and "@" in listed[j]:
            j += 1
        if j == i:
            out.append(listed[i])
            i += 1
            continue
        block = listed[i:j]
        first = {name.split("@")[0]: k for k, name in reversed(list(enumerate(block)))}
        out += sorted(block, key=lambda name: (int(name.split("@")[1]), first[name.split("@")[0]]))
        i = j
    return out


@task(cache_policy=NO_CACHE)
def plan(workdir: str) -> list[tuple[str, str]]:
    """(task name, DVC stage name) in pipeline order, read from the workspace's dvc.yaml (``dvc stage list``):
    a stage or a round added there is in the plan, with nothing to edit here."""
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=workdir, env=dvc_env(), check=True,
                            capture_output=True, text=True).stdout.split()
    return [(name, name) for name in stage_order(listed)]


@task(cache_policy=NO_CACHE)
def dvc_stage(stage: str, workdir: str, parent_run_id: str | None = None) -> bool:
    """``dvc repro --single-item <stage>`` in ``workdir``, output streamed to the run log. True when the stage ran,
    False when DVC found it up to date."""
    logger = get_run_logger()
    records = tracking.deferral_dir(parent_run_id, Path(workdir)) if parent_run_id else None
    env = tracking.child_env(parent_run_id, Path(workdir), dvc_env(), defer=records)
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ran = False
    for line in proc.stdout:
        logger.info(line.rstrip())
        ran = ran or line.startswith("Running stage")
    code = proc.wait()
    if records is not None:  # the stage left its MLflow record to this task: log it now (DVC recorded the stage)
        tracking.replay_deferred(records, Path(workdir))
    if code != 0:
        raise RuntimeError(f"`dvc repro --single-item {stage}` failed with exit code {code} in {workdir}")
    return ran


def _options(name: str) -> dict:
    stage = name.split("@")[0]
    retries = RETRIES if stage in RETRIED_STAGES else 0
    return {"name": name, "task_run_name": name, "retries": retries, "retry_delay_seconds": RETRY_DELAYS_S}


@flow(name=FLOW)
def ptg_pipeline(rounds: int | None = None, params_file: str = "params.yaml", workdir: str | None = None,
                 launcher: str | None = None) -> dict[str, bool]:
    """Run the pipeline; returns, per stage task, whether DVC ran it (False: up to date, skipped). ``rounds`` and
    ``launcher`` override the params file's (see the module docstring). A deployment run waits while another
    deployment run holds the same workspace (``workspace_slot``); any other second run in a busy workspace fails at
    once (``ptg.ops.workspace.WorkspaceBusy``) and leaves the first one alone."""
    overrides = param_overrides(rounds, launcher)
    root = workdir_of(params_file, workdir, overrides)
    with workspace_slot(root), workspace_lock(root) as locked:
        root = prepare_workdir(params_file, locked, overrides)
        params = yaml.safe_load((Path(root) / "params.yaml").read_text())
        ran: dict[str, bool] = {}
        tags = {"prefect_flow_run_id": str(flow_run.id), "params_file": params_file, "workdir": root}
        with tracking.parent_run(f"ptg-pipeline {flow_run.name}", params, tags, project=Path(root)) as parent:
            for name, stage in plan(root):
                ran[name] = dvc_stage.with_options(**_options(name))(stage, root, parent)
        return ran


def main(params: str = typer.Option("params.yaml", help="params file (default: the repository's params.yaml)"),
         rounds: int = typer.Option(None, help="run rounds 1..N (default: the params' rounds)"),
         launcher: str = typer.Option(None, help="command fit_guidance, train_lm and baseline start with (default: "
                                      "the params' launcher), e.g. 'accelerate launch --multi_gpu --num_processes 4'"),
         workdir: str = typer.Option(None, help="scratch workspace folder (default build/<stem>)")) -> None:
    """Run the ptg-pipeline flow here, with Prefect's temporary local API when no server is configured."""
    # The temporary local API gets 20 s to start by default, too little on a busy 2-core machine.
    startup = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    with temporary_settings({startup: max(120, startup.value())}):
        ptg_pipeline(rounds=rounds, params_file=params, workdir=workdir, launcher=launcher)


if __name__ == "__main__":
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    app()
