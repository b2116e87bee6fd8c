"""Sequence-level preferences from a local reward model: one score per (prompt, response) for ``rank.metric:
reward_model``, so PTG can distil an existing sequence-level reward model into token-level guidance.

The reward model is any Hugging Face sequence-classification checkpoint (``AutoModelForSequenceClassification``:
a 1-label reward head, or a classifier whose "good" class is the score). It reads the prompt as one user turn and
the response as one assistant turn through its own tokenizer's chat template (the template a reward model was
trained with), or ``prompt + "\\n" + response`` when it has none, or the response alone. Called by
``stages/rank.py``; ``reward_scores`` does no file access.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from ptg.lm.models import load_tokenizer, pad, require_safetensors
from ptg.lm.precision import autocast

log = logging.getLogger(__name__)


def load_reward_model(path: str | Path, device: torch.device | str = "cpu"
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The reward model at ``path`` (a local folder, or a hub id when online) in fp32 and eval mode, from safetensors
    only, with its tokenizer. A tokenizer without a pad token pads with EOS, and the model's config gets the
    tokenizer's pad id when it has none: the model pools the last token that is not padding."""
    require_safetensors(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise
        raise OSError(f"cannot load the reward model {str(path)!r}: no such local folder, and the hub is "
                      f"unreachable or has no such model ({e})") from e
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    log.info("reward model %s: %s with %d label(s)", path, type(model).__name__, model.config.num_labels)
    return model.to(device).eval(), tokenizer


def encode_reward_inputs(tokenizer: PreTrainedTokenizerBase, prompts: list[str] | None,
                         responses: list[str]) -> list[list[int]]:
    """Token ids of what the reward model reads: each response alone (``prompts`` None), or its prompt as a user turn
    and the response as an assistant turn through the tokenizer's chat template, else ``prompt + "\\n" +
    response`` with the tokenizer's special tokens."""
    if prompts is None:
        return [list(ids) for ids in tokenizer(responses, verbose=False)["input_ids"]]
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    if getattr(tokenizer, "chat_template", None):
        chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                 for p, r in zip(prompts, responses, strict=True)]
        return [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in chats]
    texts = [f"{p}\n{r}" for p, r in zip(prompts, responses, strict=True)]
    return [list(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]


def reward_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str] | None,
                  responses: list[str], batch_size: int, label: int, direction: str, device: torch.device,
                  dtype: torch.dtype, progress: bool = True) -> list[float]:
    """One score per response, in input order: logit column ``label`` of the reward model (``model`` on ``device``),
    negated when ``direction`` is ``lower`` so that a larger score is always better.

    Inputs run longest first (so that an out-of-memory error comes at once), ``batch_size`` at a time, right-padded
    with the model's pad id and masked; sorting by length keeps the padding small. ``prompts`` None scores the
    responses alone (``encode_reward_inputs``).
    """
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be higher or lower; got {direction!r}")
    n_labels = model.config.num_labels
    if not 0 <= label < n_labels:
        raise ValueError(f"label {label} is out of range: the reward model has {n_labels} label(s)")
    pad_id = model.config.pad_token_id
    if pad_id is None:
        raise ValueError("the reward model's config has no pad_token_id (load it with load_reward_model)")
    seqs = encode_reward_inputs(tokenizer, prompts, responses)
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
        raise ValueError(f"inputs {empty[:8]} encode to no tokens (empty responses scored alone): score them with "
                         "their prompts")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(s) for s in seqs), default=0)
    if isinstance(limit, int) and longest > limit:
        raise ValueError(f"an input has {longest} tokens, more than the reward model's {limit} positions: shorten "
                         "the prompts (data.max_input_chars) or score the response alone")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    sign = -1.0 if direction == "lower" else 1.0
    scores = [0.0] * len(seqs)
    bar = tqdm(total=len(seqs), desc="reward_model", disable=not progress, leave=False)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad([seqs[i] for i in idx], pad_id, left=False)
            with autocast(device, dtype):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for i, value in zip(idx, logits[:, label].float().cpu().tolist(), strict=True):
                scores[i] = sign * value
            bar.update(len(idx))
    bar.close()
    return scores
