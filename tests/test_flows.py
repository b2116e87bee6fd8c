"""The Prefect flow on the quick profile (tiny random Llama, 2 rounds) in a scratch workspace with a throw-away
sqlite MLflow: every stage task completes and is tracked; a failed run resumes at the failed stage; the one-command
local run; and a deployment run by a process worker of a real `prefect server` (loopback only).

The pipeline runs once (module fixture, a few minutes on CPU); the later tests reuse its workspace, where DVC skips
every stage whose inputs did not change.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import yaml
from conftest import REPO, hold_workspace, prefect_env, write_prompt_quick
from mlflow import MlflowClient

from ptg import tracking
from ptg.ops import prefect_setup, workspace

VENV_BIN = Path(sys.executable).parent
HOOK = Path(__file__).resolve().parent / "pause_hook"  # fault injection in one stage process
QUICK = REPO / "configs" / "quick.yaml"
ROUND_STAGES = ("sample", "rank", "fit_guidance", "train_lm", "evaluate")
SETUP = ["sources", "prepare", "base_model", "preferences"]
TASKS = [*SETUP, *(f"{s}@{r}" for r in (1, 2) for s in ROUND_STAGES), "baseline", "report"]


@pytest.fixture(scope="module")
def flows() -> ModuleType:
    """flows/ptg_flow.py as a module."""
    spec = importlib.util.spec_from_file_location("ptg_flow", REPO / "flows" / "ptg_flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness(env):
    """Flows called in this process run against a temporary Prefect database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def quick_run(env, harness, flows):
    workdir = env / "quick"
    state = flows.ptg_pipeline(rounds=2, params_file=str(QUICK), workdir=str(workdir), return_state=True)
    return workdir, state


def task_states(flow_state) -> dict[str, str]:
    """Task run name -> state name of the flow run behind ``flow_state`` (the last attempt)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=flow_filter, sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return {t.name: t.state.name for t in runs}


def mlflow_client() -> MlflowClient:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def parent_of(c: MlflowClient, flow_state):
    experiment = c.get_experiment_by_name(tracking.EXPERIMENT)
    flow_run_id = str(flow_state.state_details.flow_run_id)
    (parent,) = c.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{flow_run_id}'")
    return parent


@pytest.mark.slow
def test_quick_flow_runs_every_stage_and_tracks_it(quick_run):
    workdir, state = quick_run
    assert state.is_completed(), state.message
    ran = state.result()
    assert list(ran) == TASKS and all(ran.values())  # a fresh workspace: DVC ran every stage
    states = task_states(state)
    assert {name: states.get(name) for name in TASKS} == dict.fromkeys(TASKS, "Completed")
    assert (workdir / "metrics" / "report" / "eval_by_round.csv").is_file()

    c = mlflow_client()
    parent = parent_of(c, state)
    assert parent.info.status == "FINISHED" and parent.data.tags["workdir"] == str(workdir)
    experiment = c.get_experiment_by_name(tracking.EXPERIMENT)
    nested = c.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {run.info.run_name for run in nested}
    assert {f"{s}@{r}" for r in (1, 2) for s in ROUND_STAGES} <= names
    assert any(name.startswith("baseline") for name in names)
    # tracking.log_models: all (the default): every round's LM and guidance and the baseline's LMs registered with
    # their weights; the alias best on the best evaluated.
    evaluated = [json.loads((workdir / "metrics" / "rounds" / str(r) / "evaluate.json").read_text())["rougeL"]
                 for r in (1, 2)]
    for name in (tracking.GUIDANCE_MODEL, tracking.LM_MODEL, tracking.BASELINE_MODEL):
        versions = c.search_model_versions(f"name='{name}'")
        assert sorted(v.tags["round"] for v in versions) == ["1", "2"], name
        assert not [v for v in versions if "weights" in v.tags]  # none lost its weights
    for name in (tracking.GUIDANCE_MODEL, tracking.LM_MODEL):
        best = c.get_model_version_by_alias(name, "best")
        assert float(best.tags["eval.rougeL"]) == max(evaluated)


@pytest.mark.slow
def test_prompt_task_flow_runs_every_stage(env, harness, flows):
    """configs/prompt.yaml's task (tiny models): the same flow and stages, the prompt task's artifacts."""
    from ptg import schemas
    from ptg.io import read_table

    workdir = env / "prompt"
    state = flows.ptg_pipeline(rounds=1, params_file=str(write_prompt_quick(env / "prompt.yaml")),
                               workdir=str(workdir), return_state=True)
    assert state.is_completed(), state.message
    expected = [*SETUP, *(f"{s}@1" for s in ROUND_STAGES), "baseline", "report"]
    assert list(state.result()) == expected
    metrics = workdir / "metrics"
    ptg, base = (json.loads((metrics / d / "1" / "evaluate.json").read_text()) for d in ("rounds", "baseline"))
    for ev in (ptg, base):
        assert 0 <= ev["accuracy"] <= 1 and ev["items"] == 40 and ev["classifier_pairs"] > 0
    # PTG's last evaluation scores the untrained baselines once, per text too
    untrained = {"best_of_n": "best_of_n_accuracy", "manual": "manual_accuracy", "empty": "empty_accuracy",
                 "manual_calibrated": "manual_accuracy_calibrated", "empty_calibrated": "empty_accuracy_calibrated"}
    assert set(untrained.values()) <= set(ptg) and "majority_rate" in ptg and "manual_accuracy" not in base
    trained = json.loads((metrics / "baseline" / "1" / "train_lm.json").read_text())
    # configs/prompt.yaml: baseline_budget calls, so the baseline gets train_inputs x K / batch_size = 4 updates
    assert trained["objective"] == "reinforce" and trained["updates"] == 4 * 4 // 4
    assert trained["classifier_pairs"] == 4 * 4 * 64  # its sequence-level credit: 4 updates x 4 prompts x 64 texts
    assert json.loads((metrics / "rounds" / "1" / "rank.json").read_text())["classifier_pairs"] == (4 + 2) * 4 * 64
    candidates = read_table(workdir / "data" / "rounds" / "1" / "predictions.parquet", schemas.PromptCandidates)
    assert candidates["rank"].min() == 1 and candidates["guidance_score"].notna().all()
    assert (workdir / "data" / "rounds" / "1" / "heatmap.png").is_file()
    items = pd.read_csv(metrics / "rounds" / "1" / "evaluate_items.csv")
    assert len(items) == 40 and items["correct"].mean() == pytest.approx(ptg["accuracy"])
    for name, key in untrained.items():
        assert items[f"{name}_correct"].mean() == pytest.approx(ptg[key])


@pytest.mark.slow
def test_failed_run_resumes_at_the_failed_stage(quick_run, harness, flows, env, monkeypatch):
    """evaluate@1 fails (a fault injected by tests/pause_hook: params are checked at every stage's start, so a bad
    value would fail the first stage instead); the next run re-runs from there, DVC skipping the rest."""
    workdir, _ = quick_run
    resume = env / "resume"
    shutil.copytree(workdir, resume, symlinks=True)
    monkeypatch.setattr(flows, "RETRIES", 0)  # the injected fault fails the same way every time
    params = yaml.safe_load(QUICK.read_text())
    # differs from quick.yaml and is read by evaluate and baseline only (evaluate.batch_size is train_lm's too: its
    # checkpoint validation decodes in those batches), so the evaluations really run again and the training not
    params["evaluate"]["subset_items"] = 2
    (env / "changed.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lm = resume / "data" / "rounds" / "2" / "lm" / "model.safetensors"
    lm_mtime = lm.stat().st_mtime_ns
    hook = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")])),
            "PTG_PAUSE_STAGE": "stages/evaluate.py --round 1",
            "PTG_PAUSE_AT": "ptg.pipeline.evaluation:evaluate_lm:raise", "PTG_PAUSE_FILE": str(env / "unused")}
    with monkeypatch.context() as m:
        for key, value in hook.items():
            m.setenv(key, value)
        failed = flows.ptg_pipeline(rounds=2, params_file=str(env / "changed.yaml"), workdir=str(resume),
                                    return_state=True)
    assert failed.is_failed()
    states = task_states(failed)
    first = TASKS.index("evaluate@1")
    assert {name: states.get(name) for name in TASKS[:first + 1]} == {
        **dict.fromkeys(TASKS[:first], "Completed"), "evaluate@1": "Failed"}
    assert not set(TASKS[first + 1:]) & set(states)
    assert parent_of(mlflow_client(), failed).info.status == "FAILED"

    ran = flows.ptg_pipeline(rounds=2, params_file=str(env / "changed.yaml"), workdir=str(resume))
    skipped = [name for name in TASKS
               if name.split("@")[0] != "evaluate" and name not in ("baseline", "report", "sources", "preferences")]
    assert not any(ran[name] for name in skipped), ran
    assert ran["evaluate@1"] and ran["evaluate@2"] and ran["baseline"]
    assert lm.stat().st_mtime_ns == lm_mtime


def test_the_plan_is_read_from_dvc_yaml_and_follows_an_added_stage(flows, env, tmp_path):
    """The flow has no stage list of its own: its plan is the workspace's dvc.yaml, round by round; a stage (and a
    round) added to a copy of dvc.yaml is in the plan, in its place."""
    from ptg.ops.workspace import make_workspace

    params = yaml.safe_load(QUICK.read_text()) | {"rounds": {"1": {"prev": 0}, "2": {"prev": 1}, "3": {"prev": 2}}}
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    root = make_workspace(tmp_path / "three.yaml", tmp_path / "ws")
    steps = [name for name, dvc_name in flows.plan.fn(str(root)) if name == dvc_name]
    assert steps == [*SETUP, *(f"{s}@{r}" for r in (1, 2, 3) for s in ROUND_STAGES), "baseline", "report"]
    dvc_yaml = root / "dvc.yaml"
    spec = yaml.safe_load(dvc_yaml.read_text())
    stages = list(spec["stages"].items())
    at = [name for name, _ in stages].index("fit_guidance") + 1
    audit = {"foreach": "${rounds}", "do": {"cmd": "echo audit ${key}"}}
    spec["stages"] = dict(stages[:at] + [("audit", audit)] + stages[at:] + [("publish", {"cmd": "echo publish"})])
    dvc_yaml.unlink()  # the workspace's copy (or link) of the packaged dvc.yaml: edit a copy
    dvc_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    per_round = ["sample", "rank", "fit_guidance", "audit", "train_lm", "evaluate"]
    assert [name for name, _ in flows.plan.fn(str(root))] == [
        *SETUP, *(f"{s}@{r}" for r in (1, 2, 3) for s in per_round), "baseline", "report", "publish"]


def test_retry_policy(flows):
    assert flows._options("sample@1")["retries"] == flows.RETRIES > 0
    assert flows._options("base_model")["retries"] == flows.RETRIES
    assert flows._options("rank@2")["retries"] == 0 and flows._options("report")["retries"] == 0
    assert flows._options("evaluate@2")["task_run_name"] == "evaluate@2"


def test_rounds_and_launcher_reach_the_workspace_params_and_are_checked(flows, tmp_path):
    """The flow's `rounds` and `launcher` parameters are written into the scratch workspace's params.yaml (one code
    path, the rest of the params file kept), where DVC interpolates the launcher into the training stages' cmd; a
    bad value fails in prepare_workdir, before any stage runs. No Prefect API: the task's function alone."""
    from dvc.repo import Repo

    from ptg.config import ParamsError

    launcher = "accelerate launch --multi_gpu --num_processes 4"
    overrides = workspace.param_overrides(rounds=1, launcher=launcher)
    assert workspace.param_overrides() == {}
    assert flows.workdir_of("params.yaml", None, {}) == REPO
    assert flows.workdir_of("params.yaml", None, workspace.param_overrides(launcher=launcher)) == \
        REPO / "build" / "params"
    root = Path(flows.prepare_workdir.fn(str(QUICK), tmp_path / "ws", overrides))
    params, quick = yaml.safe_load((root / "params.yaml").read_text()), yaml.safe_load(QUICK.read_text())
    assert params == quick | {"launcher": launcher, "rounds": {"1": {"prev": 0}}}
    with Repo(str(root)) as repo:
        commands = {stage.name: stage.cmd for stage in repo.index.stages}
    assert commands["train_lm@1"] == f"{launcher} stages/train_lm.py --round 1"
    assert commands["fit_guidance@1"] == f"{launcher} stages/fit_guidance.py --round 1"
    assert commands["baseline"] == f"{launcher} stages/baseline.py"
    assert commands["sample@1"] == "python stages/sample.py --round 1" and "train_lm@2" not in commands

    for bad in ("", " "):
        written = (root / "params.yaml").read_text()
        with pytest.raises(ParamsError, match=rf"ws/params.yaml: launcher must be a non-empty command .*got '{bad}'"):
            workspace.write_overrides(root, workspace.param_overrides(launcher=bad))
        assert (root / "params.yaml").read_text() == written  # a rejected value writes nothing
        with pytest.raises(ParamsError, match=rf"ws/params.yaml: launcher must be a non-empty command .*got '{bad}'"):
            flows.prepare_workdir.fn(str(QUICK), tmp_path / "ws", workspace.param_overrides(launcher=bad))
    with pytest.raises(ValueError, match="rounds must be >= 1; got 0"):
        workspace.param_overrides(rounds=0)


def test_every_deployment_runs_a_shipped_params_file_on_as_many_gpus_as_processes(flows, tmp_path):
    """prefect.yaml's deployments: their parameters are the flow's, their params file ships with the repository and
    loads with their overrides, and a GPU deployment's launcher starts one process per GPU it requests."""
    import inspect

    from ptg.config import load as load_params

    flow_parameters = set(inspect.signature(flows.ptg_pipeline.fn).parameters)
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {"ptg-local", "ptg-gpu", "ptg-gpu-4"} <= {d["name"] for d in deployments}
    for deployment in deployments:
        name, parameters = deployment["name"], deployment["parameters"]
        assert set(parameters) <= flow_parameters, name
        assert (REPO / parameters["params_file"]).is_file(), name
        overrides = workspace.param_overrides(parameters.get("rounds"), parameters.get("launcher"))
        root = Path(flows.prepare_workdir.fn(parameters["params_file"], tmp_path / name, overrides))
        load_params(root / "params.yaml")
        kwargs = deployment["work_pool"]["job_variables"].get("container_create_kwargs") or {}
        gpus = sum(request["count"] for request in kwargs.get("device_requests", []))
        launcher = load_params(root / "params.yaml").run.launcher
        processes = re.search(r"--num_processes[ =](\d+)", launcher)
        assert (int(processes.group(1)) if processes else 1) == max(gpus, 1), (name, launcher, gpus)


@pytest.mark.slow
def test_one_command_local_run(quick_run, tmp_path):
    """`python flows/ptg_flow.py --params configs/quick.yaml` with no server: Prefect's temporary local API."""
    workdir, _ = quick_run
    done = subprocess.run([sys.executable, "flows/ptg_flow.py", "--params", "configs/quick.yaml", "--rounds", "2",
                           "--workdir", str(workdir)], cwd=REPO, env=prefect_env(tmp_path / "prefect"),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"Flow run '[^']+' - Finished in state Completed", done.stdout + done.stderr)


def test_prefect_setup_is_idempotent_and_matches_prefect_yaml(env, harness):
    """`ptg prefect-setup` twice: one pool, one automation, its window the last one asked for; and the heartbeat the
    window assumes is the one prefect.yaml gives every deployment's runs."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import Posture

    for deployment in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        heartbeat = deployment["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]
        assert heartbeat == str(prefect_setup.HEARTBEAT_S), deployment["name"]
    assert prefect_setup.HEARTBEAT_S < prefect_setup.CRASH_AFTER_S
    with pytest.raises(ValueError, match="longer than the heartbeat period"):
        prefect_setup.zombie_automation(prefect_setup.HEARTBEAT_S)

    pool = "ptg-process-setup-test"
    from typer.testing import CliRunner

    from ptg.cli import app

    runner = CliRunner()
    first = runner.invoke(app, ["prefect-setup", "--pool", pool, "--crash-after", "45"])
    again = runner.invoke(app, ["prefect-setup", "--pool", pool])
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    out = first.output + again.output
    assert f"'{pool}': created (process)" in out and f"'{pool}': exists (process)" in out

    async def read():
        async with get_client() as client:
            return await client.read_automations_by_name(prefect_setup.AUTOMATION)

    (automation,) = asyncio.run(read())
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive and trigger.within.total_seconds() == prefect_setup.CRASH_AFTER_S
    assert trigger.after == {"prefect.flow-run.heartbeat"} and trigger.for_each == {"prefect.resource.id"}
    assert [a.type for a in automation.actions] == ["change-flow-run-state"]
    assert automation.actions[0].state.value == "CRASHED" and automation.enabled


def test_a_second_flow_in_a_busy_workspace_fails_before_touching_it(env, harness, flows):
    from ptg.ops.workspace import workspace_lock

    workdir = env / "busy"
    holder = hold_workspace(workdir)
    try:
        state = flows.ptg_pipeline(rounds=1, params_file=str(QUICK), workdir=str(workdir), return_state=True)
        assert state.is_failed()
        with pytest.raises(Exception, match=f"another run holds this workspace \\(pid {holder.pid}"):
            state.result()
        assert not (workdir / "dvc.yaml").exists()  # the workspace was not refreshed under the holder
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(workdir):
        pass
