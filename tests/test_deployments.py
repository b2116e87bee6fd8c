"""Deployments of the flow on a real `prefect server` (loopback only), run by process workers as users run them:
`ptg prefect-setup`, `prefect deploy` of prefect.yaml's ptg-local, `prefect deployment run`. A run in a fresh
workspace executes every stage on the worker; two runs for one workspace take turns; a worker killed mid-pipeline
leaves a workspace the next run resumes, its orphaned run set to Crashed by the zombie automation. One server and
one deployment serve the module; the workers ask for work every second."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import REPO, kill_tree, prefect_env, start_server, stop_process_group

from ptg.ops import prefect_setup, workspace

VENV_BIN = Path(sys.executable).parent

# The zombie automation's window in these tests: `ptg prefect-setup --crash-after`, the setting users change, as
# short as is safe with the 30 s heartbeat (one late heartbeat still does not crash a live run), so the killed-worker
# test waits 30-60 s for Crashed instead of 60-90 s.
TEST_CRASH_AFTER_S = 60


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
