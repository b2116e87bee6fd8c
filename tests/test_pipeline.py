"""The DVC pipeline end to end on the quick profile (tiny models): every stage runs, outputs validate, a second
`dvc repro` has nothing to do, a fit_guidance param change re-runs only what depends on it, and malformed inputs
are rejected with a clear error and no output written. The pipeline runs once per test run (conftest's
``quick_pipeline``); a test that changes a workspace changes its own copy."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import QUICK, REPO, copy_workspace, run

from ptg import schemas
from ptg.io import read_table
from ptg.ops.workspace import make_workspace

pytestmark = pytest.mark.slow


@pytest.fixture
def quick(quick_pipeline) -> Path:
    """The finished quick workspace, shared by every test: read it only."""
    return quick_pipeline


@pytest.fixture
def quick_copy(quick_pipeline, tmp_path) -> Path:
    """A copy of the finished quick workspace of this test's own."""
    return copy_workspace(quick_pipeline, tmp_path / "ws")


def ran(ws: Path, *args: str) -> set[str]:
    """The stages `dvc repro` runs (with ``--dry``: would run, judged on their own deps and params)."""
    out = run(["dvc", "repro", *args], ws).stdout
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_every_stage_writes_valid_outputs(quick):
    for r in (1, 2):
        d = quick / "data" / "rounds" / str(r)
        samples = read_table(d / "samples.parquet", schemas.Samples)
        assert samples.groupby("id").size().eq(3).all()
        read_table(d / "rankings.parquet", schemas.Rankings)
        read_table(d / "predictions.parquet", schemas.Predictions)
        assert (d / "guidance" / "head.safetensors").is_file() and (d / "lm" / "model.safetensors").is_file()
        fit = json.loads((quick / "metrics" / "rounds" / str(r) / "fit_guidance.json").read_text())
        assert 0 <= fit["val_accuracy"] <= 1 and fit["updates"] >= 1
    report = pd.read_csv(quick / "metrics" / "report" / "eval_by_round.csv")
    assert report["round"].tolist() == [1, 2] and {"ptg_rougeL", "mle_rougeL"} <= set(report.columns)
    shown = run(["dvc", "metrics", "show", "--json"], quick).stdout
    for key in ("metrics/rounds/1/evaluate.json", "metrics/rounds/2/evaluate.json",
                "metrics/baseline/2/evaluate.json"):
        assert key in shown


def test_outputs_are_stored_once_linked_to_the_cache(quick):
    """cache.type hardlink,copy (ptg.ops.workspace.CACHE_TYPES): a model in a directory output is the cache's file
    itself (hard-linked), not a second copy. With reflink first, DVC commits directory outputs as copies on a file
    system without reflinks (ext4): this test failed so."""
    import hashlib

    weights = quick / "data" / "rounds" / "1" / "lm" / "model.safetensors"
    md5 = hashlib.md5(weights.read_bytes()).hexdigest()
    cached = quick / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    assert cached.is_file(), f"{weights} is not in the DVC cache"
    assert os.path.samefile(weights, cached), f"{weights} is a copy of {cached}"


def test_baseline_round_sees_the_same_examples_in_the_same_order_as_ptg(quick):
    """Same seed, same batches: the reference tokens of every update agree between the two arms, the first update's
    NLL (the same base LM on the same references) too, and the baseline is marked unguided."""
    for r in (1, 2):
        ptg = pd.read_csv(quick / "metrics" / "rounds" / str(r) / "train_lm_history.csv")
        base = pd.read_csv(quick / "metrics" / "baseline_history" / str(r) / "train_lm_history.csv")
        assert ptg["tokens"].tolist() == base["tokens"].tolist()
        assert ptg["tokens"].nunique() > 1  # batches differ from update to update, so the match is informative
        if r == 1:  # both arms start from the base LM: the first batch's unweighted NLL is the same references'
            first = [h[h["update"] >= 1].iloc[0]["nll"] for h in (ptg, base)]
            assert first[0] == pytest.approx(first[1], rel=1e-6)
        summary = json.loads((quick / "metrics" / "baseline" / str(r) / "train_lm.json").read_text())
        assert summary["guided"] is False and summary["objective"] == "wmle"
    items = pd.read_csv(quick / "metrics" / "rounds" / "2" / "evaluate_items.csv")
    assert len(items) == 16 and {"rougeL", "rouge2", "meteor", "gen_len"} <= set(items.columns)


def test_repro_again_has_nothing_to_do(quick_copy):
    # Only `sources` and `preferences` (always_changed: what they read lives outside the project) run; their
    # outputs are unchanged, so nothing downstream does.
    assert ran(quick_copy, "--dry") == {"sources", "preferences"}
    status = run(["dvc", "status"], quick_copy).stdout
    assert "preferences" in status and "sources" in status and "always changed" in status
    assert not any(f"{s}:" in status for s in ("prepare", "sample@1", "fit_guidance@1", "evaluate@2", "baseline"))
    assert ran(quick_copy) == {"sources", "preferences"}


def test_fit_guidance_param_change_reruns_only_downstream(quick_pipeline, tmp_path):
    lr = yaml.safe_load(QUICK.read_text())["fit_guidance"]["lr"]
    ws = copy_workspace(quick_pipeline, tmp_path / "ws", fit_guidance={"lr": lr / 2})
    # For real: a dry run cannot know which outputs will change, so it lists only fit_guidance@1 and @2.
    # rank@2 re-runs only if LM_1's samples changed (a tiny random LM may draw the same tokens again).
    stages = ran(ws)
    # `sources` and `preferences` always run (what they read is outside the project); their unchanged outputs
    # rerun nothing.
    assert {"fit_guidance@1", "train_lm@1", "evaluate@1", "sample@2", "fit_guidance@2", "train_lm@2",
            "evaluate@2", "report"} <= stages <= {"sources", "preferences", "fit_guidance@1", "train_lm@1",
                                                  "evaluate@1", "sample@2", "rank@2", "fit_guidance@2", "train_lm@2",
                                                  "evaluate@2", "report"}
    # Back to the first params: DVC's run cache restores every stage's outputs instead of running it again (an
    # arm of a bench that changes only train_lm reuses the seed's guidance so); a stage with a git-tracked table
    # declared as an out with cache: false would never be run-cached and would run again here.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["fit_guidance"]["lr"] = lr
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], ws).stdout
    executed = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert executed <= {"sources", "preferences"}, out
    restored = {line.split("'")[1] for line in out.splitlines() if "is cached - skipping run" in line}
    assert {"fit_guidance@1", "train_lm@1", "evaluate@1", "fit_guidance@2", "train_lm@2", "evaluate@2"} <= restored


def _workspace_with(tmp_path: Path, **overrides) -> Path:
    params = yaml.safe_load((REPO / "configs" / "quick.yaml").read_text())
    for group, values in overrides.items():
        params[group] |= values
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return make_workspace(tmp_path / "p.yaml", tmp_path / "ws")


def test_malformed_input_file_is_rejected_and_nothing_is_written(tmp_path):
    data = tmp_path / "mydata"
    data.mkdir()
    for split in ("train", "validation", "test"):
        pd.DataFrame({"document": ["a b c", "d e f"], "summary": ["x", "y"]}).to_csv(data / f"{split}.csv",
                                                                                   index=False)
    ws = _workspace_with(tmp_path, data={"source": str(data), "input_field": "text", "target_field": "summary"})
    proc = run([sys.executable, "stages/prepare.py"], ws, check=False)
    assert proc.returncode != 0
    assert "train.csv: no field 'text'" in proc.stderr and "document" in proc.stderr
    assert not (ws / "data" / "prepared").exists()

    pd.DataFrame({"document": ["a b c", "d e f"], "summary": ["x", " "]}).to_csv(data / "test.csv", index=False)
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text().replace("input_field: text",
                                                                             "input_field: document"))
    proc = run([sys.executable, "stages/prepare.py"], ws, check=False)
    assert proc.returncode != 0 and "test.csv: empty 'summary' in 1 row(s): row 1" in proc.stderr
    assert not (ws / "data" / "prepared").exists()


def test_nan_human_score_is_rejected_and_no_ranking_is_written(tmp_path):
    scores = tmp_path / "scores.csv"
    ws = _workspace_with(tmp_path, rank={"metric": "file", "scores_file": str(scores)})
    samples = pd.DataFrame({"id": ["a", "a"], "sample_idx": [0, 1], "text": ["good", "bad"],
                            "token_ids": [[5, 1], [6, 1]], "n_tokens": [2, 2], "finished": [True, True]})
    (ws / "data" / "rounds" / "1").mkdir(parents=True)
    samples.to_parquet(ws / "data" / "rounds" / "1" / "samples.parquet")
    pd.DataFrame({"id": ["a", "a"], "text": ["good", "bad"], "score": [0.9, float("nan")]}).to_csv(scores,
                                                                                                   index=False)
    proc = run([sys.executable, "stages/rank.py", "--round", "1"], ws, check=False)
    assert proc.returncode != 0
    assert "scores.csv" in proc.stderr and "score" in proc.stderr and "[1]" in proc.stderr
    assert not (ws / "data" / "rounds" / "1" / "rankings.parquet").exists()


def test_a_damaged_artifact_is_reported_by_the_stage_that_reads_it_and_dvc_restores_it(quick_copy):
    weights = quick_copy / "data" / "rounds" / "1" / "lm" / "model.safetensors"
    table = quick_copy / "data" / "rounds" / "2" / "samples.parquet"
    originals = {p: p.read_bytes() for p in (weights, table)}
    for p, data in originals.items():
        p.chmod(0o644)  # DVC may link cache files read-only
        p.unlink()
        p.write_bytes(data[: len(data) // 2])
    proc = run([sys.executable, "stages/sample.py", "--round", "2"], quick_copy, check=False)
    assert proc.returncode != 0 and "model.safetensors: damaged weights" in proc.stderr
    proc = run([sys.executable, "stages/rank.py", "--round", "2"], quick_copy, check=False)
    assert proc.returncode != 0 and "samples.parquet: not a readable parquet table" in proc.stderr
    status = run(["dvc", "status"], quick_copy).stdout
    assert "data/rounds/1/lm" in status and "data/rounds/2/samples.parquet" in status
    run(["dvc", "checkout", "--force"], quick_copy)
    assert all(p.read_bytes() == data for p, data in originals.items())
    status = run(["dvc", "status"], quick_copy).stdout
    assert "data/rounds/1/lm" not in status and "data/rounds/2/samples.parquet" not in status


def test_lora_trains_adapters_for_both_arms_and_saves_them_beside_the_merged_lm(quick_pipeline, tmp_path):
    """train_lm.lora.rank > 0: train_lm@1 and the baseline train fresh LoRA adapters (peft) with the same setup;
    the round's LM folder holds the merged weights, which plain transformers loads and which give the adapted
    model's logits, and the adapters under adapter/. Only the targeted projections change."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "q_proj,v_proj"}
    # adapters start at B = 0: lr 1e-2 takes a visible step in 4 updates
    ws = copy_workspace(quick_pipeline, tmp_path / "ws", train_lm={"lora": lora, "lr": 1.0e-2})
    assert ran(ws, "train_lm@1", "baseline") - {"sources", "preferences"} == {"train_lm@1", "baseline"}  # upstream

    lm0, lm1 = ws / "data" / "rounds" / "0" / "lm", ws / "data" / "rounds" / "1" / "lm"
    adapter = json.loads((lm1 / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0 and set(adapter["target_modules"]) == {"q_proj",
                                                                                                      "v_proj"}
    before, after = load_file(lm0 / "model.safetensors"), load_file(lm1 / "model.safetensors")
    assert set(after) == set(before)  # merged: no adapter tensors in the LM's own weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)

    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    merged = AutoModelForCausalLM.from_pretrained(lm1).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm0), lm1 / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-4)

    ptg = json.loads((ws / "metrics" / "rounds" / "1" / "train_lm.json").read_text())
    base = json.loads((ws / "metrics" / "baseline" / "1" / "train_lm.json").read_text())
    total = sum(t.numel() for t in before.values())
    assert ptg["lora_rank"] == base["lora_rank"] == 4
    assert ptg["trainable_parameters"] == base["trainable_parameters"] < total // 10
    assert (ws / "data" / "baseline" / "1" / "lm" / "adapter" / "adapter_model.safetensors").is_file()


# --main_process_port 0: accelerate takes a free port itself, as it starts the processes
ACCELERATE = ("--num_machines 1 --mixed_precision no --dynamo_backend no --main_process_ip 127.0.0.1 "
              "--main_process_port 0")


@pytest.mark.parametrize("launch", ["--multi_gpu --num_processes 2", "--config_file configs/accelerate/fsdp.yaml"],
                         ids=["ddp", "fsdp"])
def test_train_lm_under_accelerate_launch_trains_data_parallel_and_writes_once(quick_pipeline, tmp_path, launch):
    """`launcher: accelerate launch --multi_gpu --num_processes 2 ...` in params.yaml (gloo on the CPU), or the
    shipped FSDP config (two processes, each holding half the policy): DVC sees the training stages' interpolated
    cmd change and `dvc repro` runs train_lm@1 that way; the two ranks train one LM on the global batch (the same
    losses as the stage in one process) and rank 0 alone writes it (under FSDP, the weights gathered from both
    ranks' shards), which the next stage loads."""
    from safetensors.torch import load_file

    ws = copy_workspace(quick_pipeline, tmp_path / "ws")  # train_lm@1 trained there in one process
    lm, metrics = ws / "data" / "rounds" / "1" / "lm", ws / "metrics" / "rounds" / "1"
    one = load_file(lm / "model.safetensors")
    history_one = pd.read_csv(metrics / "train_lm_history.csv")
    launcher = f"accelerate launch {launch} {ACCELERATE}"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["launcher"] == "python"
    (ws / "params.yaml").write_text(yaml.safe_dump(params | {"launcher": launcher}, sort_keys=False))
    # fit_guidance@1's cmd changed too (DVC would rerun it): --single-item keeps its one-process guidance, so both
    # LMs train on the same rewards. `accelerate` is the venv's (run() puts its bin first on PATH).
    assert "changed command" in run(["dvc", "status", "fit_guidance@1"], ws).stdout
    assert ran(ws, "--single-item", "train_lm@1") == {"train_lm@1"}
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert lock["train_lm@1"]["cmd"] == f"{launcher} stages/train_lm.py --round 1"
    assert lock["sample@1"]["cmd"] == "python stages/sample.py --round 1"
    summary = json.loads((metrics / "train_lm.json").read_text())
    assert summary["processes"] == 2
    assert summary["fsdp"] == ("fsdp" in launch)
    history_two = pd.read_csv(metrics / "train_lm_history.csv")
    assert history_two["tokens"].tolist() == history_one["tokens"].tolist()  # the global batch, summed over ranks
    for key in ("loss", "nll", "reward"):
        assert history_two[key].to_numpy() == pytest.approx(history_one[key].to_numpy(), rel=1e-4), key
    two = load_file(lm / "model.safetensors")
    # AdamW at lr 1e-4 for 4 updates: rounding noise can flip near-zero gradients' steps (<= 4e-4), no more.
    assert two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= 4e-4
    assert not [p for p in ws.rglob("*") if ".tmp-" in p.name]
    assert ran(ws, "--single-item", "evaluate@1") == {"evaluate@1"}  # the saved LM loads and generates


def test_checkpoint_selection_scores_validation_as_the_evaluation_does(quick, monkeypatch):
    """train_lm.eval_every's score is the evaluation's ROUGE-L (greedy, evaluate.max_new_tokens) on the first
    eval_items inputs of the validation split, never of test."""
    from ptg import pipeline, tasks
    from ptg.config import load as load_params
    from ptg.lm.models import load_lm, load_tokenizer
    from ptg.pipeline import evaluation

    monkeypatch.chdir(quick)
    ctx = pipeline.start("test", load_params("params.yaml"))
    lm_dir = pipeline.round_dir(1) / "lm"
    model, tok = load_lm(lm_dir, ctx.device), load_tokenizer(lm_dir)
    ep = ctx.params.evaluate
    scores = {}
    for split in ("validation", "test"):
        frame = pipeline.read_examples(split)
        _, summary, _, _ = evaluation.evaluate_lm(model, tok, frame, ctx.params.model,
                                                  ep.max_new_tokens, ep.batch_size, ctx, None)
        scores[split] = summary["rougeL"]
    n = len(pipeline.read_examples("validation"))
    cfg = dataclasses.replace(ctx.params.train_lm, eval_items=n)
    validate = tasks.scoring(ctx.params).validation_scorer(tok, cfg, ctx)
    assert validate(model)["val_score"] == pytest.approx(scores["validation"], abs=1e-9)
    assert scores["validation"] != pytest.approx(scores["test"])  # the two splits score apart: it read validation


def test_policy_gradient_alone_records_held_out_reward_curves_for_both_arms(quick_pipeline, tmp_path):
    """train_lm.objective pg (the RL bench's regime): train_lm@1 with return-preserving credit, the baseline with
    sequence-level credit (RLOO); both write the held-out reward of each validation input at every checkpoint
    (train_lm_curve.csv), the same inputs and checkpoints; fit_guidance reports its diagnostics."""
    pg = {"objective": "pg", "pg_credit": "spread", "eval_every": 2, "eval_items": 4, "pg_samples": 3}
    ws = copy_workspace(quick_pipeline, tmp_path / "ws", train_lm=pg)
    assert {"train_lm@1", "baseline"} <= ran(ws, "train_lm@1", "baseline")
    val = read_table(ws / "data" / "prepared" / "validation.parquet", schemas.Examples)["id"].head(4).tolist()
    for folder in ("rounds", "baseline"):
        summary = json.loads((ws / "metrics" / folder / "1" / "train_lm.json").read_text())
        assert summary["objective"] == "pg" and summary["seconds_per_update"] > 0
        curve = pd.read_csv(ws / "metrics" / folder / "1" / "train_lm_curve.csv")
        assert sorted(curve["update"].unique()) == [0, 2, 4]
        assert curve.groupby("update")["id"].apply(list).map(sorted).tolist() == [sorted(val)] * 3
        assert curve[["reward_greedy", "reward_sampled"]].notna().all().all()
    history = pd.read_csv(ws / "metrics" / "baseline_history" / "1" / "train_lm_history.csv")
    assert {"val_reward_greedy", "val_reward_sampled", "pg_score"} <= set(history.columns)
    fit = json.loads((ws / "metrics" / "rounds" / "1" / "fit_guidance.json").read_text())
    assert {"val_accuracy_clear", "occlusion_spearman", "occlusion_samples", "reward_cv"} <= set(fit)
