"""Precision choice and bf16 numerics against fp32 (the guidance and the LM objective under bf16 autocast)."""

import json

import pytest
import torch
from conftest import EOS, PAD, tiny_llama

from ptg import losses
from ptg.config import TrainConfig
from ptg.guidance.model import Guidance
from ptg.lm import precision
from ptg.lm.models import collate, response_logits
from ptg.lm.precision import autocast, resolve_device, resolve_precision
from ptg.lm.train import Example, train_lm

CPU = torch.device("cpu")


def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32", CPU) == torch.float32
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    assert resolve_precision("auto", CPU) == torch.float32  # the model's shape unknown: nothing to measure
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", CPU)
    assert resolve_device("cpu") == CPU
    for speedup, dtype in ((1.6, torch.bfloat16), (1.1, torch.float32), (0.0, torch.float32)):
        monkeypatch.setattr(precision, "bf16_speedup", lambda width, ffn, s=speedup: s)
        assert resolve_precision("auto", CPU, 576, 1536) == dtype, speedup
        assert resolve_precision("fp32", CPU, 576, 1536) == torch.float32


def test_the_cpu_probe_runs_once_per_shape_and_only_where_bf16_units_exist(monkeypatch, tmp_path):
    """Every stage of a run (and every run on the machine) reads the same figure: one measurement per CPU, torch
    version, thread count and shape, kept under PTG_CACHE."""
    monkeypatch.setenv("PTG_CACHE", str(tmp_path))
    probes = []
    monkeypatch.setattr(precision, "probe_matmul", lambda w, f: probes.append((w, f)) or 1.7)
    monkeypatch.setattr(precision, "cpu_info", lambda: ("Test CPU", {"avx2", "avx512_bf16"}))
    assert precision.bf16_speedup(576, 1536) == 1.7 and precision.bf16_speedup(576, 1536) == 1.7
    assert precision.bf16_speedup(64, 128) == 1.7
    assert probes == [(576, 1536), (64, 128)]
    assert len(json.loads((tmp_path / "precision.json").read_text())) == 2
    monkeypatch.setattr(precision, "cpu_info", lambda: ("Old CPU", {"avx2"}))
    assert precision.bf16_speedup(576, 1536) == 0.0 and len(probes) == 2


def test_the_real_probe_returns_a_speed_ratio():
    ratio = precision.probe_matmul(64, 128, repeats=2)
    assert 0.01 < ratio < 100


def test_bf16_training_losses_track_fp32_over_50_updates():
    """The mixed-precision contract: fp32 master weights and optimiser state, bf16 matmuls. The same 50 updates on
    the same batches give per-update losses within 1e-3 (relative) of fp32's; measured 1.9e-4 at most on this tiny
    model (README "Speed" has SmolLM2-135M's). bf16 master weights (updates below bf16's resolution
    lost) or a bf16 loss would drift out of it."""
    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(3, 24, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist(),
                        torch.randint(3, 24, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
                        + [EOS]) for _ in range(64)]
    cfg = TrainConfig(max_updates=50, batch_size=8, lr=1e-3)
    losses_by = {dt: [h["loss"] for h in train_lm(tiny_llama(), examples, cfg, PAD, CPU, dt, progress=False)]
                 for dt in (torch.float32, torch.bfloat16)}
    rel = [abs(b - a) / a for a, b in zip(losses_by[torch.float32], losses_by[torch.bfloat16], strict=True)]
    assert len(rel) == 50 and max(rel) < 1e-3, max(rel)
    assert losses_by[torch.float32][-1] < losses_by[torch.float32][0] - 0.2  # it learns: the comparison is not idle


def test_bf16_autocast_stays_close_to_fp32():
    lm = tiny_llama()
    # A head whose rewards differ per token (the reference's init, or re-initialising one layer, leaves every reward
    # at 0.5487, which any backbone would match).
    g = Guidance(lm.model, head_hidden=64, init_gain=3.0).eval()
    batch = collate([[2, 5, 6], [2, 9]], [[4, 5, 6, EOS], [7, EOS]], PAD)
    with torch.no_grad():
        r32, l32 = g(batch), response_logits(lm, batch)
        with autocast(CPU, torch.bfloat16):
            r16, l16 = g(batch), response_logits(lm, batch)
    assert l16.dtype == torch.bfloat16 and r16.dtype == torch.float32
    assert r32[batch.response_mask.bool()].std() > 0.1  # the tolerance below is small against the spread
    torch.testing.assert_close(r16, r32, atol=2e-2, rtol=0)
    nll32 = losses.token_nll(l32, batch.response_ids, batch.response_mask)
    nll16 = losses.token_nll(l16, batch.response_ids, batch.response_mask)
    torch.testing.assert_close(nll16, nll32, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("wrap", ["lora", "prompt_head"])
def test_bf16_training_updates_only_the_trainable_fp32_weights(wrap):
    """A working copy with frozen weights (LoRA adapters, the prompt policy's MLP head): after bf16 updates the
    model's trainable weights moved and are still fp32, and its frozen weights are untouched."""
    from ptg.lm.models import add_lora, add_prompt_head
    from ptg.lm.precision import WorkingCopy

    base = tiny_llama()
    model = add_lora(base, 2, 4.0, 0.0, None, seed=0) if wrap == "lora" else add_prompt_head(base, 16, seed=0)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    work = WorkingCopy(model, torch.bfloat16)
    assert len(work.pairs) == len(trainable) and all(w.dtype == torch.bfloat16 for _, w in work.pairs)
    examples = [Example([2, 5, 6, 7], [4, 5, EOS]), Example([2, 9], [7, 8, EOS])]
    train_lm(model, examples, TrainConfig(max_updates=3, batch_size=2, lr=1e-2), PAD, CPU, torch.bfloat16,
             progress=False)
    now = dict(model.named_parameters())
    assert all(now[n].dtype == torch.float32 and not torch.equal(now[n], v) for n, v in trainable.items())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())


def test_a_working_copy_pulls_fp32_weights_and_accumulates_its_gradients_in_fp32():
    from ptg.lm.precision import WorkingCopy

    master = torch.nn.Linear(4, 3)
    work = WorkingCopy(master, torch.bfloat16)
    assert work.model is not master and work.model.weight.dtype == torch.bfloat16
    with torch.no_grad():
        master.weight.add_(1.0)
    work.pull()
    assert torch.equal(work.model.weight, master.weight.bfloat16())
    for step in (1.0, 2.0):  # two micro-batches: the master holds their sum, in fp32; the copy's are cleared
        work.model.weight.grad = torch.full_like(work.model.weight, step)
        work.push()
        assert work.model.weight.grad is None
    assert master.weight.grad.dtype == torch.float32 and torch.equal(master.weight.grad, torch.full((3, 4), 3.0))
    assert WorkingCopy(master, torch.float32).model is master  # fp32: no copy, pull and push do nothing
