"""Precision choice and bf16 numerics against fp32 (the guidance and the LM objective under bf16 autocast)."""

import pytest
import torch
from conftest import EOS, PAD, tiny_llama

from ptg import losses
from ptg.guidance import Guidance
from ptg.models import collate, response_logits
from ptg.precision import autocast, resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_resolve_precision():
    assert resolve_precision("fp32", CPU) == torch.float32
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    assert resolve_precision("auto", CPU) == torch.float32  # bf16 autocast measured slower on CPUs
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", CPU)
    assert resolve_device("cpu") == CPU


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
