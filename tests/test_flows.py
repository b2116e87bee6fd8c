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
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import yaml
from conftest import REPO, hold_workspace, kill_tree, start_server, stop_process_group, write_prompt_quick
from mlflow import MlflowClient

from ptg import prefect_setup, tracking, workspace

VENV_BIN = Path(sys.executable).parent
QUICK = REPO / "configs" / "quick.yaml"
ROUND_STAGES = ("sample", "rank", "fit_guidance", "train_lm", "evaluate")
TASKS = ["prepare", "base_model", "preferences", *(f"{s}@{r}" for r in (1, 2) for s in ROUND_STAGES), "baseline",
         "report"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    """Module-wide environment: the venv first on PATH (DVC and the stages' `python`), a fresh sqlite MLflow, no
    progress bars, no telemetry. Returns the module's scratch folder."""
    root = tmp_path_factory.mktemp("flows")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("CI", "1")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        for name in (tracking.SWITCH_ENV, tracking.PARENT_ENV, "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        yield root


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


@pytest.mark.xdist_group("flows")
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
    # tracking.log_models: best (the default): one version each of the LM and the guidance, the best evaluated.
    evaluated = [json.loads((workdir / "metrics" / "rounds" / str(r) / "evaluate.json").read_text())["rougeL"]
                 for r in (1, 2)]
    for name in (tracking.GUIDANCE_MODEL, tracking.LM_MODEL):
        (version,) = c.search_model_versions(f"name='{name}'")
        assert str(c.get_model_version_by_alias(name, "best").version) == str(version.version)
        assert float(version.tags["eval.rougeL"]) == max(evaluated)
    assert c.search_model_versions(f"name='{tracking.BASELINE_MODEL}'") == []  # the baseline arm stays in DVC


@pytest.mark.xdist_group("flows")
@pytest.mark.slow
def test_prompt_task_flow_runs_every_stage(env, harness, flows):
    """configs/prompt.yaml's task (tiny models): the same flow and stages, the prompt task's artifacts."""
    from ptg import schemas
    from ptg.io import read_table

    workdir = env / "prompt"
    state = flows.ptg_pipeline(rounds=1, params_file=str(write_prompt_quick(env / "prompt.yaml")),
                               workdir=str(workdir), return_state=True)
    assert state.is_completed(), state.message
    expected = ["prepare", "base_model", "preferences", *(f"{s}@1" for s in ROUND_STAGES), "baseline", "report"]
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


@pytest.mark.xdist_group("flows")
@pytest.mark.slow
def test_failed_run_resumes_at_the_failed_stage(quick_run, harness, flows, env, monkeypatch):
    """A bad `evaluate` value fails evaluate@1; after the fix the flow re-runs from there, DVC skipping the rest."""
    workdir, _ = quick_run
    resume = env / "resume"
    shutil.copytree(workdir, resume, symlinks=True)
    monkeypatch.setattr(flows, "RETRIES", 0)  # a bad params value fails the same way every time
    params = yaml.safe_load(QUICK.read_text())
    params["evaluate"]["bogus_key"] = 1
    (env / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lm = resume / "data" / "rounds" / "2" / "lm" / "model.safetensors"
    lm_mtime = lm.stat().st_mtime_ns

    failed = flows.ptg_pipeline(rounds=2, params_file=str(env / "bad.yaml"), workdir=str(resume), return_state=True)
    assert failed.is_failed()
    states = task_states(failed)
    first = TASKS.index("evaluate@1")
    assert {name: states.get(name) for name in TASKS[:first + 1]} == {
        **dict.fromkeys(TASKS[:first], "Completed"), "evaluate@1": "Failed"}
    assert not set(TASKS[first + 1:]) & set(states)
    assert parent_of(mlflow_client(), failed).info.status == "FAILED"

    del params["evaluate"]["bogus_key"]
    # differs from quick.yaml and is read by evaluate and baseline only (evaluate.batch_size is train_lm's too: its
    # checkpoint validation decodes in those batches), so the evaluations really run again and the training not
    params["evaluate"]["subset_items"] = 2
    (env / "fixed.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = flows.ptg_pipeline(rounds=2, params_file=str(env / "fixed.yaml"), workdir=str(resume))
    skipped = [name for name in TASKS
               if name.split("@")[0] != "evaluate" and name not in ("baseline", "report", "preferences")]
    assert not any(ran[name] for name in skipped), ran
    assert ran["evaluate@1"] and ran["evaluate@2"] and ran["baseline"]
    assert lm.stat().st_mtime_ns == lm_mtime


@pytest.mark.xdist_group("flows")
def test_the_plan_is_read_from_dvc_yaml_and_follows_an_added_stage(flows, env, tmp_path):
    """The flow has no stage list of its own: its plan is the workspace's dvc.yaml, round by round; a stage (and a
    round) added to a copy of dvc.yaml is in the plan, in its place."""
    from ptg.workspace import make_workspace

    params = yaml.safe_load(QUICK.read_text()) | {"rounds": {"1": {"prev": 0}, "2": {"prev": 1}, "3": {"prev": 2}}}
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    root = make_workspace(tmp_path / "three.yaml", tmp_path / "ws")
    steps = [name for name, dvc_name in flows.plan.fn(str(root)) if name == dvc_name]
    assert steps == ["prepare", "base_model", "preferences", *(f"{s}@{r}" for r in (1, 2, 3) for s in ROUND_STAGES),
                     "baseline", "report"]
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
        "prepare", "base_model", "preferences", *(f"{s}@{r}" for r in (1, 2, 3) for s in per_round), "baseline",
        "report", "publish"]


@pytest.mark.xdist_group("flows")
def test_retry_policy(flows):
    assert flows._options("sample@1")["retries"] == flows.RETRIES > 0
    assert flows._options("base_model")["retries"] == flows.RETRIES
    assert flows._options("rank@2")["retries"] == 0 and flows._options("report")["retries"] == 0
    assert flows._options("evaluate@2")["task_run_name"] == "evaluate@2"


@pytest.mark.xdist_group("flows")
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


@pytest.mark.xdist_group("flows")
def test_every_deployment_runs_a_shipped_params_file_on_as_many_gpus_as_processes(flows, tmp_path):
    """prefect.yaml's deployments: their parameters are the flow's, their params file ships with the repository and
    loads with their overrides, and a GPU deployment's launcher starts one process per GPU it requests."""
    import inspect

    from ptg.config import GROUPS, load_group

    flow_parameters = set(inspect.signature(flows.ptg_pipeline.fn).parameters)
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {"ptg-local", "ptg-gpu", "ptg-gpu-4"} <= {d["name"] for d in deployments}
    for deployment in deployments:
        name, parameters = deployment["name"], deployment["parameters"]
        assert set(parameters) <= flow_parameters, name
        assert (REPO / parameters["params_file"]).is_file(), name
        overrides = workspace.param_overrides(parameters.get("rounds"), parameters.get("launcher"))
        root = Path(flows.prepare_workdir.fn(parameters["params_file"], tmp_path / name, overrides))
        for group in ("run", *GROUPS):
            load_group(group, root / "params.yaml")
        kwargs = deployment["work_pool"]["job_variables"].get("container_create_kwargs") or {}
        gpus = sum(request["count"] for request in kwargs.get("device_requests", []))
        launcher = load_group("run", root / "params.yaml").launcher
        processes = re.search(r"--num_processes[ =](\d+)", launcher)
        assert (int(processes.group(1)) if processes else 1) == max(gpus, 1), (name, launcher, gpus)


def prefect_env(home: Path) -> dict[str, str]:
    """A Prefect client's environment with its own PREFECT_HOME; a worker started with it asks for work every
    second (Prefect's default is 10 s, which the deployment tests would spend waiting)."""
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_WORKER_PREFETCH_SECONDS="1")
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.mark.xdist_group("flows")
@pytest.mark.slow
def test_one_command_local_run(quick_run, tmp_path):
    """`python flows/ptg_flow.py --params configs/quick.yaml` with no server: Prefect's temporary local API."""
    workdir, _ = quick_run
    done = subprocess.run([sys.executable, "flows/ptg_flow.py", "--params", "configs/quick.yaml", "--rounds", "2",
                           "--workdir", str(workdir)], cwd=REPO, env=prefect_env(tmp_path / "prefect"),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"Flow run '[^']+' - Finished in state Completed", done.stdout + done.stderr)


@pytest.fixture(scope="module")
def prefect_server(env, tmp_path_factory):
    """A real `prefect server start` on a loopback port it binds itself (port 0, read back from the kernel) with its
    own PREFECT_HOME, set up once as a user would (`ptg prefect-setup`: the process pool and the zombie automation;
    `prefect deploy` of prefect.yaml's ptg-local, exit 0) for every deployment test of this module; killed on
    teardown. Yields the environment for clients (PREFECT_API_URL set)."""
    root = tmp_path_factory.mktemp("prefect")
    client_env = prefect_env(root / "prefect-home")
    proc, url = start_server([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", "0"],
                             client_env, root / "server.log", "/api/health")
    try:
        client_env |= {"PREFECT_API_URL": f"{url}/api"}
        done = subprocess.run([str(VENV_BIN / "ptg"), "prefect-setup", "--crash-after", str(TEST_CRASH_AFTER_S)],
                              cwd=REPO, env=client_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        prefect(client_env, "--no-prompt", "deploy", "--name", "ptg-local")  # exit 0: prefect 3.9 with its FastAPI
        prefect(client_env, "deployment", "inspect", "ptg-pipeline/ptg-local")
        yield client_env
    finally:
        stop_process_group(proc)


def prefect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The prefect CLI against the test server, from the repository root (prefect.yaml); must exit 0."""
    done = subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


# The zombie automation's window in these tests: `ptg prefect-setup --crash-after`, the setting users change, as
# short as is safe with the 30 s heartbeat (one late heartbeat still does not crash a live run), so the killed-worker
# test waits 30-60 s for Crashed instead of 60-90 s.
TEST_CRASH_AFTER_S = 60


def run_deployment(env: dict[str, str], workdir: Path) -> str:
    """Trigger a quick run of prefect.yaml's ptg-local (deployed by ``prefect_server``) in ``workdir``; returns its
    flow run id."""
    params = json.dumps({"params_file": "configs/quick.yaml", "rounds": 2, "workdir": str(workdir)})
    out = prefect(env, "deployment", "run", "ptg-pipeline/ptg-local", "--params", params).stdout
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", "ptg-process"],
                                cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def flow_run(env: dict[str, str], flow_run_id: str) -> dict:
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/flow_runs/{flow_run_id}", timeout=10) as r:
        return json.load(r)


def flow_run_state(env: dict[str, str], flow_run_id: str) -> str:
    return flow_run(env, flow_run_id)["state"]["type"]


def wait_until_final(env: dict[str, str], flow_run_id: str, seconds: float = 900) -> str:
    deadline, state = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        state = flow_run_state(env, flow_run_id)
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(3)
    return state


def complete_on_a_worker(env: dict[str, str], flow_run_id: str, log_path: Path) -> None:
    """Start a process worker, wait for ``flow_run_id`` to end, stop the worker; the run must have completed."""
    worker = start_worker(env, log_path)
    try:
        state = wait_until_final(env, flow_run_id)
    finally:
        stop_process_group(worker)
    assert state == "COMPLETED", f"flow run {flow_run_id} ended {state}:\n{log_path.read_text()[-4000:]}"


def locked_stages(workdir: Path) -> set[str]:
    """The stages in ``workdir``'s dvc.lock; none while DVC has not written it, or is rewriting it (read mid-write,
    the file can be empty or cut)."""
    try:
        data = yaml.safe_load((workdir / "dvc.lock").read_text())
    except (FileNotFoundError, yaml.YAMLError):
        return set()
    return set(data["stages"]) if isinstance(data, dict) and isinstance(data.get("stages"), dict) else set()


@pytest.mark.xdist_group("prefect-server")
@pytest.mark.slow
def test_a_killed_worker_leaves_a_workspace_the_next_run_resumes(prefect_server, tmp_path):
    """kill -9 of the worker, its flow run and the running stage, mid-pipeline: what finished stays, nothing is
    half-written, the zombie automation sets the orphaned flow run to Crashed once its heartbeats stop, and the
    deployment run again resumes at the stage that did not finish and completes."""
    workdir, env = tmp_path / "killed-workspace", prefect_server
    first = run_deployment(env, workdir)
    worker = start_worker(env, tmp_path / "worker-1.log")
    try:
        deadline = time.monotonic() + 600
        while "train_lm@1" not in locked_stages(workdir):  # round 1 is done, round 2 is starting
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker-1.log").read_text()
            time.sleep(0.5)
    finally:
        kill_tree(worker.pid)  # the worker, its flow run and the stage running, none spared
        worker.wait()
        killed = time.monotonic()
    done_before = locked_stages(workdir)
    assert "report" not in done_before and flow_run_state(env, first) == "RUNNING"  # nothing left to end it
    samples = workdir / "data" / "rounds" / "1" / "samples.parquet"
    stamp = samples.stat().st_mtime_ns
    assert not [p for p in workdir.rglob("*") if ".tmp-" in p.name]  # nothing half-written at an output path

    # The last heartbeat came at most HEARTBEAT_S before the kill; the automation fires TEST_CRASH_AFTER_S after it
    # (the server evaluates proactive triggers every 5 s): Crashed 30-60 s after the kill, never Running for good.
    bound = TEST_CRASH_AFTER_S + prefect_setup.HEARTBEAT_S
    state = wait_until_final(env, first, seconds=bound)
    took = time.monotonic() - killed
    assert state == "CRASHED", f"flow run {first} is {state} {took:.0f} s after its worker was killed"
    assert f"No heartbeat for {TEST_CRASH_AFTER_S} s" in flow_run(env, first)["state"]["message"]  # the automation
    print(f"killed worker: flow run Crashed {took:.0f} s after the kill (window {TEST_CRASH_AFTER_S} s)")

    complete_on_a_worker(env, run_deployment(env, workdir), tmp_path / "worker-2.log")
    assert samples.stat().st_mtime_ns == stamp  # sample@1 finished before the kill: not run again
    assert {"sample@2", "train_lm@2", "evaluate@2", "baseline", "report"} <= locked_stages(workdir)
    status = subprocess.run(["dvc", "status", "--json"], cwd=workdir, capture_output=True, text=True, check=True)
    changed = {k: v for k, v in json.loads(status.stdout).items() if v != ["always changed"]}  # preferences
    assert changed == {}  # every output matches its stage


def api(env: dict[str, str], path: str, body: dict | None = None):
    """GET (or POST ``body`` to) the test server's API at ``path``; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def task_run_span(env: dict[str, str], flow_run_id: str) -> tuple[datetime | None, datetime | None, int]:
    """(first task run start, last task run end, task run count) of a flow run, from the API."""
    runs = api(env, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
    starts = [datetime.fromisoformat(r["start_time"]) for r in runs if r["start_time"]]
    ends = [datetime.fromisoformat(r["end_time"]) for r in runs if r["end_time"]]
    return min(starts, default=None), max(ends, default=None), len(runs)


@pytest.mark.xdist_group("prefect-server")
@pytest.mark.slow
def test_two_deployment_runs_for_one_workspace_run_one_after_the_other(prefect_server, tmp_path):
    """prefect.yaml's ptg-local, deployed, run by a process worker of a real server in a fresh workspace, where it
    executes every stage. Two runs of it for that workspace, triggered together, on ONE process worker (which
    starts both at once): the second waits for the workspace's global concurrency slot, runs no task while the
    first works, then finds every stage up to date; both complete, and the slot is free again."""
    workdir, env = tmp_path / "shared-workspace", prefect_server
    first = run_deployment(env, workdir)
    second = run_deployment(env, workdir)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        deadline, both_running = time.monotonic() + 900, False
        while time.monotonic() < deadline:
            states = {run: flow_run_state(env, run) for run in (first, second)}
            if all(state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for state in states.values()):
                break
            if set(states.values()) == {"RUNNING"}:
                both_running = True
                spans = {run: task_run_span(env, run) for run in (first, second)}
                assert min(span[2] for span in spans.values()) == 0, f"both runs have task runs: {spans}"
            time.sleep(2)
    finally:
        stop_process_group(worker)
    assert states == {first: "COMPLETED", second: "COMPLETED"}, f"{states}:\n{log.read_text()[-4000:]}"
    assert both_running  # the worker started both; one of them waited inside its flow run
    (a_start, a_end, a_count), (b_start, b_end, b_count) = sorted(task_run_span(env, run) for run in (first, second))
    # the later run's first task starts after the earlier run's last task ended: they never ran at the same time
    assert a_count and b_count and a_end <= b_start, (a_start, a_end, b_start, b_end)
    assert {"prepare", "base_model", "sample@1", "train_lm@2", "evaluate@2", "baseline", "report"} <= \
        locked_stages(workdir)
    for r in (1, 2):
        assert json.loads((workdir / "metrics" / "rounds" / str(r) / "evaluate.json").read_text())["items"] > 0
    assert (workdir / "metrics" / "report" / "eval_by_round.csv").is_file()
    limit = api(env, f"v2/concurrency_limits/{workspace.workspace_limit_name(workdir)}")
    assert limit["limit"] == 1 and limit["active_slots"] == 0  # created on demand, released by both runs
    print(f"runs' task spans: {a_start} .. {a_end}, then {b_start} .. {b_end}")


@pytest.mark.xdist_group("flows")
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


@pytest.mark.xdist_group("flows")
def test_a_second_flow_in_a_busy_workspace_fails_before_touching_it(env, harness, flows):
    from ptg.workspace import workspace_lock

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
