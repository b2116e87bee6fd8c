"""Token alignment (ptg.models) and sampling (ptg.sampling) on tiny Llama and T5 models."""

import pytest
import torch
from conftest import EOS, PAD, tiny_llama

from ptg.models import collate, response_logits
from ptg.sampling import SamplingConfig, filter_logits, sample

CPU = torch.device("cpu")
PROMPTS = [[2, 5, 6, 7], [2, 9], [3, 4, 11, 12, 13]]


def test_response_logits_match_a_plain_unpadded_forward(tiny_lm):
    """Left-padded prompts and right-padded responses give the same logits as each pair run alone."""
    responses = [[4, 5, 6], [7, EOS], [8, 9, 10, 11]]
    batched = response_logits(tiny_lm, collate(PROMPTS, responses, PAD))
    for i, (p, r) in enumerate(zip(PROMPTS, responses, strict=True)):
        alone = response_logits(tiny_lm, collate([p], [r], PAD))
        torch.testing.assert_close(batched[i, : len(r)], alone[0], atol=1e-5, rtol=1e-4)


def test_greedy_sampling_matches_hf_generate_and_teacher_forcing(tiny_lm):
    cfg = SamplingConfig(num_samples=1, max_new_tokens=6, temperature=0)
    out = sample(tiny_lm, PROMPTS, cfg, [EOS], PAD, CPU, progress=False)
    for p, (seq,) in zip(PROMPTS, out, strict=True):
        kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        hf = tiny_lm.generate(torch.tensor([p]), **kwargs)[0].tolist()
        hf = hf[len(p):] if not tiny_lm.config.is_encoder_decoder else hf[1:]
        end = next((i + 1 for i, t in enumerate(hf) if t == EOS), len(hf))
        assert seq == hf[:end]
        # The sampler and the scorer read the same distributions: argmax of teacher-forced logits = the sample.
        logits = response_logits(tiny_lm, collate([p], [seq], PAD))
        assert logits[0].argmax(-1).tolist() == seq


def test_seeded_sampling_is_reproducible_and_k_samples_differ(tiny_lm):
    cfg = SamplingConfig(num_samples=4, max_new_tokens=8, temperature=1.0)
    a = sample(tiny_lm, PROMPTS, cfg, [EOS], PAD, CPU, batch_size=2, generator=torch.Generator().manual_seed(3),
               progress=False)
    b = sample(tiny_lm, PROMPTS, cfg, [EOS], PAD, CPU, batch_size=2, generator=torch.Generator().manual_seed(3),
               progress=False)
    assert a == b
    assert [len(x) for x in a] == [4, 4, 4]
    assert len({tuple(s) for s in a[0]}) > 1
    for group in a:
        for s in group:
            assert 1 <= len(s) <= 8 and (EOS not in s[:-1])


def test_cache_expansion_gives_the_same_distribution_as_recomputing():
    """Sampling K from one prefilled cache equals sampling each row from its own prompt copy."""
    model = tiny_llama()
    cfg = SamplingConfig(num_samples=3, max_new_tokens=5, temperature=1.0)
    expanded = sample(model, PROMPTS[:1], cfg, [EOS], PAD, CPU, generator=torch.Generator().manual_seed(1),
                      progress=False)[0]
    single = sample(model, PROMPTS[:1] * 3, SamplingConfig(num_samples=1, max_new_tokens=5), [EOS], PAD, CPU,
                    generator=torch.Generator().manual_seed(1), progress=False)
    assert expanded == [s[0] for s in single]
    assert len({tuple(s) for s in expanded}) > 1


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isfinite(k2).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, SamplingConfig(top_p=0.8))
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, SamplingConfig(top_p=0.81))
    assert torch.isfinite(p).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -1}])
def test_bad_sampling_settings_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingConfig(**kwargs)


def test_collate_rejects_empty_and_mismatched():
    with pytest.raises(ValueError, match="multiple"):
        collate([[1, 2], [3]], [[4], [5], [6]], PAD)
    with pytest.raises(ValueError, match="empty"):
        collate([[1, 2]], [[]], PAD)
