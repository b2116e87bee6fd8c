"""ptg.tracking against throw-away MLflow stores: nested stage runs, registry, no-op mode, unreachable server and
backfill, the `run` CLI around a real `dvc repro`, and (slow) a real `mlflow server`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from conftest import start_server, stop_process_group
from mlflow import MlflowClient

from ptg import tracking
from ptg.config import ParamsError
from ptg.lm.base_models import build_tiny

VENV_BIN = str(Path(sys.executable).parent)
TOY_DVC = """\
stages:
  train_lm:
    foreach: ${rounds}
    do:
      cmd: python toy_stage.py train_lm ${key}
      deps: [toy_stage.py, data.txt]
      params: [lr]
      outs: ["out/train_lm_${key}.json"]
  fit_guidance:
    foreach: ${rounds}
    do:
      cmd: python toy_stage.py fit_guidance ${key}
      deps: [toy_stage.py, data.txt]
      params: [lr]
      outs: ["out/fit_guidance_${key}.json"]
"""
TOY_STAGE = """\
import json, sys
from pathlib import Path
from ptg import tracking
stage, r = sys.argv[1], int(sys.argv[2])
out = Path(f"out/{stage}_{r}.json")
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({"score": r / 10}))
tracking.log_stage(stage, r, {"lr": 0.5}, {"score": r / 10}, artifacts=[out])
"""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[int, Path]:
    """Two tiny LM folders with different contents (round 1 and round 2)."""
    root = tmp_path_factory.mktemp("models")
    build_tiny("tiny-llama", root / "1")
    shutil.copytree(root / "1", root / "2")
    (root / "2" / "round.txt").write_text("2\n")
    return {1: root / "1", 2: root / "2"}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A toy DVC project (stages train_lm@1/2, fit_guidance@1/2 over rounds "1", "2" as in params.yaml) as the
    working directory, with a fresh sqlite MLflow store and no parent run."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text('lr: 0.5\nrounds:\n  "1": {prev: 0}\n  "2": {prev: 1}\n')
    (root / "dvc.yaml").write_text(TOY_DVC)
    (root / "toy_stage.py").write_text(TOY_STAGE)
    (root / "data.txt").write_text("data\n")
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in (tracking.SWITCH_ENV, tracking.PARENT_ENV, "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(tracking.LOG_MODELS_ENV, "all")  # every stage registers its model; tests of best/none say so
    return root


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"], registry_uri=os.environ["MLFLOW_TRACKING_URI"])


def runs_by_name(c: MlflowClient) -> dict[str, mlflow.entities.Run]:
    experiment = c.get_experiment_by_name(tracking.EXPERIMENT)
    return {r.info.run_name: r for r in c.search_runs([experiment.experiment_id])}


def aliases(c: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in c.get_registered_model(name).aliases.items()}


def log_round(r: int, model: Path, stage: str, registered: str) -> None:
    history = pd.DataFrame({"update": [1.0, 2.0, 3.0], "loss": [3.0, 2.0, float("nan")], "lr": [0.1, 0.1, 0.05]})
    artifact = Path(f"{stage}_{r}.json")
    artifact.write_text(json.dumps({"loss": 2.0}))
    tracking.log_stage(stage, r, {"lr": 0.1, "opt": {"betas": [0.9, 0.99]}},
                       {"loss": 2.0 / r, "objective": "wmle", "updates": 3}, history=history,
                       artifacts=[artifact], model_dir=model, registered_name=registered)


def test_log_stage_nested_runs_registry_and_alias(project, tiny_models, monkeypatch):
    parent = tracking.start_parent("pipeline test", {"train_lm": {"lr": 0.1}})
    assert parent
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    for r in (1, 2):
        log_round(r, tiny_models[r], "fit_guidance", tracking.GUIDANCE_MODEL)
        log_round(r, tiny_models[r], "train_lm", tracking.LM_MODEL)
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[1], "rougeL", 12.0) == "1"
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[2], "rougeL", 11.0) == "1"
    tracking.end_parent(parent)

    c = client()
    runs = runs_by_name(c)
    assert set(runs) == {"pipeline test", "fit_guidance@1", "fit_guidance@2", "train_lm@1", "train_lm@2"}
    assert runs["pipeline test"].info.status == "FINISHED"
    assert runs["pipeline test"].data.params == {"train_lm.lr": "0.1"}
    run = runs["train_lm@2"]
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent
    assert (tags["stage"], tags["round"], tags["dvc_stage"]) == ("train_lm", "2", "train_lm@2")
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert len(tags["dvc_hash"]) == 32 and tags["info.objective"] == "wmle"
    assert tags["dvc_hash"] != runs["train_lm@1"].data.tags["dvc_hash"]  # the rounds differ in their command
    assert run.data.params == {"lr": "0.1", "opt.betas": "[0.9, 0.99]"}
    assert run.data.metrics["loss"] == 1.0 and run.data.metrics["updates"] == 3.0
    loss = c.get_metric_history(run.info.run_id, "history/loss")
    assert [(m.step, m.value) for m in loss] == [(1, 3.0), (2, 2.0)]  # NaN cells are skipped
    assert [m.step for m in c.get_metric_history(run.info.run_id, "history/lr")] == [1, 2, 3]
    assert "train_lm_2.json" in {a.path for a in c.list_artifacts(run.info.run_id)}

    # The parent charts each stage's metrics against the round.
    assert [(m.step, m.value) for m in c.get_metric_history(parent, "train_lm/loss")] == [(1, 2.0), (2, 1.0)]

    for name, stage in ((tracking.GUIDANCE_MODEL, "fit_guidance"), (tracking.LM_MODEL, "train_lm")):
        versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        assert [str(v.version) for v in versions] == ["1", "2"]
        for r, version in zip((1, 2), versions, strict=True):
            assert version.tags["round"] == str(r) and version.tags["stage"] == stage
            assert version.tags["run_id"] == runs[f"{stage}@{r}"].info.run_id
            assert version.tags["content_md5"] == tracking.folder_md5(tiny_models[r])
    assert aliases(c, tracking.LM_MODEL) == {"best": "1"}
    assert c.get_model_version(tracking.LM_MODEL, "2").tags["eval.rougeL"] == "11.0"

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(os.environ["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model(f"models:/{tracking.LM_MODEL}@best")
    predictions = model.predict(["Summarize: def f(): return 1"], params=None)
    assert len(predictions) == 1 and isinstance(predictions[0], str)


@pytest.mark.parametrize("how", ["params", "env"])
def test_log_models_none_keeps_models_out_of_the_store(project, tiny_models, monkeypatch, how):
    if how == "params":
        monkeypatch.delenv(tracking.LOG_MODELS_ENV)
        with (project / "params.yaml").open("a") as f:
            f.write("tracking: {log_models: none}\n")
    else:
        monkeypatch.setenv(tracking.LOG_MODELS_ENV, "none")
    log_round(1, tiny_models[1], "train_lm", tracking.LM_MODEL)
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[1], "rougeL", 12.0) is None
    c = client()
    run = runs_by_name(c)["train_lm@1"]
    assert run.data.metrics["loss"] == 2.0  # the run itself is tracked
    assert run.data.tags["content_md5"] == tracking.folder_md5(tiny_models[1])
    assert run.data.tags["model_dir"] == str(tiny_models[1].resolve())
    assert c.search_registered_models() == [] and not c.search_logged_models([run.info.experiment_id])
    assert not tracking.PENDING_DIR.exists()


def test_a_bad_log_models_value_names_the_param(project, monkeypatch):
    monkeypatch.delenv(tracking.LOG_MODELS_ENV)
    assert tracking.log_models_mode() == "all"  # the default without a tracking group
    with (project / "params.yaml").open("a") as f:
        f.write("tracking: {log_models: some}\n")
    with pytest.raises(ParamsError, match="tracking: log_models must be one of best, all, none; got .some."):
        tracking.log_models_mode()
    monkeypatch.setenv(tracking.LOG_MODELS_ENV, "most")
    with pytest.raises(ParamsError, match="PTG_LOG_MODELS must be one of best, all, none; got 'most'"):
        tracking.log_models_mode()


def _local(uri: str) -> Path:
    return Path(urllib.parse.urlparse(uri).path)


def test_log_models_best_keeps_one_version_with_weights(project, tiny_models, tmp_path, monkeypatch):
    """The best-evaluated LM is logged once, into its stage's run, as a transformers pipeline in bf16; a better one
    takes the weights over: the superseded version's weights leave the store, its record stays (tags, lineage);
    a worse one logs nothing."""
    monkeypatch.setenv(tracking.LOG_MODELS_ENV, "best")
    third = tmp_path / "third"
    shutil.copytree(tiny_models[1], third)
    (third / "round.txt").write_text("3\n")
    for r, model in ((1, tiny_models[1]), (2, tiny_models[2]), (3, third)):
        log_round(r, model, "train_lm", tracking.LM_MODEL)
    c = client()
    assert c.search_registered_models() == []  # nothing logged when the stages ended
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[1], "rougeL", 12.0) == "1"
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[2], "rougeL", 11.0) == "1"  # worse: nothing
    # The same bytes evaluated again lower (a round that kept its warm start): the version keeps its best score.
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[1], "rougeL", 10.0) == "1"
    assert c.get_model_version(tracking.LM_MODEL, "1").tags["eval.rougeL"] == "12.0"
    assert [str(v.version) for v in c.search_model_versions(f"name='{tracking.LM_MODEL}'")] == ["1"]
    first_id = tracking.logged_model_id(c.get_model_version(tracking.LM_MODEL, "1"))
    first = _local(c.get_logged_model(first_id).artifact_location)
    assert any(first.rglob("*.safetensors"))
    assert tracking.set_best_alias(tracking.LM_MODEL, third, "rougeL", 13.0) == "2"
    versions = {str(v.version): v for v in c.search_model_versions(f"name='{tracking.LM_MODEL}'")}
    assert sorted(versions) == ["1", "2"] and aliases(c, tracking.LM_MODEL) == {"best": "2"}
    assert not first.exists()  # the superseded weights are gone from mlartifacts
    old = versions["1"].tags  # ... and its record stays, saying so
    assert (old["weights"], old["superseded_by"], old["round"], old["eval.rougeL"]) == ("deleted", "2", "1", "12.0")
    assert old["run_id"] == runs_by_name(c)["train_lm@1"].info.run_id
    assert "weights" not in versions["2"].tags
    tags = versions["2"].tags
    assert (tags["round"], tags["stage"], tags["eval.rougeL"]) == ("3", "train_lm", "13.0")
    assert tags["run_id"] == runs_by_name(c)["train_lm@3"].info.run_id
    assert tags["content_md5"] == tracking.folder_md5(third)
    pipe = mlflow.transformers.load_model(f"models:/{tracking.LM_MODEL}@best")
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    assert isinstance(pipe("def f(): return 1", max_new_tokens=3)[0]["generated_text"], str)
    # The baseline arm keeps its weights in DVC only under best.
    assert tracking.set_best_alias(tracking.BASELINE_MODEL, tiny_models[1], "rougeL", 99.0, weights=False) is None


def test_registered_guidance_returns_per_token_rewards(project, tiny_models, tmp_path, monkeypatch):
    from ptg.guidance.model import load_guidance, save_guidance
    from ptg.lm.base_models import truncate_backbone
    from ptg.lm.models import load_tokenizer

    folder = tmp_path / "guidance"
    truncate_backbone(tiny_models[1], 1, folder / "backbone")
    guidance = load_guidance(folder, head_hidden=16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in guidance.head.parameters():  # a head that is not the constant initial one
            p.normal_(0, 0.5)
    save_guidance(guidance, folder)
    tok = load_tokenizer(tiny_models[1])
    tok.save_pretrained(folder / "backbone")
    monkeypatch.setenv(tracking.LOG_MODELS_ENV, "best")
    tracking.log_stage("fit_guidance", 1, {}, {"val_accuracy": 0.5}, model_dir=folder,
                       registered_name=tracking.GUIDANCE_MODEL)
    assert tracking.set_best_alias(tracking.GUIDANCE_MODEL, folder, "rougeL", 10.0) == "1"
    model = mlflow.pyfunc.load_model(f"models:/{tracking.GUIDANCE_MODEL}@best")
    frame = pd.DataFrame({"prompt": ["def f(): return 1", "def g(x): return x"], "response": ["one", "x back x"]})
    rewards = model.predict(frame)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in frame["response"]]  # + stop token
    assert [len(r) for r in rewards] == lengths
    flat = [x for r in rewards for x in r]
    assert max(flat) - min(flat) > 1e-3  # token rewards differ along the response
    # The rewards of the guidance object that was saved, before any save, log or load: a registry version that
    # lost the head, or points at another folder, differs.
    from ptg.guidance.model import token_rewards
    from ptg.lm.encoding import encode_prompts, encode_responses, turn_end_id

    prompts = encode_prompts(tok, frame["prompt"].tolist(), 512, False)
    responses = encode_responses(tok, frame["response"].tolist(), 64, turn_end_id(guidance.backbone, tok))
    own = token_rewards(guidance.eval(), prompts, responses, tok.pad_token_id, torch.device("cpu"), torch.float32)
    assert flat == pytest.approx([x for r in own for x in r], abs=1e-6)
    with pytest.raises(ValueError, match="missing response"):
        model.predict(frame[["prompt"]])


def test_stage_without_parent_is_standalone(project):
    tracking.log_stage("rank", 1, {"metric": "meteor"}, {"mean_score": 0.5})
    run = runs_by_name(client())["rank@1"]
    assert run.data.tags["standalone"] == "true" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["dvc_hash"] == "unknown"  # toy dvc.yaml has no stage `rank`


def test_alias_for_a_model_never_logged_here_only_warns(project, tiny_models, caplog):
    """evaluate after a DVC-skipped train_lm, into a store that never saw that LM: a warning, nothing pending."""
    caplog.set_level(logging.WARNING, logger="ptg.tracking")
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[1], "rougeL", 1.0) is None
    assert "PendingVersionError" in caplog.text and not tracking.PENDING_DIR.exists()


def test_dvc_hash_follows_deps_and_params(project):
    first = tracking.dvc_stage_hash("train_lm@1")
    assert tracking.dvc_stage_hash("train_lm@1") == first
    Path("data.txt").write_text("changed\n")
    second = tracking.dvc_stage_hash("train_lm@1")
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("lr: 0.5", "lr: 0.25"))
    assert len({first, second, tracking.dvc_stage_hash("train_lm@1")}) == 3


def test_tracking_off_is_a_noop(tmp_path):
    """Off: nothing created, nothing written, MLflow never imported (checked in a fresh interpreter)."""
    db = tmp_path / "mlflow.db"
    code = f"""
import sys
from pathlib import Path
from ptg import tracking
assert tracking.start_parent("p", {{"a": 1}}) is None
tracking.log_stage("train_lm", 1, {{"lr": 1}}, {{"loss": 1.0}}, model_dir=Path("."), registered_name="ptg-lm")
assert tracking.set_best_alias("ptg-lm", Path("{tmp_path}"), "rougeL", 1.0) is None
tracking.end_parent(None)
assert "mlflow" not in sys.modules, "tracking off imported mlflow"
"""
    env = dict(os.environ, PTG_TRACKING="off", MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    assert not list(tmp_path.iterdir())


def test_unreachable_server_writes_pending_then_backfills(project, tiny_models, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="ptg.tracking")
    with unreachable_url() as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        start = time.monotonic()
        assert tracking.start_parent("pipeline", {}) is None
        log_round(1, tiny_models[1], "train_lm", tracking.LM_MODEL)
        assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[1], "rougeL", 3.0) is None
        # seconds, not the minutes MLflow's default retries against a dead server take (a bound with a wide
        # margin for a loaded machine)
        assert time.monotonic() - start < 60
    assert "tracking skipped" in caplog.text
    pending = sorted(p.name for p in tracking.PENDING_DIR.iterdir())
    assert pending[-1] == "train_lm@1.json" and pending[0].startswith("alias-ptg-lm-best-")
    record = json.loads((tracking.PENDING_DIR / "train_lm@1.json").read_text())
    assert record["kind"] == "stage" and record["record"]["metrics"]["loss"] == 2.0

    db = project.parent / "backfill.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert tracking.backfill() == (2, 0)
    assert not list(tracking.PENDING_DIR.iterdir())
    c = client()
    run = runs_by_name(c)["train_lm@1"]
    assert run.data.metrics["loss"] == 2.0 and run.data.tags["standalone"] == "true"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "history/loss")] == [1, 2]
    assert aliases(c, tracking.LM_MODEL) == {"best": "1"}
    assert c.get_model_version(tracking.LM_MODEL, "1").tags["run_id"] == run.info.run_id


def test_a_pending_record_refers_to_the_stages_metrics_files_and_refuses_them_changed(project, monkeypatch, caplog):
    """A stage that logs its DVC metrics files leaves a pending record naming them (with their md5), not a copy of
    their numbers; backfill reads them back, and keeps the record (saying why) when a file changed since."""
    metrics, history = Path("metrics/sample.json"), Path("metrics/sample_history.csv")
    metrics.parent.mkdir()
    with unreachable_url() as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        for r in (1, 2):
            metrics.write_text(json.dumps({"seconds": 1.5 * r, "split": "train"}))
            history.write_text(f"update,loss\n1,{3.0 * r}\n2,{2.0 * r}\n")
            tracking.log_stage("sample", r, {"k": 3}, metrics, history=history)
            if r == 1:
                kept = (Path("kept.json"), Path("kept.csv"))
                shutil.copy(metrics, kept[0]), shutil.copy(history, kept[1])
    entry = json.loads((tracking.PENDING_DIR / "sample@2.json").read_text())["record"]
    assert entry["metrics"] == {} and entry["history"] == [] and entry["tags"]["info.split"] == "train"
    assert entry["sources"]["metrics"]["path"] == str(metrics.resolve())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project.parent / 'backfill.db'}")
    caplog.set_level(logging.WARNING, logger="ptg.tracking")
    assert tracking.backfill() == (1, 1)  # sample@1's files now hold round 2's numbers: it waits
    assert "changed since the stage ran" in caplog.text and "sample@1" in caplog.text
    run = runs_by_name(client())["sample@2"]
    assert run.data.metrics["seconds"] == 3.0 and run.data.tags["info.split"] == "train"
    assert [(m.step, m.value) for m in client().get_metric_history(run.info.run_id, "history/loss")] == \
        [(1, 6.0), (2, 4.0)]
    shutil.copy(kept[0], metrics), shutil.copy(kept[1], history)  # the files as sample@1 wrote them
    assert tracking.backfill() == (1, 0)
    assert runs_by_name(client())["sample@1"].data.metrics == {"seconds": 1.5, "history/loss": 2.0}


def test_stages_under_a_replaying_parent_leave_mlflow_to_it(project):
    """run_command(defer=True) (`ptg run`, `ptg quick`; the flow's tasks likewise): each stage writes its record
    and never imports MLflow; the parent logs each as a run nested under it, with the dvc_hash DVC recorded for the
    stage, and leaves nothing pending."""
    probe = 'Path(f"out/{stage}_{r}.mlflow").write_text(str("mlflow" in sys.modules))\n'
    (project / "toy_stage.py").write_text(TOY_STAGE + probe)
    assert tracking.run_command(["dvc", "repro"], "deferred", defer=True) == 0
    probes = sorted((project / "out").glob("*.mlflow"))
    assert len(probes) == 4 and {p.read_text() for p in probes} == {"False"}
    runs = runs_by_name(client())
    parent = runs["deferred"]
    stages = {name for name, run in runs.items() if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert stages == {"train_lm@1", "train_lm@2", "fit_guidance@1", "fit_guidance@2"}
    for name in stages:
        assert runs[name].data.tags["dvc_hash"] == tracking.dvc_stage_hash(name)  # what DVC records for it
        assert runs[name].data.metrics["score"] == int(name[-1]) / 10
    assert not tracking.PENDING_DIR.exists() and not list((project / ".dvc" / "tmp" / "ptg-tracking").glob("*/*.json"))


def test_a_deferred_record_waits_for_a_settled_lock_holding_its_stage(project, monkeypatch):
    """The parent replays a stage's record while `dvc repro` goes on, and DVC rewrites dvc.lock in place after each
    stage: a lock without the stage's entry yet (DVC halfway through its rewrite) or one just written leaves the
    record waiting; once the lock has settled the record is logged with the hash of the stage's entry there."""
    from ptg.tracking import provenance
    from ptg.tracking.records import write_pending

    assert subprocess.run(["dvc", "repro", "-q"], capture_output=True).returncode == 0
    lock, full = project / "dvc.lock", (project / "dvc.lock").read_text()
    monkeypatch.setattr(provenance, "LOCK_QUIET_S", 60.0)  # "just written": within a minute, however slow the machine
    directory = tracking.deferral_dir("parent")
    record = tracking.StageRecord(stage="train_lm", round=2, params={}, metrics={"score": 0.2},
                                  tags={"dvc_hash": "deferred", "dvc_stage": "train_lm@2", "cwd": str(project)})
    path = write_pending("stage", record.run_name, record, "", directory)
    now = time.time()
    os.utime(path, (now - 600, now - 600))
    lock.write_text(full[:full.index("train_lm@2")])  # DVC halfway through its rewrite, the stage not there yet
    os.utime(lock, (now - 120, now - 120))
    assert tracking.replay_deferred(directory, final=False) == (0, 1)
    lock.write_text(full)  # whole, but just written
    assert tracking.replay_deferred(directory, final=False) == (0, 1)
    os.utime(lock, (now - 120, now - 120))  # left alone since
    assert tracking.replay_deferred(directory, final=False) == (1, 0)
    assert runs_by_name(client())["train_lm@2"].data.tags["dvc_hash"] == tracking.dvc_stage_hash("train_lm@2")


def test_track_wraps_dvc_repro(project):
    """`ptg track -- dvc repro` (what the bench runs each experiment under): one parent, a nested run per stage
    execution, the exit code passed on."""
    done = subprocess.run([sys.executable, "-m", "ptg.cli", "track", "--name", "repro", "--", "dvc", "repro"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    failed = subprocess.run([sys.executable, "-m", "ptg.cli", "track", "--name", "broken", "--",
                             sys.executable, "-c", "raise SystemExit(3)"], capture_output=True, text=True)
    assert failed.returncode == 3
    runs = runs_by_name(client())
    parent = runs["repro"]
    assert parent.info.status == "FINISHED" and parent.data.tags["command"] == "dvc repro"
    assert runs["broken"].info.status == "FAILED"
    stages = {name for name, run in runs.items() if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert stages == {"train_lm@1", "train_lm@2", "fit_guidance@1", "fit_guidance@2"}
    assert all(len(runs[s].data.tags["dvc_hash"]) == 32 for s in stages)


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a loopback port it binds itself (port 0, read back) with its store under ``root``
    (the same store when restarted), answering its health check; returns it and its URL. MLflow's job runner is
    off: these tests run no jobs."""
    cmd = [str(Path(VENV_BIN) / "mlflow"), "server", "--host", "127.0.0.1", "--port", "0",
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "server-artifacts"), "--workers", "1"]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return start_server(cmd, env, root / "server.log", "/health", seconds=120)


@contextlib.contextmanager
def unreachable_url() -> Iterator[str]:
    """The URL of a loopback port this process holds bound and never listens on: a connection is refused, and no
    other process can take the port while the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a loopback port; killed on teardown."""
    proc, url = start_mlflow_server(tmp_path)
    try:
        yield url
    finally:
        stop_process_group(proc)


@pytest.mark.slow
def test_a_tracking_server_killed_mid_pipeline_loses_nothing(project, tmp_path, monkeypatch):
    """kill -9 of the MLflow server between the stages of a `dvc repro`: every stage still writes its outputs and
    warns once, what it could not log waits in metrics/.tracking_pending, and `backfill` against the restarted
    server completes the records."""
    server, url = start_mlflow_server(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    try:
        def repro(*targets: str) -> subprocess.CompletedProcess:
            done = subprocess.run(["dvc", "repro", *targets], capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            return done

        repro("train_lm@1", "fit_guidance@1")  # round 1 tracked while the server is up
        os.killpg(server.pid, 9)
        server.wait()
        done = repro()  # round 2 with the server gone
        assert done.stderr.count("tracking skipped: logging train_lm@2") == 1
        assert done.stderr.count("tracking skipped: logging fit_guidance@2") == 1
        assert sorted(p.name for p in tracking.PENDING_DIR.iterdir()) == ["fit_guidance@2.json", "train_lm@2.json"]
        assert json.loads((project / "out" / "train_lm_2.json").read_text()) == {"score": 0.2}
        status = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True, check=True)
        assert json.loads(status.stdout) == {}  # every DVC output is intact

        server, url = start_mlflow_server(tmp_path)  # back, on the same store (at the port it bound now)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        assert tracking.backfill() == (2, 0)
        assert not list(tracking.PENDING_DIR.iterdir())
        runs = runs_by_name(client())
        assert {"train_lm@1", "fit_guidance@1", "train_lm@2", "fit_guidance@2"} <= set(runs)
        assert runs["train_lm@2"].data.metrics["score"] == 0.2
    finally:
        stop_process_group(server)


@pytest.mark.slow
def test_against_a_real_mlflow_server(project, tiny_models, mlflow_server, monkeypatch):
    """log_models: best through a tracking server: the better round replaces the first, whose weights the server
    deletes; the kept version is a transformers model of the evaluated folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv(tracking.LOG_MODELS_ENV, "best")
    parent = tracking.start_parent("served", {"seed": 0})
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    for r in (1, 2):
        log_round(r, tiny_models[r], "train_lm", tracking.LM_MODEL)
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[1], "rougeL", 5.0) == "1"
    c = client()
    first_id = tracking.logged_model_id(c.get_model_version(tracking.LM_MODEL, "1"))
    assert c.list_logged_model_artifacts(first_id)
    assert tracking.set_best_alias(tracking.LM_MODEL, tiny_models[2], "rougeL", 6.0) == "2"
    tracking.end_parent(parent)
    assert not tracking.PENDING_DIR.exists()

    versions = {str(v.version): v for v in c.search_model_versions(f"name='{tracking.LM_MODEL}'")}
    assert sorted(versions) == ["1", "2"] and versions["1"].tags["weights"] == "deleted"  # the record stays
    assert not c.list_logged_model_artifacts(first_id)  # the server deleted the weights
    version = versions["2"]
    run = c.get_run(version.tags["run_id"])
    assert run.info.run_name == "train_lm@2" and run.data.tags["mlflow.parentRunId"] == parent
    assert aliases(c, tracking.LM_MODEL) == {"best": "2"}
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{tracking.LM_MODEL}/2"))
    assert "transformers" in yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    saved = json.loads(next(local.rglob("config.json")).read_text())
    original = json.loads((tiny_models[2] / "config.json").read_text())
    assert {k: saved[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")} == \
        {k: original[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}


def test_default_store_is_the_working_directorys_dvc_project(tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI the store is mlflow.db at the root of the DVC project the command runs in (two
    checkouts sharing one environment keep separate stores), never next to the installed package."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    for name in ("a", "b"):
        (tmp_path / name / ".dvc").mkdir(parents=True)
        (tmp_path / name / "stages").mkdir()
    monkeypatch.chdir(tmp_path / "a" / "stages")
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'a').resolve() / 'mlflow.db'}"
    assert tracking.tracking_uri(tmp_path / "b") == f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"
    # A stage of `dvc exp run --temp` runs in a temporary copy; DVC_ROOT names the project it belongs to.
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "b"))
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path / "b") == "http://127.0.0.1:5000"
