"""Shared fixtures: tiny randomly initialised LMs built from configs (no downloads), in eval mode; the quick
profile's whole pipeline, run once per test run and copied by the tests that need a finished workspace; helpers for
child processes (reads that time out, process groups stopped)."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]  # this checkout
BIN = Path(sys.executable).parent  # the venv's dvc, prefect, accelerate
QUICK = REPO / "configs" / "quick.yaml"
VOCAB = 24
PAD, EOS, BOS = 0, 1, 2


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS,
                      bos_token_id=BOS, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    return T5ForConditionalGeneration(cfg).eval()


def read_line(proc: subprocess.Popen, seconds: float) -> str:
    """The next line ``proc`` writes to its stdout pipe, waiting at most ``seconds`` (a child that hangs or dies
    fails the test that reads from it, not the whole run)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=seconds):
            proc.kill()
            raise TimeoutError(f"{proc.args!r} wrote no line in {seconds} s")
    return proc.stdout.readline()


def hold_workspace(directory) -> subprocess.Popen:
    """Another process holding ``ptg.ops.workspace.workspace_lock(directory)`` (for two minutes, or until killed)."""
    import sys

    code = ("import sys, time; from ptg.ops.workspace import workspace_lock\nwith workspace_lock(sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert read_line(proc, 60).strip() == "held"
    return proc


def stop_process_group(proc: subprocess.Popen) -> None:
    """Terminate a server started with start_new_session=True, and its children (SIGKILL after 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def listening_port(proc: subprocess.Popen, seconds: float) -> int:
    """The TCP port a server started with port 0 bound (it or a child of it, LISTEN on 127.0.0.1), read from the
    kernel: no port is picked first and bound later, so no other process can take it in between."""
    import time

    import psutil

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited ({proc.returncode}) before it listened")
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            for p in (root, *root.children(recursive=True)):
                ports = [c.laddr.port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
                if ports:
                    return ports[0]
        time.sleep(0.2)
    raise TimeoutError(f"{proc.args!r} listened on no port within {seconds} s")


def start_server(cmd: list[str], env: dict[str, str], log_path: Path, health: str,
                 seconds: float = 180) -> tuple[subprocess.Popen, str]:
    """Start a server (``cmd`` asks for port 0) in a process group of its own, logging to ``log_path``; return it
    and its base URL (http://127.0.0.1:<the port it bound>) once ``health`` (a path) answers. Stop it with
    ``stop_process_group``."""
    import time
    import urllib.request

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{listening_port(proc, seconds)}"
        deadline = time.monotonic() + seconds
        while True:
            try:
                with urllib.request.urlopen(url + health, timeout=3):
                    return proc, url
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    except BaseException as e:
        stop_process_group(proc)
        raise RuntimeError(f"{' '.join(cmd)} did not come up:\n{log_path.read_text()[-4000:]}") from e


def kill_tree(pid: int) -> None:
    """kill -9 of a process and all its descendants, sparing none started meanwhile: every process of the tree is
    stopped first (SIGSTOP; a stopped process starts no other), the tree listed again until it stops growing, then
    all of them are killed."""
    import signal

    import psutil

    stopped: set[int] = set()
    while True:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # the root is gone: what was stopped is all there is
            tree = []
        new = [p for p in tree if p.pid not in stopped]
        if not new:
            break
        for p in new:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGSTOP)
            stopped.add(p.pid)
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.fixture(params=["llama", "t5"])
def tiny_lm(request):
    return tiny_llama() if request.param == "llama" else tiny_t5()


def write_prompt_quick(path: Path) -> Path:
    """configs/prompt.yaml on a tiny random Llama (verbalizers that are one token of its tokenizer), a small test
    split and budgets of a few updates: the prompt task end to end in a minute or two."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "prompt.yaml").read_text())
    cfg["progress"] = False
    cfg["precision"] = "fp32"  # tiny models: the same numbers on every machine, as configs/quick.yaml
    cfg["model"] |= {"policy": "tiny-llama", "guidance_layers": 1}
    cfg["task"] |= {"verbalizers": [" food", " the", " a", " of"], "candidates": 4, "head_hidden": 32}
    cfg["data"] |= {"max_test": 40}
    cfg["sample"] |= {"train_inputs": 4, "validation_inputs": 2, "top_k": 16}
    cfg["fit_guidance"] |= {"max_updates": 4, "eval_every": 2, "head_hidden": 32}
    cfg["train_lm"] |= {"max_updates": 3, "eval_every": 2, "batch_size": 4}
    cfg["evaluate"] |= {"subset_items": 20}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def pytest_configure(config) -> None:
    """One torch thread per test process when tests run side by side (pytest-xdist): two workers on two cores then
    never fight over them, and the stages' child processes inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


# The files that take minutes (metrics/tests/durations_*.txt), longest first. `make test` runs xdist with
# `--no-loadscope-reorder`, so files are handed out in collection order: the long ones start first and the many short
# files fill in at the end. xdist's own order (most tests first) started the one-test wheel install and the bench
# last, with the other process idle for minutes.
LONGEST_FIRST = ("test_bench.py", "test_flows.py", "test_deployments.py", "test_install.py", "test_recipes.py",
                 "test_pipeline.py", "test_crash_resume.py", "test_gpu_check.py", "test_preferences.py",
                 "test_perf_round.py", "test_tracking.py", "test_sources.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


def run(args: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
    """A command in ``cwd`` with the venv first on PATH, tracking off (unless ``env`` says otherwise) and DVC's
    analytics off; with ``check``, a non-zero exit fails with the end of its output."""
    full = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PTG_TRACKING": "off",
                         "DVC_NO_ANALYTICS": "1"} | (env or {})
    proc = subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def quick_pipeline(tmp_path_factory, worker_id) -> Path:
    """configs/quick.yaml's whole pipeline (`dvc repro`, tracking off, one torch thread), run once per test run:
    the first test process that asks builds it under a file lock, the others wait and share it. Read it; copy it
    (``copy_workspace``) before changing anything."""
    from filelock import FileLock

    from ptg.ops.workspace import make_workspace

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    ws = shared / "quick-pipeline"
    with FileLock(str(shared / "quick-pipeline.lock")):
        if not (ws / ".built").is_file():
            if ws.exists():
                shutil.rmtree(ws)  # a build that failed half-way
            make_workspace(QUICK, ws)
            done = run(["dvc", "repro"], ws, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            (ws / ".built").write_text(done.stdout + done.stderr)
    return ws


def copy_workspace(src: Path, dst: Path, **overrides: dict) -> Path:
    """A copy of workspace ``src`` at ``dst`` (links kept as links; DVC rehashes what it needs), its params.yaml
    groups updated with ``overrides`` ({group: {key: value}}): `dvc repro` there reruns what they change."""
    import yaml

    shutil.copytree(src, dst, symlinks=True)
    if overrides:
        params = yaml.safe_load((dst / "params.yaml").read_text())
        for group, values in overrides.items():
            if isinstance(values, dict):
                params[group] |= values
            else:
                params[group] = values
        (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    """A flow test module's environment: the venv first on PATH (DVC and the stages' `python`), a fresh sqlite
    MLflow, no progress bars, no telemetry. Returns the module's scratch folder."""
    root = tmp_path_factory.mktemp("flows")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("CI", "1")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from ptg import tracking

        for name in (tracking.SWITCH_ENV, tracking.PARENT_ENV, "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        yield root


def prefect_env(home: Path) -> dict[str, str]:
    """A Prefect client's environment with its own PREFECT_HOME; a worker started with it asks for work every
    second (Prefect's default is 10 s, which the deployment tests would spend waiting)."""
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_WORKER_PREFETCH_SECONDS="1")
    env.pop("PREFECT_API_URL", None)
    return env
