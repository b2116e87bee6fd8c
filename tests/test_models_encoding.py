"""Prompt and reference encoding (ptg.lm.encoding: encode_prompts, encode_responses, eos_ids, turn_end_id) on the
offline tiny tokenizers: ChatML (tiny-llama), plain with a BOS, and T5-like (trailing ``</s>``)."""

import copy

import pandas as pd
import pytest
from tokenizers import processors
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)

from ptg.config import ModelParams
from ptg.lm import encoding
from ptg.lm.tiny_models import build_tiny_tokenizer
from ptg.pipeline import encode_targets_of

INSTRUCTION = "Summarize what this Python function does in one sentence.\n\n"
DEF_LINE = "def add_numbers(first, second):\n"
BODY = "".join(f"    total_{i} = first + second * {i}  # step {i} of the sum\n" for i in range(40))
BODY += "    return total_0\n"
PROMPT = INSTRUCTION + DEF_LINE + BODY
SHORT = INSTRUCTION + "def one():\n    return 1\n"
USER_HEADER = "<|im_start|>user\n"
SYSTEM_HEADER = "<|im_start|>system\nYou are a helpful AI assistant named Tiny.<|im_end|>\n"
TURN_TAIL = "<|im_end|>\n<|im_start|>assistant\n"  # end of the user turn + generation prompt
# SmolLM2-style ChatML: a default system turn first.
SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '" + SYSTEM_HEADER
    + "' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ids in build_tiny_tokenizer: <pad> 0, </s> 1, <s> 2, <|im_start|> 3, <|im_end|> 4
PAD, SLASH_S, BOS, IM_START, IM_END = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerBase:
    tok = build_tiny_tokenizer("tiny-llama")
    assert "<|im_start|>" in tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") == IM_END
    return tok


@pytest.fixture(scope="module")
def t5_tok() -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer("tiny-t5")


def variant(tok: PreTrainedTokenizerBase, **attrs) -> PreTrainedTokenizerBase:
    tok = copy.deepcopy(tok)
    for k, v in attrs.items():
        setattr(tok, k, v)
    return tok


def bos_tok(chat_tok: PreTrainedTokenizerBase, truncation_side: str) -> PreTrainedTokenizerBase:
    """A decoder-only tokenizer without chat template that prepends a BOS ``<s>`` to every text."""
    tok = variant(chat_tok, chat_template=None, truncation_side=truncation_side)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    assert tok("hi")["input_ids"][0] == BOS
    return tok


def tiny_causal(tok: PreTrainedTokenizerBase, gen_eos: int | list[int] | None) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=gen_eos, pad_token_id=PAD)
    return model


def tiny_seq2seq(tok: PreTrainedTokenizerBase, gen_eos: int | list[int]) -> T5ForConditionalGeneration:
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=SLASH_S)
    model = T5ForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(eos_token_id=gen_eos, pad_token_id=PAD, decoder_start_token_id=PAD)
    return model


def chat_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


def assert_keeps_beginning(content: str, text: str = PROMPT) -> None:
    """``content`` is a cut of ``text`` at its end that still holds the instruction and the ``def`` line."""
    assert text.startswith(content), f"not a prefix of the prompt: {content[:80]!r}...{content[-40:]!r}"
    assert content.startswith(INSTRUCTION.rstrip() + "\n\ndef ")
    assert len(content) < len(text)


# ------------------------------------------------------------------------------------------ encode_prompts


@pytest.mark.parametrize("room", [30, 48, 150])
@pytest.mark.parametrize("header, template", [(USER_HEADER, None), (SYSTEM_HEADER + USER_HEADER, SYSTEM_TEMPLATE)],
                         ids=["user-only", "system-turn"])
def test_chat_prompt_cut_at_the_end_keeps_instruction_def_and_template(chat_tok, room, header, template):
    """``room``: content tokens left beside the template (the instruction alone takes 24, with the def line 43)."""
    tok = chat_tok if template is None else variant(chat_tok, chat_template=template)
    max_tokens = len(chat_ids(tok, "")) + room
    assert len(chat_ids(tok, PROMPT)) > max_tokens
    (ids,) = encoding.encode_prompts(tok, [PROMPT], max_tokens, seq2seq=False)
    assert max_tokens - 2 <= len(ids) <= max_tokens  # cut to fit, not (much) further
    text = tok.decode(ids)
    assert text.startswith(header + "Summarize what this Python function does")
    assert text.endswith(TURN_TAIL)
    assert text.count("<|im_start|>") == header.count("<|im_start|>") + 1
    content = text[len(header): -len(TURN_TAIL)]
    assert_keeps_beginning(content)
    if room >= 48:
        assert DEF_LINE in content
    # The result is exactly the template applied to the kept text: nothing cut out of the template's ids.
    assert ids == chat_ids(tok, content)


def test_chat_prompt_shrinks_again_when_the_template_grows_as_the_content_is_cut(chat_tok):
    """The template's own tokens may depend on the content (here: a note on cut prompts), so one cut can be short."""
    note = "(The function below is cut short; summarize the part shown.) "
    cut_note = f"('{note}' if message['content'] | length < {len(PROMPT)} else '')"
    template = chat_tok.chat_template.replace("message['content']", f"({cut_note} + message['content'])")
    tok = variant(chat_tok, chat_template=template)
    assert tok.decode(chat_ids(tok, PROMPT)).startswith(USER_HEADER + INSTRUCTION)
    header = USER_HEADER + note
    for room in (30, 48, 90):
        max_tokens = len(chat_ids(tok, "")) + room
        (ids,) = encoding.encode_prompts(tok, [PROMPT], max_tokens, seq2seq=False)
        assert max_tokens - 2 <= len(ids) <= max_tokens
        text = tok.decode(ids)
        assert text.startswith(header) and text.endswith(TURN_TAIL)
        assert_keeps_beginning(text[len(header): -len(TURN_TAIL)])


def test_chat_prompt_cut_inside_multibyte_characters_never_leaves_a_broken_character(chat_tok):
    text = INSTRUCTION + "def grüße():\n    return '" + "漢字かな" * 20 + "'\n"
    full = len(chat_ids(chat_tok, text))
    for max_tokens in range(full - 30, full):
        (ids,) = encoding.encode_prompts(chat_tok, [text], max_tokens, seq2seq=False)
        decoded = chat_tok.decode(ids)
        assert len(ids) <= max_tokens and decoded.endswith(TURN_TAIL)
        content = decoded[len(USER_HEADER): -len(TURN_TAIL)]
        assert "\ufffd" not in content
        assert_keeps_beginning(content, text)


def test_chat_prompts_that_fit_are_the_template_applied_unchanged(chat_tok):
    full = chat_ids(chat_tok, PROMPT)
    assert encoding.encode_prompts(chat_tok, [SHORT, PROMPT], len(full), seq2seq=False) == [
        chat_ids(chat_tok, SHORT), full]


def test_chat_prompt_one_token_too_long_loses_its_last_token_only(chat_tok):
    full = chat_ids(chat_tok, PROMPT)
    (ids,) = encoding.encode_prompts(chat_tok, [PROMPT], len(full) - 1, seq2seq=False)
    content = chat_tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert chat_tok.decode(ids) == USER_HEADER + chat_tok.decode(content[:-1]) + TURN_TAIL
    assert len(ids) == len(full) - 1


def test_chat_prompt_too_small_for_the_template_raises(chat_tok):
    empty = len(chat_ids(chat_tok, ""))
    with pytest.raises(ValueError, match=f"max_tokens={empty - 1}"):
        encoding.encode_prompts(chat_tok, [PROMPT], empty - 1, seq2seq=False)
    # An empty text fits exactly: the cut may leave nothing of the content, but the template stays whole.
    (ids,) = encoding.encode_prompts(chat_tok, [PROMPT], empty, seq2seq=False)
    assert chat_tok.decode(ids) == USER_HEADER + TURN_TAIL


@pytest.mark.parametrize("truncation_side", ["right", "left"])
def test_plain_prompt_keeps_bos_and_beginning(chat_tok, truncation_side):
    tok = bos_tok(chat_tok, truncation_side)
    full = tok(PROMPT)["input_ids"]
    (ids,) = encoding.encode_prompts(tok, [PROMPT], 50, seq2seq=False)
    assert len(ids) == 50 < len(full)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert_keeps_beginning(tok.decode(ids[1:]))
    assert encoding.encode_prompts(tok, [SHORT, PROMPT], len(full), seq2seq=False) == [tok(SHORT)["input_ids"], full]


@pytest.mark.parametrize("truncation_side", ["right", "left"])
def test_seq2seq_prompt_keeps_beginning_and_trailing_eos(t5_tok, truncation_side):
    tok = variant(t5_tok, truncation_side=truncation_side)
    full = tok(PROMPT)["input_ids"]
    (ids,) = encoding.encode_prompts(tok, [PROMPT], 50, seq2seq=True)
    assert len(ids) == 50 < len(full)
    assert ids[-1] == SLASH_S and ids.count(SLASH_S) == 1
    assert_keeps_beginning(tok.decode(ids[:-1]))
    assert encoding.encode_prompts(tok, [SHORT, PROMPT], len(full), seq2seq=True) == [tok(SHORT)["input_ids"], full]


def test_seq2seq_prompts_ignore_a_chat_template(t5_tok, chat_tok):
    tok = variant(t5_tok, chat_template=chat_tok.chat_template)
    assert encoding.encode_prompts(tok, [SHORT], 512, seq2seq=True) == [t5_tok(SHORT)["input_ids"]]


# ----------------------------------------------------------------------------------------- encode_responses


def test_responses_end_with_the_given_eos_and_are_cut_including_it(t5_tok):
    short, long = "Adds two numbers.", "Adds two numbers and returns the total of every step of the sum. " * 5
    out = encoding.encode_responses(t5_tok, [short, long], 12, eos_id=IM_END)
    body = t5_tok([short, long], add_special_tokens=False)["input_ids"]
    assert out[0] == body[0] + [IM_END]  # no tokenizer EOS (T5's </s>) added before it
    assert SLASH_S not in out[0] and SLASH_S not in out[1]
    assert len(out[1]) == 12 and out[1] == body[1][:11] + [IM_END]
    assert t5_tok.decode(out[1][:-1]) == long[: len(t5_tok.decode(out[1][:-1]))]


# ---------------------------------------------------------------------------------------------------- eos_ids


@pytest.mark.parametrize("gen_eos, tok_eos, expected", [
    ([5, 0, IM_END], "<|im_end|>", [0, IM_END, 5]),
    (7, "<|im_end|>", [IM_END, 7]),
    (None, "<|im_end|>", [IM_END]),
    ([9, 2, 9], None, [2, 9]),
])
def test_eos_ids_union_generation_config_and_tokenizer(chat_tok, gen_eos, tok_eos, expected):
    tok = variant(chat_tok, eos_token=tok_eos)
    assert encoding.eos_ids(tiny_causal(tok, gen_eos), tok) == expected


def test_eos_ids_raise_without_any_eos(chat_tok):
    tok = variant(chat_tok, eos_token=None)
    with pytest.raises(ValueError, match="EOS"):
        encoding.eos_ids(tiny_causal(tok, None), tok)


# ------------------------------------------------------------------------------------------------ turn_end_id


@pytest.mark.parametrize("gen_eos", [[0, 5, IM_END], [IM_END, 0, 5], [5, IM_END, 0]])
def test_turn_end_is_the_chat_turn_terminator_not_the_smallest_eos(chat_tok, gen_eos):
    model = tiny_causal(chat_tok, gen_eos)
    assert encoding.eos_ids(model, chat_tok)[0] == 0
    assert encoding.turn_end_id(model, chat_tok) == IM_END


@pytest.mark.parametrize("template", [None, SYSTEM_TEMPLATE])
def test_turn_end_comes_from_the_template_when_the_tokenizer_eos_differs(chat_tok, template):
    """A chat model whose tokenizer EOS is a document end (``</s>``) still ends assistant turns with <|im_end|>."""
    tok = variant(chat_tok, eos_token="</s>", **({"chat_template": template} if template else {}))
    assert encoding.turn_end_id(tiny_causal(tok, [IM_END, SLASH_S]), tok) == IM_END


def test_turn_end_falls_back_to_the_tokenizer_eos_then_the_generation_config(chat_tok):
    plain = variant(chat_tok, chat_template=None)
    assert encoding.turn_end_id(tiny_causal(plain, [0, 5, IM_END]), plain) == IM_END
    no_eos = variant(plain, eos_token=None)
    assert encoding.turn_end_id(tiny_causal(no_eos, [5, 2]), no_eos) == 5
    # A template whose turn terminator is no EOS id: the tokenizer's EOS.
    other = variant(chat_tok, eos_token="</s>")
    assert encoding.turn_end_id(tiny_causal(other, [7, SLASH_S]), other) == SLASH_S


def test_turn_end_of_seq2seq_is_the_tokenizer_eos(t5_tok):
    assert encoding.turn_end_id(tiny_seq2seq(t5_tok, [0, SLASH_S]), t5_tok) == SLASH_S


def test_references_end_with_the_turn_end_token(chat_tok, t5_tok):
    frame = pd.DataFrame({"target": ["Adds two numbers.", "Returns the sum of its two arguments, step by step. " * 4]})
    mp = ModelParams(max_target_tokens=20)
    for tok, model, end in [(chat_tok, tiny_causal(chat_tok, [0, 5, IM_END]), IM_END),
                            (t5_tok, tiny_seq2seq(t5_tok, [0, SLASH_S]), SLASH_S)]:
        refs = encode_targets_of(tok, model, frame, mp)
        assert [r[-1] for r in refs] == [end, end]
        assert len(refs[1]) == 20
        assert tok.decode(refs[0][:-1]) == "Adds two numbers."


def test_pickle_checkpoints_are_refused_with_the_folder_and_file_named(tmp_path):
    """Only safetensors weights load: a folder holding only a pickle checkpoint (which can run code when loaded) is
    refused before transformers reads it, for the LM and for a guidance backbone."""
    import torch
    from conftest import tiny_llama

    from ptg.guidance.model import Guidance
    from ptg.lm.models import load_lm

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only safetensors weights are loaded.*pytorch_model\.bin"):
        load_lm(tmp_path)
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        Guidance.from_backbone(tmp_path)
    model.save_pretrained(tmp_path / "ok")
    assert load_lm(tmp_path / "ok").config.vocab_size == model.config.vocab_size


def test_no_code_path_runs_untrusted_code():
    """What ptg's own code never does, checked on its source: trust_remote_code, torch.load / pickle loading of
    weights, eval / exec of configuration strings, yaml.load without the safe loader; every module, subpackages
    included."""
    import re

    from conftest import REPO

    forbidden = re.compile(r"trust_remote_code\s*=\s*True|torch\.load\(|pickle\.loads?\(|(?<![\w.])eval\(|"
                           r"(?<![\w.])exec\(|yaml\.load\((?![^)]*SafeLoader)|yaml\.unsafe_load|weights_only\s*=\s*False")
    sources = [*REPO.glob("src/ptg/**/*.py"), *REPO.glob("stages/*.py"), *REPO.glob("flows/*.py")]
    assert len(sources) > 20
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in sources
            for i, line in enumerate(p.read_text().splitlines(), 1) if forbidden.search(line)]
    assert hits == []
    assert not forbidden.search('yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))')
    assert forbidden.search("yaml.load(text)") and forbidden.search("yaml.load(text, Loader=yaml.Loader)")


def test_a_truncated_safetensors_file_is_named_before_any_loader_reads_it(tmp_path):
    from conftest import tiny_llama

    from ptg.guidance.model import Guidance
    from ptg.lm.models import load_lm

    tiny_llama().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for load in (load_lm, Guidance.from_backbone):
        with pytest.raises(ValueError, match=r"model\.safetensors: damaged weights .*dvc checkout --force"):
            load(tmp_path)


# A chat template of another family: turns end with a special token of their own (here </s>, as Phi-3's <|end|>),
# which is not the tokenizer's EOS.
OTHER_FAMILY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '</s>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_base_model_stops_at_its_templates_turn_end_whatever_the_family(chat_tok):
    """The generation config a base model is saved with (``base_models.finish_generation_config``) stops at the
    token its chat template ends an assistant turn with, found by rendering one (``encoding.template_turn_end``),
    not by a list of known names; and references end with that same token (``turn_end_id``)."""
    from ptg.lm.base_models import finish_generation_config

    tok = variant(chat_tok, chat_template=OTHER_FAMILY_TEMPLATE)
    assert tok.eos_token_id == IM_END
    model = tiny_causal(tok, None)
    finish_generation_config(model, tok)
    assert model.generation_config.eos_token_id == [IM_END, SLASH_S]
    assert encoding.turn_end_id(model, tok) == SLASH_S
    chatml = variant(chat_tok, eos_token="</s>")  # ChatML with a document-end EOS: <|im_end|> joins it
    model = tiny_causal(chatml, None)
    finish_generation_config(model, chatml)
    assert model.generation_config.eos_token_id == [SLASH_S, IM_END]


def test_a_template_that_cannot_render_an_assistant_turn_has_no_turn_end(chat_tok, caplog):
    strict = variant(chat_tok, chat_template="{{ raise_exception('only user turns') }}")
    assert encoding.template_turn_end(strict, {IM_END}) is None
    assert "cannot render" in caplog.text
