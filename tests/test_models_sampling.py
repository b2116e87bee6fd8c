"""Token alignment (ptg.lm.models) and sampling (ptg.lm.sampling) on tiny Llama and T5 models."""

import pytest
import torch
from conftest import EOS, PAD, tiny_llama

from ptg.lm.models import collate, response_logits
from ptg.lm.sampling import SamplingConfig, filter_logits, sample

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


def test_inverse_cdf_draws_follow_the_distribution_and_never_a_removed_token():
    from ptg.lm.sampling import _next_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(20000, -1)
    draws = _next_tokens(logits, SamplingConfig(), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)
    top2 = _next_tokens(logits, SamplingConfig(top_k=2), torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {0, 1}
    assert abs((top2 == 0).float().mean().item() - 0.625) < 0.015


def test_rows_that_finish_leave_the_batch_without_changing_the_others():
    """Greedy continuations in one batch, where half of the rows stop early (the batch is compacted), equal each
    prompt decoded alone."""
    model = tiny_llama()
    prompts = [[2, 5, 6, 7], [2, 9], [3, 4, 11, 12, 13], [6, 7, 8]]
    greedy = SamplingConfig(num_samples=1, max_new_tokens=8, temperature=0)
    free = [sample(model, [p], greedy, [], PAD, CPU, progress=False)[0][0] for p in prompts]
    stops = {free[0][1], free[2][2]}  # two rows stop within 3 tokens
    alone = [sample(model, [p], greedy, sorted(stops), PAD, CPU, progress=False)[0][0] for p in prompts]
    assert len(alone[0]) <= 2 and len(alone[2]) <= 3
    batched = [g[0] for g in sample(model, prompts, greedy, sorted(stops), PAD, CPU, progress=False)]
    assert batched == alone


def test_sampling_under_bf16_autocast_runs_and_is_reproducible():
    """Under autocast a layer's keys and values come out fp32 or bf16 depending on the pass; the static cache
    stores them in one dtype (precision: bf16 on a CPU, auto on CUDA)."""
    model = tiny_llama()
    cfg = SamplingConfig(num_samples=2, max_new_tokens=6)
    runs = [sample(model, PROMPTS, cfg, [EOS], PAD, CPU, torch.bfloat16, generator=torch.Generator().manual_seed(0),
                   progress=False) for _ in range(2)]
    assert runs[0] == runs[1] and [len(g) for g in runs[0]] == [2, 2, 2]


PREFIX = [2, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # a chat template and instruction every prompt starts with


def test_shared_prefix_len_counts_the_leading_tokens_every_prompt_has():
    from ptg.lm.models import MIN_SHARED_PREFIX, pad, shared_prefix_len

    def n(prompts):
        return shared_prefix_len(*pad(prompts, PAD, left=True))

    assert n([PREFIX + [3, 4], PREFIX + [4], PREFIX[:9] + [3] * 5]) == 9
    assert n([PREFIX + [3], PREFIX]) == len(PREFIX) - 1  # each prompt keeps a token of its own
    assert n([PREFIX + [3]]) == 0  # one prompt: nothing to share
    assert n([PREFIX[:MIN_SHARED_PREFIX - 1] + [3, 4], PREFIX[:MIN_SHARED_PREFIX - 1] + [4, 4]]) == 0  # too short


@pytest.mark.parametrize(("prompts", "k"), [
    ([[2, 5, 6, 7, 8, 9, 10, 11], [2, 9, 4]], 3),  # K responses per prompt: each prompt runs once
    ([PREFIX + [3, 4, 14], PREFIX + [15], PREFIX + [16, 17, 18, 19, 20, 21]], 1),  # a 10-token shared prefix
    ([PREFIX + [3, 4, 14], PREFIX + [15], PREFIX + [16, 17, 18, 19, 20, 21]], 2)])  # both
def test_shared_prompts_and_prefixes_give_the_logits_hidden_states_and_gradients_of_whole_sequences(prompts, k):
    """The prompts in a pass of their own whose cache the responses read (each prompt once for its K responses; the
    prefix every prompt starts with once for all, ``prefill``): the logits, hidden states and gradients of one pass
    over the concatenated prompt + response sequences (decoder-only), to fp32 tolerance."""
    from ptg.lm.models import decoder_only_inputs, response_hidden, shares_prompts

    model = tiny_llama()
    responses = [[4, 5, 6], [7, EOS], [8, 9, 10, 11], [12, EOS], [13, 14, 15], [5]][:len(prompts) * k]
    batch = collate(prompts, responses, PAD)
    assert batch.group_size == k and shares_prompts(model, batch)
    t, p = batch.response_ids.shape[1], batch.prompt_ids.shape[1]
    mask = batch.response_mask.bool()
    whole = model(**decoder_only_inputs(batch, k), use_cache=False).logits[:, p - 1:p - 1 + t]
    torch.testing.assert_close(response_logits(model, batch)[mask], whole[mask], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(response_hidden(model.model, batch)[mask],
                               model.model(**decoder_only_inputs(batch, k)).last_hidden_state[:, p:][mask],
                               atol=1e-5, rtol=1e-4)
    grads = []
    for shared in (True, False):
        model.zero_grad()
        logits = response_logits(model, batch) if shared else \
            model(**decoder_only_inputs(batch, k), use_cache=False).logits[:, p - 1:p - 1 + t]
        (logits.log_softmax(-1)[..., 3] * batch.response_mask).sum().backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_sampling_prompts_with_a_shared_prefix_equals_each_prompt_alone():
    """Greedy and seeded sampling of a batch whose prompts share their first 10 tokens (run once, ``prefill``)
    give what each prompt gives alone (no prefix to share)."""
    model = tiny_llama()
    prompts = [PREFIX + [3, 4, 14], PREFIX + [15], PREFIX + [16, 17, 18, 19, 20, 21]]
    greedy = SamplingConfig(num_samples=2, max_new_tokens=6, temperature=0)
    alone = [sample(model, [q], greedy, [EOS], PAD, CPU, progress=False)[0] for q in prompts]
    assert sample(model, prompts, greedy, [EOS], PAD, CPU, progress=False) == alone
    logits = response_logits(model, collate(prompts, [g[0] for g in alone], PAD))
    assert [row[:len(g[0])].argmax(-1).tolist() for row, g in zip(logits, alone, strict=True)] == [g[0] for g in alone]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa(dtype):
    """One query token per row, 4 query heads on 2 key/value heads, a padding mask: the plain-matmul decode attention
    gives SDPA's output (fp32 to 1e-6, bf16 to its resolution), and a greedy decode with it gives the same tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ptg.lm.models import DECODE_ATTENTION, decode_attention, register_decode_attention

    model = tiny_llama().to(dtype)
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in ((3, 4, 1, 8), (3, 2, 7, 8), (3, 2, 7, 8)))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :3] = False
    mask[2, ..., 5:] = False
    ours, ref = (f(module, q, k, v, mask, scaling=module.scaling, dropout=0.0)[0]
                 for f in (decode_attention, sdpa_attention_forward))
    assert ours.shape == ref.shape == (3, 1, 4, 8)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=0)
    if dtype == torch.float32:
        greedy = SamplingConfig(num_samples=2, max_new_tokens=6, temperature=0)
        before = sample(model, PROMPTS, greedy, [EOS], PAD, CPU, progress=False)
        register_decode_attention()
        model.set_attn_implementation(DECODE_ATTENTION)
        assert sample(model, PROMPTS, greedy, [EOS], PAD, CPU, progress=False) == before
