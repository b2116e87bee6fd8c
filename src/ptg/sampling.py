"""K samples per input from a seq2seq or decoder-only LM, with explicit settings and a seeded generator.

Settings are all explicit (the reference silently sampled with HF's default top-k 50, spec pitfall 7.7):
temperature (0 means greedy), top-k (0 = off), top-p (1 = off) and the number of new tokens. The prompt is
encoded (seq2seq) or prefilled (decoder-only) once per input and its cache expanded to the K continuations,
never recomputed K times. Randomness comes only from the ``torch.Generator`` passed in, so a seeded call is
reproducible and leaves the global RNG alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ptg.models import _pad, decoder_start_id, is_seq2seq
from ptg.precision import autocast


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = field(default=1, metadata={"help": "K: continuations per input"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per continuation at most (EOS included)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 decodes greedily"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 keeps all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 keeps all"})

    def __post_init__(self) -> None:
        for name, ok in (("num_samples", self.num_samples >= 1), ("max_new_tokens", self.max_new_tokens >= 1),
                         ("temperature", self.temperature >= 0), ("top_k", self.top_k >= 0),
                         ("top_p", 0 < self.top_p <= 1)):
            if not ok:
                raise ValueError(f"SamplingConfig.{name} is out of range: {getattr(self, name)!r}")


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
    probs = filter_logits(logits, cfg).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _expand_cache(cache: object, k: int) -> None:
    if k > 1:
        cache.batch_repeat_interleave(k)  # type: ignore[attr-defined]


@torch.no_grad()
def _sample_chunk(model: PreTrainedModel, prompts: Sequence[list[int]], cfg: SamplingConfig, eos: set[int],
                  pad_id: int, device: torch.device, generator: torch.Generator | None) -> list[list[int]]:
    k = cfg.num_samples
    ids, mask = (t.to(device) for t in _pad(list(prompts), pad_id, left=True))
    if is_seq2seq(model):
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        enc_kwargs = {"encoder_outputs": (enc.repeat_interleave(k, 0),), "attention_mask": mask.repeat_interleave(k, 0)}
        cur = torch.full((len(prompts) * k,), decoder_start_id(model), dtype=torch.long, device=device)
        out = model(decoder_input_ids=cur[:, None], use_cache=True, **enc_kwargs)
        step_kwargs = lambda tok, cache: {"decoder_input_ids": tok[:, None], "past_key_values": cache,  # noqa: E731
                                          **enc_kwargs}
    else:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        _expand_cache(out.past_key_values, k)
        state = {"mask": mask.repeat_interleave(k, 0), "pos": pos[:, -1:].repeat_interleave(k, 0)}

        def step_kwargs(tok: torch.Tensor, cache: object) -> dict[str, object]:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            state["pos"] = state["pos"] + 1
            return {"input_ids": tok[:, None], "attention_mask": state["mask"], "position_ids": state["pos"],
                    "past_key_values": cache}
    logits = out.logits[:, -1].repeat_interleave(k, 0) if not is_seq2seq(model) else out.logits[:, -1]
    cache = out.past_key_values
    n = logits.shape[0]
    eos_t = torch.tensor(sorted(eos), device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    for step in range(cfg.max_new_tokens):
        tok = _next_tokens(logits, cfg, generator).masked_fill(done, pad_id)
        tokens.append(tok)
        done |= torch.isin(tok, eos_t)
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        out = model(**step_kwargs(tok, cache), use_cache=True)
        logits, cache = out.logits[:, -1], out.past_key_values
    seqs = torch.stack(tokens, dim=1).tolist()
    result = []
    for seq in seqs:
        end = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
        result.append(seq[:end])
    return result


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
    out: list[list[list[int]]] = []
    bar = tqdm(total=len(prompts), desc="sample", disable=not progress, leave=False)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        with autocast(device, dtype):
            flat = _sample_chunk(model, chunk, cfg, eos, pad_id, device, generator)
        k = cfg.num_samples
        out.extend(flat[j * k:(j + 1) * k] for j in range(len(chunk)))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out
