"""Prefect flow ``ptg-pipeline``: the DVC pipeline as one task per stage, under one MLflow parent run.

Each task runs ``dvc repro --single-item <stage>`` and is named after the stage (``prepare``, ``base_model``,
``sample@1`` ... ``evaluate@2``, ``baseline``, ``report``), in the pipeline's order. DVC decides what reruns and
skips up-to-date stages, so re-running a failed flow resumes at the stage that failed. Stages that download,
use the accelerator or write large folders are retried with a back-off; pure ones are not. The flow opens the
MLflow parent run (``ptg.tracking``) and closes it with the flow's final state; device and precision come from the
params file (``device: auto``), never from here.

With the repository's params.yaml the pipeline runs in the repository itself; with another params file, a given
``workdir`` or a ``rounds`` count it runs in a scratch DVC workspace (``ptg.workspace.make_workspace``; default
build/<params file stem>, the folder ``make quick`` uses for configs/quick.yaml). ``rounds=N`` runs rounds 1..N:
the workspace's params get that chain.

Run locally, no server needed (Prefect starts a temporary local API):
    python flows/ptg_flow.py --params configs/quick.yaml [--rounds 1] [--workdir DIR]
Deployments (a Prefect server, work pools, workers): see prefect.yaml.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from ptg import tracking
from ptg.config import rounds as read_rounds
from ptg.prefect_setup import FLOW
from ptg.workspace import REPO, dvc_env, make_workspace, workspace_lock

ROUND_STAGES = ("sample", "rank", "fit_guidance", "train_lm", "evaluate")
# Stages that download (base_model), run the model on the accelerator or write large folders: worth a retry.
RETRIED_STAGES = frozenset({"base_model", "sample", "fit_guidance", "train_lm", "evaluate", "baseline"})
RETRIES = 2
RETRY_DELAYS_S = [30, 120]
WORKSPACES = REPO / "build"  # `make quick` uses build/quick too


def _resolve(params_file: str) -> Path:
    path = Path(params_file)
    return path.resolve() if path.exists() or path.is_absolute() else (REPO / path).resolve()


def workdir_of(params_file: str, workdir: str | None, rounds: int | None) -> Path:
    """The folder ``dvc repro`` runs in: the repository for its own params.yaml, else a scratch workspace."""
    params = _resolve(params_file)
    if params == REPO / "params.yaml" and workdir is None and rounds is None:
        return REPO
    return Path(workdir or WORKSPACES / params.stem).resolve()


@task(cache_policy=NO_CACHE)
def prepare_workdir(params_file: str, root: Path, rounds: int | None) -> str:
    """Make or refresh the scratch workspace ``root`` (nothing to do for the repository itself)."""
    params = _resolve(params_file)
    if root == REPO:
        return str(REPO)
    root = make_workspace(params, root)
    if rounds is not None:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1; got {rounds}")
        values = yaml.safe_load((root / "params.yaml").read_text())
        values["rounds"] = {str(r): {"prev": r - 1} for r in range(1, rounds + 1)}  # the format ptg.config reads
        (root / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return str(root)


@task(cache_policy=NO_CACHE)
def plan(workdir: str) -> list[tuple[str, str]]:
    """(task name, DVC stage name) in pipeline order; fails when dvc.yaml has a stage this plan lacks."""
    params = Path(workdir) / "params.yaml"
    rounds = [item["round"] for item in read_rounds(params)]
    steps = [("prepare", "prepare"), ("base_model", "base_model"), ("preferences", "preferences")]
    steps += [(f"{stage}@{r}", tracking.dvc_stage_name(stage, r, params)) for r in rounds for stage in ROUND_STAGES]
    steps += [("baseline", "baseline"), ("report", "report")]
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=workdir, env=dvc_env(), check=True,
                            capture_output=True, text=True).stdout.split()
    unknown = sorted(set(listed) - {name for _, name in steps})
    if unknown:
        raise RuntimeError(f"{workdir}/dvc.yaml has stages the flow does not run: {unknown}")
    return steps


@task(cache_policy=NO_CACHE)
def dvc_stage(stage: str, workdir: str, parent_run_id: str | None = None) -> bool:
    """``dvc repro --single-item <stage>`` in ``workdir``, output streamed to the run log. True when the stage ran,
    False when DVC found it up to date."""
    logger = get_run_logger()
    env = dvc_env() | {"MLFLOW_TRACKING_URI": tracking.tracking_uri(Path(workdir))}
    env.pop(tracking.PARENT_ENV, None)
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ran = False
    for line in proc.stdout:
        logger.info(line.rstrip())
        ran = ran or line.startswith("Running stage")
    if proc.wait() != 0:
        raise RuntimeError(f"`dvc repro --single-item {stage}` failed with exit code {proc.returncode} in {workdir}")
    return ran


def _options(name: str) -> dict:
    stage = name.split("@")[0]
    retries = RETRIES if stage in RETRIED_STAGES else 0
    return {"name": name, "task_run_name": name, "retries": retries, "retry_delay_seconds": RETRY_DELAYS_S}


@flow(name=FLOW)
def ptg_pipeline(rounds: int | None = None, params_file: str = "params.yaml", workdir: str | None = None
                 ) -> dict[str, bool]:
    """Run the pipeline; returns, per stage task, whether DVC ran it (False: up to date, skipped). A second run in
    the same workspace fails at once (``ptg.workspace.WorkspaceBusy``) and leaves the first one alone."""
    with workspace_lock(workdir_of(params_file, workdir, rounds)) as locked:
        root = prepare_workdir(params_file, locked, rounds)
        params = yaml.safe_load((Path(root) / "params.yaml").read_text())
        ran: dict[str, bool] = {}
        tags = {"prefect_flow_run_id": str(flow_run.id), "params_file": params_file, "workdir": root}
        with tracking.parent_run(f"ptg-pipeline {flow_run.name}", params, tags, project=Path(root)) as parent:
            for name, stage in plan(root):
                ran[name] = dvc_stage.with_options(**_options(name))(stage, root, parent)
        return ran


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: the repository's params.yaml)")
    ap.add_argument("--rounds", type=int, default=None, help="run rounds 1..N (default: the params' rounds)")
    ap.add_argument("--workdir", default=None, help="scratch workspace folder (default build/<stem>)")
    args = ap.parse_args()
    # The temporary local API gets 20 s to start by default, too little on a busy 2-core machine.
    startup = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    with temporary_settings({startup: max(120, startup.value())}):
        ptg_pipeline(rounds=args.rounds, params_file=args.params, workdir=args.workdir)
