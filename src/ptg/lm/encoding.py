"""Token ids for what the models read and write: prompts (the chat template for decoder-only models, cut from the end
of the text when too long), reference responses ended as the model ends its own turns, and the ids that end one.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptg.lm.models import is_seq2seq

log = logging.getLogger(__name__)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a response: the generation config's EOS ids and the tokenizer's, sorted."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in (gen_eos, tokenizer.eos_token_id):
        if isinstance(x, int):
            ids.add(x)
        elif x:
            ids.update(int(i) for i in x)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return sorted(ids)


TURN_PROBE = "Probe reply 7 to find the turn end"


def template_turn_end(tokenizer: PreTrainedTokenizerBase, candidates: Collection[int]) -> int | None:
    """The first of ``candidates`` that the tokenizer's chat template puts after an assistant turn's content (e.g.
    ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``); None without a chat template, or
    when it puts none of them there or cannot render an assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": TURN_PROBE}],
                                                 tokenize=True, return_dict=False))
    except Exception as e:  # a template that refuses these roles (jinja raises its own errors)
        log.warning("the chat template cannot render a user and an assistant turn (%s): no turn end found", e)
        return None
    # The assistant content ends with the first token whose prefix decodes to text holding the whole probe.
    end = next((i for i in range(1, len(ids) + 1) if TURN_PROBE in tokenizer.decode(ids[:i])), len(ids))
    return next((int(t) for t in ids[end:] if t in candidates), None)


def turn_end_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the model ends its own response with, to end reference responses the same way.

    Seq2seq: the tokenizer's EOS. Decoder-only with a chat template: the first of ``eos_ids`` that the template
    puts after an assistant turn's content (e.g. ChatML's ``<|im_end|>``, which need be neither the smallest EOS id
    nor the tokenizer's EOS). Otherwise, or when the template puts none there: the tokenizer's EOS when it is one
    of ``eos_ids``, else the generation config's first EOS id.
    """
    if is_seq2seq(model):
        if tokenizer.eos_token_id is None:
            raise ValueError("a seq2seq model's tokenizer must define an EOS token")
        return int(tokenizer.eos_token_id)
    stops = eos_ids(model, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        found = template_turn_end(tokenizer, stops)
        if found is not None:
            return found
        log.warning("the chat template puts none of the EOS ids %s after an assistant turn: references end with "
                    "the tokenizer's (or generation config's) EOS", stops)
    if tokenizer.eos_token_id in stops:
        return int(tokenizer.eos_token_id)
    gen_eos = model.generation_config.eos_token_id
    return int(gen_eos if isinstance(gen_eos, int) else gen_eos[0])


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int,
                   seq2seq: bool) -> list[list[int]]:
    """Token ids of each prompt, at most ``max_tokens`` of them.

    Decoder-only models with a chat template get it (one user turn + generation prompt); other prompts get the
    tokenizer's special tokens (e.g. T5's trailing ``</s>``, a BOS). An over-long prompt keeps its beginning (the
    instruction and the start of the content): tokens are dropped from the *end* of the text, while the template
    and special tokens around it stay intact, whatever the tokenizer's ``truncation_side``. Prompts that fit are
    encoded as they are. Raises ValueError when even an empty text does not fit in ``max_tokens``.
    """
    if not seq2seq and getattr(tokenizer, "chat_template", None):
        def encode(text: str) -> list[int]:
            return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=True, return_dict=False))
    else:
        def encode(text: str) -> list[int]:
            return list(tokenizer(text, verbose=False)["input_ids"])

    def prefix(text: str, content: list[int], keep: int) -> str:
        """The text of content[:keep], less a character cut in half (a trailing U+FFFD that ``text`` lacks)."""
        if keep <= 0:
            return ""
        head = tokenizer.decode(content[:keep], clean_up_tokenization_spaces=False)
        return head if text.startswith(head) else head.rstrip("\ufffd")

    out = []
    for text in texts:
        ids = encode(text)
        if len(ids) > max_tokens:
            wrapper = len(encode(""))
            if wrapper > max_tokens:
                raise ValueError(f"max_tokens={max_tokens} is too small for any prompt: the chat template / special "
                                 f"tokens alone take {wrapper} tokens")
            content = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            keep = len(content) - (len(ids) - max_tokens)
            while len(ids) > max_tokens:
                # Re-encoding a decoded prefix can change the count: shrink until it fits (keep <= 0 is the empty
                # text, which fits).
                ids = encode(prefix(text, content, keep))
                keep -= max(1, len(ids) - max_tokens)
        out.append(ids)
    return out


def encode_responses(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int,
                     eos_id: int) -> list[list[int]]:
    """Token ids of reference responses, ending with ``eos_id`` (cut to ``max_tokens`` including EOS)."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(ids[: max_tokens - 1]) + [eos_id] for ids in enc]
