"""The CUDA path (bf16 autocast): sampling, guidance fitting, LM training and greedy evaluation on the GPU, each
matching fp32 within tolerance. Skipped where no CUDA device is present (the CPU suite covers the same code)."""

import math

import pytest
import torch
from conftest import EOS, PAD, tiny_llama
from test_guidance_train import FIT, X, guidance_for, synthetic_groups

from ptg.guidance.model import fit_guidance
from ptg.lm.models import collate, response_logits
from ptg.lm.precision import resolve_precision
from ptg.lm.sampling import SamplingConfig, sample
from ptg.lm.train import Example, TrainConfig, train_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU = torch.device("cuda")
PROMPTS = [[2, 5, 6, 7], [2, 9], [3, 4, 11, 12, 13]]


def test_auto_precision_is_bf16_on_cuda():
    assert resolve_precision("auto", GPU) == torch.bfloat16


def test_sampling_and_greedy_on_the_gpu_match_the_cpu():
    model = tiny_llama()
    greedy = SamplingConfig(num_samples=1, max_new_tokens=6, temperature=0)
    cpu = sample(model, PROMPTS, greedy, [EOS], PAD, torch.device("cpu"), progress=False)
    gpu = sample(model.to(GPU), PROMPTS, greedy, [EOS], PAD, GPU, progress=False)
    assert gpu == cpu  # fp32 on both: the same argmax
    cfg = SamplingConfig(num_samples=4, max_new_tokens=8)
    a = sample(model, PROMPTS, cfg, [EOS], PAD, GPU, torch.bfloat16, generator=torch.Generator().manual_seed(0),
               progress=False)
    b = sample(model, PROMPTS, cfg, [EOS], PAD, GPU, torch.bfloat16, generator=torch.Generator().manual_seed(0),
               progress=False)
    assert a == b and all(len(g) == 4 for g in a)


def test_bf16_logits_match_fp32_within_tolerance():
    model = tiny_llama().to(GPU)
    batch = collate(PROMPTS, [[4, 5, 6], [7, EOS], [8, 9, 10, 11]], PAD).to(GPU)
    fp32 = response_logits(model, batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = response_logits(model, batch).float()
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)


def test_k_responses_per_prompt_repeat_the_prompt_on_the_gpu_and_match_the_shared_cpu_forward():
    from ptg.lm.models import response_hidden, shares_prompts

    model = tiny_llama()
    batch = collate(PROMPTS, [[4, 5], [6, EOS], [7], [8, 9, 10], [11, EOS], [12]], PAD)
    assert batch.group_size == 2 and shares_prompts(model, batch) and not shares_prompts(model, batch.to(GPU))
    cpu = response_logits(model, batch), response_hidden(model.model, batch)
    gpu = response_logits(model.to(GPU), batch.to(GPU)), response_hidden(model.model, batch.to(GPU))
    mask = batch.response_mask.bool()
    for c, g in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(g.cpu()[mask], c[mask], atol=1e-4, rtol=1e-4)


def test_guidance_fits_and_the_lm_trains_in_bf16_on_the_gpu():
    g = guidance_for(tiny_llama())
    train, val = synthetic_groups(96, 4, seed=1), synthetic_groups(32, 4, seed=2)
    result = fit_guidance(g, train, val, FIT, PAD, GPU, torch.bfloat16, progress=False)
    assert result.best_val_accuracy >= 0.85
    r = g(collate([[2, 7]], [[X, 9, X, 11, EOS]], PAD).to(GPU))[0]
    assert r[0] > r[1]
    lm = tiny_llama()
    examples = [Example([2, 3, 4], [X, X, EOS]), Example([2, 6], [X, EOS])]
    before = response_logits(lm, collate([[2, 3, 4]], [[X, X, EOS]], PAD)).log_softmax(-1)[0, 0, X].item()
    history = train_lm(lm, examples, TrainConfig(lr=1e-2, batch_size=2, max_updates=5), PAD, GPU, torch.bfloat16,
                       guidance=g, progress=False)
    assert len(history) == 5 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    after = response_logits(lm, collate([[2, 3, 4]], [[X, X, EOS]], PAD).to(GPU)).log_softmax(-1)[0, 0, X].item()
    assert after > before


def test_perf_rows_run_on_the_gpu():
    from ptg.ops import perf

    model = tiny_llama().to(GPU)
    rows = perf.decoding_rows(model, PROMPTS, [EOS], PAD, k=2, max_new=4, batch_size=2, device=GPU,
                              dtype=torch.bfloat16)
    assert all(rows[r]["tokens"] > 0 and rows[r]["vs_generate"] > 0 for r in ("sample", "greedy"))
    assert perf.guidance_row(model.model, PROMPTS, PAD, k=2, repeats=1, device=GPU, dtype=torch.bfloat16)["speedup"] > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = perf.train_row(model, PROMPTS, [[4, 5, EOS], [6, EOS], [7, 8, 9, EOS]], PAD, updates=1, batch_size=2,
                       device=GPU, dtype=torch.bfloat16)
    assert t["flops_per_s"] > 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert perf.matmul_peak(torch.bfloat16, GPU, n=1024, repeats=1) > 1e12  # any GPU does > 1 TFLOP/s in bf16


def test_group_scores_run_on_the_gpu_whatever_device_the_guidance_was_left_on():
    # fit_guidance@r saves the guidance from the CPU, then scores every group on ctx.device: on CUDA that raised
    # "Expected all tensors to be on the same device" (found on an H200; the CPU suite cannot see it).
    from ptg.guidance.model import group_scores

    g = guidance_for(tiny_llama()).cpu()
    groups = synthetic_groups(8, 4, seed=3)
    scores = group_scores(g, groups, FIT, PAD, GPU, torch.bfloat16)
    assert len(scores) == 8 and all(len(row) == 4 and all(map(math.isfinite, row)) for row in scores)
