"""K samples per input from a seq2seq or decoder-only LM, with explicit settings and a seeded generator.

Settings are all explicit (the reference silently sampled with HF's default top-k 50, spec pitfall 7.7):
temperature (0 means greedy), top-k (0 = off), top-p (1 = off) and the number of new tokens. The prompt is
encoded (seq2seq) or prefilled (decoder-only) once per input and its cache expanded to the K continuations,
never recomputed K times. Randomness comes only from the ``torch.Generator`` passed in, so a seeded call is
reproducible and leaves the global RNG alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, StaticCache

from ptg.config import SamplingConfig
from ptg.lm.models import decoder_start_id, is_seq2seq, pad, prefill
from ptg.lm.precision import autocast


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p applied to (N, V) logits; removed tokens get -inf. Returns float32."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the most likely token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, idx, drop_sorted), float("-inf"))
    return logits


def _next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature == 0:
        return logits.argmax(-1)
    cdf = filter_logits(logits, cfg).softmax(-1).cumsum(-1)
    # One draw per row by inverse CDF: one uniform per row from the seeded generator (on the CPU, so a seed gives
    # the same draws on every device) instead of torch.multinomial's exponential race over the whole vocabulary.
    # A token of probability 0 has cdf equal to its predecessor's, so it can never be the first index above u.
    u = torch.rand((cdf.shape[0], 1), generator=generator).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


@torch.no_grad()
def _sample_chunk(model: PreTrainedModel, prompts: Sequence[list[int]], cfg: SamplingConfig, eos: set[int],
                  pad_id: int, device: torch.device, generator: torch.Generator | None) -> list[list[int]]:
    """K continuations of each prompt, input-major.

    The prompt is prefilled once (the prefix every prompt shares once for all, ``ptg.lm.models.prefill``) and its
    cache repeated K times. Decoder-only models decode into a static cache
    (written in place, never concatenated; the concatenation cost more than the matmuls on a CPU). Rows that emit
    EOS stop writing output at once; they leave the batch (and the cache) when half of the rows are done, so
    little compute goes to finished rows and the cache is copied only a few times. One host sync per step."""
    k = cfg.num_samples
    ids, mask = (t.to(device) for t in pad(list(prompts), pad_id, left=True))
    seq2seq = is_seq2seq(model)
    if seq2seq:
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state.repeat_interleave(k, 0)
        enc_mask = mask.repeat_interleave(k, 0)
        start = torch.full((enc.shape[0], 1), decoder_start_id(model), dtype=torch.long, device=device)
        out = model(encoder_outputs=(enc,), attention_mask=enc_mask, decoder_input_ids=start, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    else:
        prompt_len = ids.shape[1]
        out, cached = prefill(model, ids, mask, logits_to_keep=1)  # the prefix all prompts share runs once
        cache = _static_cache(model, prompt_len + cfg.max_new_tokens,
                              [(layer.keys.repeat_interleave(k, 0), layer.values.repeat_interleave(k, 0))
                               for layer in out.past_key_values.layers])
        logits = out.logits[:, -1].repeat_interleave(k, 0)
        attn = torch.zeros((ids.shape[0] * k, prompt_len + cfg.max_new_tokens), dtype=mask.dtype, device=device)
        attn[:, :prompt_len] = cached.repeat_interleave(k, 0)
        last_pos = (mask.sum(-1, keepdim=True) - 1).repeat_interleave(k, 0)
    rows = list(range(logits.shape[0]))  # the output row of each batch row
    done = [False] * len(rows)
    seqs: list[list[int]] = [[] for _ in rows]
    for step in range(cfg.max_new_tokens):
        tok = _next_tokens(logits, cfg, generator)
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                seqs[rows[i]].append(t)
                done[i] = t in eos
        if step == cfg.max_new_tokens - 1 or all(done):
            break
        if 2 * sum(done) >= len(done):  # compact: only the rows still decoding stay
            keep_list = [i for i, d in enumerate(done) if not d]
            keep = torch.tensor(keep_list, device=device)
            rows, done, tok = [rows[i] for i in keep_list], [False] * len(keep_list), tok[keep]
            if seq2seq:
                cache.batch_select_indices(keep)
                enc, enc_mask = enc[keep], enc_mask[keep]
            else:
                for layer in cache.layers:  # what DynamicLayer.batch_select_indices does, for a static layer
                    layer.keys, layer.values, layer.batch_size = layer.keys[keep], layer.values[keep], len(keep_list)
                attn, last_pos = attn[keep], last_pos[keep]
        if seq2seq:
            out = model(encoder_outputs=(enc,), attention_mask=enc_mask, decoder_input_ids=tok[:, None],
                        past_key_values=cache, use_cache=True)
        else:
            attn[:, prompt_len + step] = 1
            last_pos = last_pos + 1
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=last_pos, past_key_values=cache,
                        use_cache=True)
        logits, cache = out.logits[:, -1], out.past_key_values
    return seqs


class _StaticCache(StaticCache):
    """transformers' StaticCache, storing what it is given in the dtype it was first filled with: under bf16
    autocast, a layer's keys and values are fp32 or bf16 depending on the pass (prefill or decode)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        dtype = layer.keys.dtype if layer.is_initialized else key_states.dtype
        return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)


def _static_cache(model: PreTrainedModel, length: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> StaticCache:
    """A static cache of ``length`` positions holding each layer's (keys, values) in its first positions."""
    cache = _StaticCache(config=model.config, max_cache_len=length)
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    return cache


def sample(model: PreTrainedModel, prompts: Sequence[list[int]], cfg: SamplingConfig, eos_ids: Sequence[int],
           pad_id: int, device: torch.device, dtype: torch.dtype = torch.float32, batch_size: int = 8,
           generator: torch.Generator | None = None, progress: bool = True) -> list[list[list[int]]]:
    """For each prompt (token ids), ``cfg.num_samples`` continuations (token ids, ending at the first EOS when
    one was produced). Returns a list (per prompt) of K id lists. The model is put in eval mode (no dropout)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    eos = set(eos_ids)
    k = cfg.num_samples
    out: list[list[list[int]]] = [[] for _ in prompts]
    # Batches of prompts of similar length (little padding to prefill); results go back in the input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(prompts), desc="sample", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        with autocast(device, dtype):
            flat = _sample_chunk(model, [prompts[i] for i in chunk], cfg, eos, pad_id, device, generator)
        for j, i in enumerate(chunk):
            out[i] = flat[j * k:(j + 1) * k]
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out
