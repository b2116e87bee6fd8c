"""Tests for ptg.metrics: per-example sequence scores, ROUGE per type, METEOR backends and the corpus summary."""

from __future__ import annotations

import math

import nltk
import pytest
from nltk.tokenize import NLTKWordTokenizer

from ptg import metrics
from ptg.metrics import METRICS, meteor, meteor_backend, rouge_scores, score, split_sentences, summary

REF = "The children played football in the park after school."
PARAPHRASE = "After school, the kids played football in the park."
UNRELATED = "Stock prices fell sharply on Tuesday morning."
# No shared word, stem, synonym or even character: every metric must give exactly 0.
DISJOINT_PRED, DISJOINT_REF = "abc def", "xyz wuv"


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ptg.metrics tried to download nltk data")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.downloader.Downloader, "download", refuse)


@pytest.mark.parametrize("metric", METRICS)
def test_identical_strings_score_one(metric: str) -> None:
    (value,) = score(metric, [REF], [[REF]])
    if metric == "meteor":  # the fragmentation penalty keeps METEOR just under 1 even for one chunk
        assert 0.9 < value <= 1.0
    else:
        assert value == pytest.approx(1.0)


@pytest.mark.parametrize("metric", METRICS)
def test_disjoint_strings_score_zero(metric: str) -> None:
    assert score(metric, [DISJOINT_PRED], [[DISJOINT_REF]]) == [0.0]


@pytest.mark.parametrize("metric", METRICS)
def test_paraphrase_beats_unrelated_and_scores_in_unit_interval(metric: str) -> None:
    close, far = score(metric, [PARAPHRASE, UNRELATED], [[REF], [REF]])
    assert 0.0 <= far < close <= 1.0


@pytest.mark.parametrize("metric", METRICS)
def test_empty_prediction_scores_zero(metric: str) -> None:
    assert score(metric, ["", "   "], [[REF], [REF]]) == [0.0, 0.0]


@pytest.mark.parametrize("metric", METRICS)
def test_multi_reference_takes_the_best(metric: str) -> None:
    (alone,) = score(metric, [PARAPHRASE], [[UNRELATED]])
    (both,) = score(metric, [PARAPHRASE], [[UNRELATED, PARAPHRASE]])
    (exact,) = score(metric, [PARAPHRASE], [[PARAPHRASE]])
    assert both == pytest.approx(exact)
    assert both > alone


@pytest.mark.parametrize("metric", ["rouge", "meteor"])
def test_multi_reference_is_the_max_over_references(metric: str) -> None:
    refs = [REF, UNRELATED, "The kids played in the park."]
    singles = [score(metric, [PARAPHRASE], [[r]])[0] for r in refs]
    assert score(metric, [PARAPHRASE], [refs]) == [pytest.approx(max(singles))]


def test_rouge1_hand_checked() -> None:
    # prediction tokens: the cat sat on the mat (6); reference: a cat sat on a red mat today (8).
    # Overlap: cat, sat, on, mat = 4. P = 4/6, R = 4/8, F1 = 2PR/(P+R) = (2/3)/(7/6) = 4/7.
    out = rouge_scores(["the cat sat on the mat"], [["a cat sat on a red mat today"]])
    assert out["rouge1"] == [pytest.approx(4 / 7)]
    # ROUGE-2: bigrams "cat sat", "sat on" shared = 2; P = 2/5, R = 2/7, F1 = 2*(2/5)(2/7)/(2/5+2/7) = 1/3.
    assert out["rouge2"] == [pytest.approx(1 / 3)]


def test_rouge_scores_keys_and_rougelsum_uses_sentences() -> None:
    out = rouge_scores(["the cat sat. the dog ran."], [["the dog ran. the cat sat."]])
    assert set(out) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert out["rouge1"] == [pytest.approx(1.0)]
    assert out["rougeL"] == [pytest.approx(0.5)]  # one LCS across the whole text: "the dog ran" or "the cat sat"
    assert out["rougeLsum"] == [pytest.approx(1.0)]  # union LCS per sentence recovers both


def test_rouge_scores_multi_reference_max_per_key() -> None:
    refs = ["the cat sat on the mat", "a dog ran"]
    out = rouge_scores(["the cat sat on a mat"], [refs])
    for key, values in out.items():
        singles = [rouge_scores(["the cat sat on a mat"], [[r]])[key][0] for r in refs]
        assert values == [pytest.approx(max(singles))]


def test_score_rouge_is_rouge_l() -> None:
    preds, refs = [PARAPHRASE, UNRELATED], [[REF], [REF, PARAPHRASE]]
    assert score("rouge", preds, refs) == pytest.approx(rouge_scores(preds, refs)["rougeL"])


def test_split_sentences() -> None:
    assert split_sentences("Hello there. How are you? Fine!\nBye") == ["Hello there.", "How are you?", "Fine!", "Bye"]
    assert split_sentences('He said "stop." Then left.') == ['He said "stop."', "Then left."]
    assert split_sentences("  ") == []


def test_meteor_exact_and_stem_hand_checked() -> None:
    # Exact + stem only: "a" and "fix" match, "quick" and "fast" do not. P = R = 2/3, Fmean = 2/3; the two
    # matches are 2 chunks, frag = 2/2 = 1, penalty = 0.5 * 1**3 = 0.5, so METEOR = 2/3 * 0.5 = 1/3.
    assert meteor(["a quick fix"], [["a fast fix"]], use_wordnet=False) == [pytest.approx(1 / 3)]
    # Stems: "walked" ~ "walking"; all 3 match in 1 chunk: frag = 1/3, penalty = 0.5/27, Fmean = 1.
    assert meteor(["they walked home"], [["they walking home"]], use_wordnet=False) == [pytest.approx(1 - 1 / 54)]


def test_meteor_wordnet_synonyms_score_higher() -> None:
    if meteor_backend() != "wordnet":
        pytest.skip("nltk's WordNet corpus is not installed locally")
    # "quick" and "fast" share a WordNet synset: all 3 words match in one chunk, 1 - 0.5/27 (vs 1/3 above).
    (with_wordnet,) = meteor(["a quick fix"], [["a fast fix"]])
    (without,) = meteor(["a quick fix"], [["a fast fix"]], use_wordnet=False)
    assert with_wordnet == pytest.approx(1 - 1 / 54)
    assert with_wordnet > without


def test_english_wordnet_reader_gives_nltk_synonyms() -> None:
    """ptg's reader (without the multilingual mapping) answers every English lookup as nltk's own reader."""
    if meteor_backend() != "wordnet":
        pytest.skip("nltk's WordNet corpus is not installed locally")
    import random

    from nltk.corpus import wordnet

    from ptg.metrics import _wordnet

    words = sorted(wordnet.all_lemma_names())
    words = random.Random(0).sample(words, 1500) + ["running", "dogs", "geese", "went", "better", "returns", "is"]
    for word in words:
        ours = {lemma.name() for syn in _wordnet().synsets(word) for lemma in syn.lemmas()}
        assert ours == {lemma.name() for syn in wordnet.synsets(word) for lemma in syn.lemmas()}, word


def test_meteor_backend_is_known_and_cached() -> None:
    assert meteor_backend() in {"wordnet", "exact+stem"}
    assert meteor_backend() == meteor_backend()
    if meteor_backend() == "exact+stem":
        with pytest.raises(RuntimeError, match="use_wordnet"):
            meteor(["a"], [["a"]], use_wordnet=True)


def test_meteor_is_case_insensitive_and_handles_punctuation_only() -> None:
    assert meteor(["THE CAT SAT."], [["the cat sat."]]) == meteor(["the cat sat."], [["the cat sat."]])
    assert all(0.0 <= v <= 1.0 for v in meteor([".", "!!"], [[REF], ["!"]]))


@pytest.mark.parametrize(
    "text",
    [
        REF,
        "\"Can't\" -- he said (twice): 'gonna' cost $3.88... i'd wanna go; O'Neil's dog.\u201d!",
        "It's 3.5% (ok)... 'quoted' word -- dash; a,b: c",
        "l'amour \u00abfrench\u00bb \u2014 dash [x] {y} <z> *star* @me #tag",
        "U.S.A. is big. Mr. Smith isn't here, cannot come 'til tomorrow.",
    ],
)
def test_fast_word_tokenizer_matches_nltk(text: str) -> None:
    for t in (text, text.lower()):
        assert metrics._WORD_TOKENIZER.tokenize(t) == NLTKWordTokenizer().tokenize(t)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="metric") as info:
        score("bertscore", [REF], [[REF]])
    assert all(name in str(info.value) for name in METRICS)
    with pytest.raises(ValueError, match="predictions and references"):
        score("rouge", [REF, REF], [[REF]])
    with pytest.raises(ValueError, match=r"references\[1\]"):
        score("chrf", [REF, REF], [[REF], []])
    for fn in (meteor, rouge_scores, summary):
        with pytest.raises(ValueError, match="references"):
            fn([REF], [[REF], [REF]])
        with pytest.raises(ValueError, match=r"references\[0\]"):
            fn([REF], [[]])
    with pytest.raises(TypeError, match=r"references\[0\]"):
        score("bleu", [REF], [REF])  # a bare string instead of a list of references
    with pytest.raises(ValueError, match="predictions"):
        summary([], [])


def test_empty_inputs_give_empty_scores() -> None:
    for metric in METRICS:
        assert score(metric, [], []) == []
    assert rouge_scores([], []) == {key: [] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")}


def test_summary_keys_and_scale() -> None:
    preds = [REF, PARAPHRASE, ""]
    refs = [[REF], [REF], [REF]]
    out = summary(preds, refs)
    assert set(out) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "meteor", "gen_len"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    per = rouge_scores(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert out[key] == pytest.approx(100 * sum(per[key]) / 3)
    assert out["meteor"] == pytest.approx(100 * sum(meteor(preds, refs)) / 3)
    assert out["gen_len"] == pytest.approx((9 + 9 + 0) / 3)
    assert summary([REF], [[REF]])["rouge1"] == pytest.approx(100.0)
