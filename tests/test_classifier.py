"""The frozen few-shot classifier (ptg.tasks.prompt.scoring): gap reward (§8.7), cached vs uncached scoring,
calibration, budget counters and the masked-LM kind, on tiny random models with offline tokenizers."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, LlamaConfig, LlamaForCausalLM

from ptg.lm.tiny_models import build_tiny_tokenizer
from ptg.tasks.prompt.scoring import Classifier, check_template, gap_rewards, load_classifier, verbalizer_ids

VERBALIZERS = [" no", " yes", " maybe"]  # one token each in the tiny-llama tokenizer
TEXTS = ["yes", "the heating in my flat has not worked for a week", "Dear Sir or Madam"]
PROMPTS = [" always", " Thank you for your help", " no no", " never sometimes", " Best regards, and", " Yes"]
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was", "great", "terrible", "it", "is",
              "a", "movie", "so", "very", "."]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def llama(tokenizer):
    """A tiny Llama with large random weights, so that its next-token distribution depends strongly on context."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def clf(llama, tokenizer):
    return Classifier(llama, tokenizer, VERBALIZERS)


def reference_probs(clf: Classifier, texts, prompts) -> torch.Tensor:
    """(P, N, C) from one plain, unpadded, uncached forward per (prompt, text) of the template "{text} {prompt}",
    encoded as text (with special tokens) + " " + prompt (without)."""
    out = torch.empty(len(prompts), len(texts), len(clf.ids))
    for i, p in enumerate(prompts):
        for j, t in enumerate(texts):
            ids = torch.tensor([clf.tokenizer.encode(t) + clf.tokenizer.encode(f" {p}", add_special_tokens=False)])
            with torch.no_grad():
                out[i, j] = clf.model(input_ids=ids).logits[0, -1, clf.ids].softmax(-1)
    return out


# ------------------------------------------------------------------------------------------------ gap reward (§8.7)


def test_gap_rewards_binary_vector():
    probs = torch.tensor([[[0.70, 0.30], [0.45, 0.55], [0.20, 0.80]]])
    reward, acc = gap_rewards(probs, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(reward, torch.tensor([(80 - 18 + 120) / 3]))
    assert reward.item() == pytest.approx(60.6667, abs=1e-4)
    assert acc.item() == pytest.approx(0.6667, abs=1e-4)


def test_gap_rewards_three_class_vector_and_one_row_per_prompt():
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], [[0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]])
    reward, acc = gap_rewards(probs, torch.tensor([1, 2]))
    torch.testing.assert_close(reward, torch.tensor([2.0, (0.7 * 200 - 0.5 * 180) / 2]))
    torch.testing.assert_close(acc, torch.tensor([0.5, 0.5]))


def test_a_tie_is_a_zero_gap_not_a_hit():
    """Classes are excluded by index: a tie gives gap 0 (RLPrompt's value-equality exclusion would give 1.5)."""
    reward, acc = gap_rewards(torch.tensor([[[0.5, 0.5]]]), torch.tensor([0]))
    assert reward.item() == 0.0 and acc.item() == 0.0


@pytest.mark.parametrize(("probs", "labels", "match"), [
    (torch.rand(3, 2), torch.tensor([0, 1, 0]), "probs must be"),
    (torch.rand(1, 3, 2), torch.tensor([0, 1]), "labels must be"),
    (torch.rand(1, 2, 2), torch.tensor([0, 2]), r"labels must lie in \[0, 2\)"),
])
def test_gap_rewards_bad_shapes_raise(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        gap_rewards(probs, labels)


# -------------------------------------------------------------------------------------------- verbalizers, templates


def test_verbalizer_ids_are_single_tokens(tokenizer):
    ids = verbalizer_ids(tokenizer, VERBALIZERS)
    assert ids == [tokenizer.convert_tokens_to_ids(w.replace(" ", "Ġ")) for w in VERBALIZERS]


def test_a_two_token_verbalizer_raises_naming_it_and_its_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"prompt\.verbalizers: verbalizer ' great' must be one token.*'Ġg', 're'"):
        verbalizer_ids(tokenizer, [" no", " great"], where="prompt.verbalizers")


def test_duplicate_or_too_few_verbalizers_raise(tokenizer):
    with pytest.raises(ValueError, match="' yes' and ' yes' are the same token id"):
        verbalizer_ids(tokenizer, [" yes", " yes"])
    with pytest.raises(ValueError, match="task.verbalizers: need at least two"):
        verbalizer_ids(tokenizer, [" yes"])


@pytest.mark.parametrize(("template", "kind", "match"), [
    ("{text} is", "causal", r"'\{text\} is' must contain each of \{text\}, \{prompt\}"),
    ("{text} {prompt} {prompt}", "causal", "exactly once"),
    ("{text} {prompt} {mask}", "causal", r"and no \{mask\}"),
    ("{prompt} {text}", "causal", r"must put \{text\} before \{prompt\}"),
    ("{text} {prompt} .", "masked", r"\{mask\} exactly once"),
    ("{text} {prompt}", "seq2seq", "kind must be one of"),
])
def test_bad_templates_raise_naming_the_template(template, kind, match):
    with pytest.raises(ValueError, match=match):
        check_template(template, kind)


def test_the_classifier_is_frozen_in_eval_mode(llama, tokenizer):
    llama.train()
    clf = Classifier(llama, tokenizer, VERBALIZERS)
    assert not clf.model.training and not any(p.requires_grad for p in clf.model.parameters())
    assert clf.template == "{text} {prompt}"


# ----------------------------------------------------------------------------------------------------- causal kind


@pytest.mark.parametrize("batch_size", [4, 12, 64])
def test_cached_uncached_and_plain_forwards_agree(clf, batch_size):
    """Texts and prompts of different lengths; prompt batches of 4 (the second smaller), or 2 and then all texts
    per batch (their prefixes left-padded together): the prefix cache is shared without being changed, and
    neither padding moves the read-out position."""
    cached = clf.probs(TEXTS, PROMPTS, batch_size=batch_size)
    uncached = clf.probs(TEXTS, PROMPTS, batch_size=batch_size, uncached=True)
    assert cached.shape == (len(PROMPTS), len(TEXTS), len(VERBALIZERS)) and cached.dtype == torch.float32
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, reference_probs(clf, TEXTS, PROMPTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.sum(-1), torch.ones(len(PROMPTS), len(TEXTS)))
    assert (cached.amax((0, 1)) - cached.amin((0, 1))).min() > 0.05  # the scores do depend on prompt and text


def test_calls_and_scored_count_forwards_and_pairs(clf):
    clf.probs(TEXTS, PROMPTS[:5], batch_size=2)
    assert (clf.calls, clf.scored) == (3 * (1 + 3), 15)  # per text: one prefix pass, ceil(5 / 2) prompt passes
    clf.probs(TEXTS, PROMPTS[:5], batch_size=2, uncached=True)
    assert (clf.calls, clf.scored) == (12 + 3 * 3, 30)
    clf.probs(TEXTS[:1], PROMPTS[:5], batch_size=8, calibrate=True)
    # The text's prefix is cached from the first call; the content-free text is scored too (its prefix run once).
    assert (clf.calls, clf.scored) == (21 + 1 + 2, 30 + 5 + 5)
    clf.probs(TEXTS, PROMPTS[:5], batch_size=2)
    assert (clf.calls, clf.scored) == (24 + 3 * 3, 40 + 15)  # every prefix is cached now: prompt passes only


def test_calibration_makes_the_content_free_text_uniform(clf):
    raw = clf.probs(["N/A", *TEXTS], PROMPTS)
    reference = clf.calibration(PROMPTS)
    torch.testing.assert_close(reference, raw[:, 0])
    calibrated = clf.probs(["N/A", *TEXTS], PROMPTS, calibrate=True)
    torch.testing.assert_close(calibrated[:, 0], torch.full((len(PROMPTS), len(VERBALIZERS)), 1 / 3))
    expected = raw / reference[:, None]
    torch.testing.assert_close(calibrated, expected / expected.sum(-1, keepdim=True))


def test_load_classifier_from_a_folder(llama, tokenizer, tmp_path):
    llama.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf", None, None, VERBALIZERS)
    torch.testing.assert_close(loaded.probs(TEXTS, PROMPTS), Classifier(llama, tokenizer, VERBALIZERS).probs(
        TEXTS, PROMPTS))
    with pytest.raises(ValueError, match="kind must be one of"):
        load_classifier(llama, tokenizer, None, VERBALIZERS, kind="seq2seq")


# ----------------------------------------------------------------------------------------------------- masked kind


@pytest.fixture(scope="module")
def bert():
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(BERT_WORDS)})
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, initializer_range=0.3, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval(), tok


def test_masked_kind_reads_the_mask_position(bert, tmp_path):
    model, tok = bert
    model.save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    clf = load_classifier(tmp_path / "mlm", None, "{text} {prompt} {mask} .", ["terrible", "great"], kind="masked")
    texts, prompts = ["the film was so very great", "a movie"], ["it is", "it was very", "so"]
    got = clf.probs(texts, prompts, batch_size=4)
    assert got.shape == (3, 2, 2) and (clf.calls, clf.scored) == (2, 6)
    ids = [tok.convert_tokens_to_ids(w) for w in ("terrible", "great")]
    for i, p in enumerate(prompts):
        for j, t in enumerate(texts):
            enc = tok(f"{t} {p} [MASK] .", return_tensors="pt")
            pos = enc.input_ids[0].tolist().index(tok.mask_token_id)
            with torch.no_grad():
                want = model(**enc).logits[0, pos, ids].softmax(-1)
            torch.testing.assert_close(got[i, j], want, atol=1e-5, rtol=0)


def test_masked_template_needs_a_mask(bert):
    model, tok = bert
    with pytest.raises(ValueError, match=r"masked classifier template '\{text\} \{prompt\}' must contain"):
        Classifier(model, tok, ["terrible", "great"], "{text} {prompt}", kind="masked")
