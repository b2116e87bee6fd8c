"""ptg.ops.perf: the FLOP model behind "fraction of the compute bound", and every row of the report on a tiny model
(the real measurement is `make perf`)."""

import pytest
import torch
from conftest import EOS, PAD, tiny_llama

from ptg.ops import perf


def test_flop_model_counts_linear_layers_attention_and_the_lm_head():
    model = tiny_llama()
    shape = perf._shape(model)
    # 2 layers x (q, o: 32x32; k, v: 32x16 with 2 of 4 heads; gate, up, down: 32x64)
    assert shape == {"linear": 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64), "vocab": model.config.vocab_size,
                     "width": 32, "layers": 2, "attn": 32}
    one = perf.forward_flops(shape, [1], 0)
    assert one == 2 * shape["linear"] + 4 * 2 * 32 * 1
    assert perf.forward_flops(shape, [1, 2], 1) == 2 * one + 4 * 2 * 32 + 2 * shape["vocab"] * 32
    # A prompt of 3 tokens prefilled once, then K = 2 samples of 2 and 1 tokens: one decode step (at context 4).
    flops = perf.decode_flops(shape, [[5, 6, 7]], [[[8, 9], [EOS]]])
    assert flops == perf.forward_flops(shape, [1, 2, 3], 1) + perf.forward_flops(shape, [4], 1)


def test_every_row_runs_and_the_table_shows_it():
    torch.manual_seed(0)
    model = tiny_llama()
    prompts = [[2, 5, 6, 7], [2, 9], [3, 4, 11, 12, 13]]
    result = {"machine": {"cpu": "test cpu", "cores": 2, "flags": ["avx2"]}, "threads": 1,
              "peak_flops": {"fp32": 1e9}, "settings": {"k": 2}}
    result["bandwidth_bytes_per_s"] = perf.memory_bandwidth(mib=8)
    result |= perf.decoding_rows(model, prompts, [EOS], PAD, k=2, max_new=4, batch_size=2,
                                 bandwidth=result["bandwidth_bytes_per_s"])
    result["guidance"] = perf.guidance_row(model.model, prompts, PAD, k=2, repeats=1)
    for row, rank in (("train_lm", 0), ("train_lm_lora", 2)):
        result[row] = perf.train_row(model, prompts, [[4, 5, EOS], [6, EOS], [7, 8, 9, EOS]], PAD, updates=1,
                                     batch_size=2, lora_rank=rank)
    assert result["train_lm_lora"]["trainable_parameters"] < result["train_lm"]["trainable_parameters"] / 10
    perf.with_peak(result, 1e9)
    result["startup_s"] = {"report": 1.0}
    for row in ("sample", "greedy"):
        assert result[row]["tokens"] > 0 and result[row]["vs_generate"] > 0
        assert result[row]["of_compute_bound"] > 0 and 0 < result[row]["of_bandwidth_bound"] < 1
    assert result["guidance"]["speedup"] > 0 and result["train_lm"]["of_peak"] > 0
    table = perf.format_table(result)
    for label in ("sample (K = 2)", "greedy (evaluate)", "guidance scoring (K = 2)", "train_lm", "LoRA r=8",
                  "start-up", "(3x)", "(60%)", "decode steps alone need", "GB/s"):
        assert label in table


def test_decode_steps_follow_the_samplers_batches():
    """Prompts sorted by length, two per batch: [b, c] then [a]; each batch steps to its longest output, less
    the token the prefill gives."""
    prompts = [[1, 2, 3], [1], [1, 2]]
    outputs = [[[5] * 4], [[5] * 2, [5] * 6], [[5] * 3]]
    assert perf.decode_steps(prompts, outputs, batch_size=2) == (6 - 1) + (4 - 1)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_train_row_leaves_the_model_as_it_was(lora_rank):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perf.train_row(model, [[2, 5, 6], [3, 4]], [[4, EOS], [6, EOS]], PAD, updates=1, batch_size=2,
                   lora_rank=lora_rank)
    assert model.state_dict().keys() == before.keys()  # no adapter layers left behind
    assert all(p.requires_grad for p in model.parameters())  # and none frozen (peft freezes the base weights)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_startup_is_measured_per_stage():
    out = perf.startup_row(("report",))
    assert set(out) == {"report"} and out["report"] > 0
