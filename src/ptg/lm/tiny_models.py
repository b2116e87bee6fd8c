"""Tiny stand-ins for the default models, for tests and `make quick`: randomly initialised Llama / T5 models of a
few hundred thousand parameters with a byte-level BPE tokenizer trained offline on a fixed built-in text, written as
plain HF folders by ``ptg.lm.base_models.build_tiny``. ``model.policy: tiny-llama`` (or ``tiny-t5``) selects them.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

TINY_KINDS = ("tiny-llama", "tiny-t5")
TINY_MAX_LENGTH = 1024

# Fixed training text for the tiny tokenizer (byte-level, so any text still encodes and round-trips exactly).
_TINY_TEXT = """\
The quick brown fox jumps over the lazy dog. A summary should be short, faithful and fluent.
Write a short summary of the following article. The article describes a new park that opened in the city centre.
The restaurant serves Italian food at moderate prices; it is near the river and family friendly.
Customers rated the coffee shop highly, although it is expensive and not suitable for children.
Please answer the question: what is the capital of France? The capital of France is Paris.
Translate the sentence into German. The weather is nice today, so we will go for a walk in the forest.
The model generates several responses for every prompt, and a reward model ranks them by preference.
Token-level guidance turns a sequence-level preference into a reward for every generated token.
Students learned about history, science, mathematics, geography, music, art, language and literature.
On Monday the committee met to discuss the budget; on Tuesday it voted, and on Wednesday it published the report.
She said that the results were surprising, because nobody expected the prices to rise so quickly this year.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 1000 2023 3.14 -7 +42 50% $5 #1 (a) [b] {c} <d> "e" 'f'.
Punctuation: , . ; : ! ? - -- ... / \\ | _ = * & ^ ~ ` @
name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], customer rating[3 out of 5], area[riverside]
User: Can you help me write an email to my landlord about the broken heating? Assistant: Of course, here is a draft.
Dear Sir or Madam, I am writing to inform you that the heating in my flat has not worked for a week.
Thank you for your help. Best regards, and have a wonderful day! Yes, no, maybe, always, never, sometimes.
def main(argv: list[str]) -> int: return 0  # code also appears in prompts
"""


def _tiny_corpus() -> list[str]:
    lines = [line for line in _TINY_TEXT.splitlines() if line.strip()]
    words = sorted({w.strip(".,;:!?()[]{}\"'") for line in lines for w in line.split()} - {""})
    # Sentences, lower-cased variants and word pairs give the trainer enough material for ~2k tokens.
    pairs = [f"{a} {b}" for a, b in zip(words, reversed(words), strict=True)]
    return lines + [line.lower() for line in lines] + pairs + [" ".join(words)]


def build_tiny_tokenizer(kind: str = "tiny-llama", vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """An offline byte-level BPE tokenizer, trained deterministically on a fixed built-in text.

    Special tokens: ``<pad>`` 0, ``</s>`` 1, ``<s>`` 2, ``<|im_start|>`` 3, ``<|im_end|>`` 4. ``tiny-llama`` mirrors
    SmolLM2 (BOS ``<|im_start|>``, EOS ``<|im_end|>``, a ChatML chat template, no tokens added to plain text) but
    keeps a separate pad token; ``tiny-t5`` mirrors T5 (EOS ``</s>`` appended to encoded text, no chat template).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")
    specials = ["<pad>", "</s>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    common = {"pad_token": "<pad>", "clean_up_tokenization_spaces": False, "model_max_length": TINY_MAX_LENGTH}
    if kind == "tiny-t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", tok.token_to_id("</s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token=None, unk_token=None,
                                       **common)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token=None, **common)
    fast.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return fast


def tiny_model(kind: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny model (``tiny-llama`` or ``tiny-t5``) over ``tokenizer``'s vocabulary and special
    tokens (it must have a pad token). Deterministic given ``seed``; the global RNG is left as it was."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")
    vocab = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel
        if kind == "tiny-llama":
            config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_MAX_LENGTH,
                                 tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
            model = LlamaForCausalLM(config)
        else:
            config = T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                              num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                              tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
            model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_model_config(model.config)
    return model.eval()
