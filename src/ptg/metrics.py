"""Sequence-level preferences and evaluation metrics: METEOR, ROUGE, chrF and BLEU per example.

PTG ranks the K sampled continuations of each input by a sequence-level score against the reference(s)
(``score``), and reports corpus-level results (``summary``). Every per-example score is in [0, 1], higher is
better, and multi-reference aware: ``references[i]`` lists the references of prediction i.

* METEOR: nltk's ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5, as HF ``evaluate``), the maximum over the
  references. Synonyms come from WordNet when nltk can load it locally; otherwise ``meteor_backend()`` says
  ``"exact+stem"`` and only exact and Porter-stem matches count. Nothing is ever downloaded: tokenization uses
  nltk's regex word tokenizer after a regex sentence split, never ``word_tokenize`` (which needs punkt).
* ROUGE: rouge-score F1 with the Porter stemmer, the maximum over the references per ROUGE type. For rougeLsum
  every sentence goes on its own line (the regex splitter of ``split_sentences``).
* chrF and BLEU: sacrebleu's sentence-level scores (BLEU with exponential smoothing and effective order) with
  all references at once, divided by 100.

METEOR is the hot path of ranking (thousands of pairs per round), so tokens, Porter stems and WordNet synsets
are cached per string and the scorers are built once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from nltk.stem.porter import PorterStemmer
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.meteor_score import meteor_score as _nltk_meteor_score
from rouge_score import rouge_scorer

if TYPE_CHECKING:
    from sacrebleu.metrics import BLEU, CHRF

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("meteor", "rouge", "chrf", "bleu")
ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace, or at a
# line break. Abbreviations ("Mr. Smith") are split too; punkt would not, but it needs downloaded data.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+|\s*\n\s*")
_RE_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL | re.UNICODE | re.VERBOSE | re.ASCII


def _stdlib_pattern(pattern: Any) -> re.Pattern[str]:
    """The same regex compiled by the stdlib ``re`` (nltk routes its own through the much slower ``regex``)."""
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern.pattern, pattern.flags & _RE_FLAGS)


def _fast(rules: Sequence[tuple[Any, str]]) -> list[tuple[re.Pattern[str], str]]:
    return [(_stdlib_pattern(p), sub) for p, sub in rules]


def _fast_word_tokenizer() -> NLTKWordTokenizer:
    """nltk's ``NLTKWordTokenizer`` (what ``word_tokenize`` runs per sentence) on stdlib-compiled patterns.

    nltk 3.10 runs each of its fixed tokenizer regexes through the ``regex`` engine under a timeout, which made
    tokenizing ~70% of METEOR's cost; the patterns and the ``tokenize`` code are nltk's own, unchanged.
    """
    base = NLTKWordTokenizer
    rules = {
        "STARTING_QUOTES": _fast(base.STARTING_QUOTES),
        "ENDING_QUOTES": _fast(base.ENDING_QUOTES),
        "PUNCTUATION": _fast(base.PUNCTUATION),
        "PARENS_BRACKETS": _fast([base.PARENS_BRACKETS])[0],
        "CONVERT_PARENTHESES": _fast(base.CONVERT_PARENTHESES),
        "DOUBLE_DASHES": _fast([base.DOUBLE_DASHES])[0],
        "CONTRACTIONS2": [_stdlib_pattern(p) for p in base.CONTRACTIONS2],
        "CONTRACTIONS3": [_stdlib_pattern(p) for p in base.CONTRACTIONS3],
    }
    return type("_FastWordTokenizer", (base,), rules)()


_TOKENIZER_PROBE = "\"Can't\" -- he said (twice): 'gonna' cost $3.88... i'd wanna go; O'Neil's dog.\u201d!"


def _word_tokenizer() -> NLTKWordTokenizer:
    """The fast tokenizer when it agrees with nltk's on a probe (guards against nltk changing), else nltk's."""
    try:
        fast = _fast_word_tokenizer()
        if fast.tokenize(_TOKENIZER_PROBE) == NLTKWordTokenizer().tokenize(_TOKENIZER_PROBE):
            return fast
    except Exception as exc:  # nltk renamed a rule list, or a pattern the stdlib cannot compile
        log.debug("stdlib-compiled word tokenizer unavailable: %s", exc)
    log.warning("using nltk's own (slower) NLTKWordTokenizer for METEOR")
    return NLTKWordTokenizer()


_WORD_TOKENIZER = _word_tokenizer()


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` by a regex (no downloaded model), stripped, empty ones dropped."""
    return [s for s in (part.strip() for part in _SENTENCE_BREAK.split(text.strip())) if s]


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str):
        raise TypeError("predictions must be a sequence of strings, not a single str")
    if isinstance(references, str):
        raise TypeError("references must be a sequence of reference lists, not a single str")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} != {len(references)}"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(f"references[{i}] is a str; expected a list of reference strings")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty: every prediction needs at least one reference")


def _clip(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


# ---------------------------------------------------------------------------------------------------------
# METEOR
# ---------------------------------------------------------------------------------------------------------


class _CachedPorterStemmer(PorterStemmer):
    """nltk's Porter stemmer (the mode METEOR uses) with a per-word cache: stemming is most of METEOR's cost."""

    _MAX_CACHE = 1 << 20

    def __init__(self) -> None:
        super().__init__()
        self._stems: dict[str, str] = {}

    def stem(self, word: str, to_lowercase: bool = True) -> str:
        if not to_lowercase:
            return super().stem(word, to_lowercase=False)
        stem = self._stems.get(word)
        if stem is None:
            if len(self._stems) >= self._MAX_CACHE:
                self._stems.clear()
            stem = self._stems[word] = super().stem(word)
        return stem


class _Lemma:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


class _Synset:
    """All of a word's WordNet synsets merged into one: nltk's METEOR only unions their lemma names."""

    __slots__ = ("_lemmas",)

    def __init__(self, names: Sequence[str]) -> None:
        self._lemmas = tuple(_Lemma(name) for name in names)

    def lemmas(self) -> tuple[_Lemma, ...]:
        return self._lemmas


class _Synonyms:
    """Stands in for nltk's WordNet reader in METEOR: ``synsets(word)``, cached per word and flattened.

    A word's synsets become one ``_Synset`` holding the distinct lemma names METEOR can use (those without
    "_"), which gives nltk's matcher the same synonym set at a fraction of the cost. With ``wordnet=None`` it
    answers ``()`` for every word, so METEOR matches only exact words and stems.
    """

    _MAX_CACHE = 1 << 20

    def __init__(self, wordnet: Any | None) -> None:
        self._wordnet = wordnet
        self._synsets: dict[str, tuple[_Synset, ...]] = {}

    def synsets(self, word: str) -> tuple[_Synset, ...]:
        if self._wordnet is None:
            return ()
        found = self._synsets.get(word)
        if found is None:
            names = {lemma.name() for syn in self._wordnet.synsets(word) for lemma in syn.lemmas()}
            names = sorted(name for name in names if "_" not in name)
            found = (_Synset(names),) if names else ()
            if len(self._synsets) >= self._MAX_CACHE:
                self._synsets.clear()
            self._synsets[word] = found
        return found


@cache
def _wordnet() -> Any | None:
    """nltk's WordNet reader for English if it loads from local data, else None (logged once). Never downloads.

    The reader skips the mapping to WordNet 3.0 that only multilingual (OMW) lookups read: building it was half of
    the reader's load time (about 6 s) in every `rank` and `evaluate` process, and English synsets do not use it.
    """
    try:
        import warnings

        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        class EnglishWordNet(WordNetCorpusReader):
            def map_wn(self, version: str = "wordnet") -> None:
                return None

        with warnings.catch_warnings():  # "multilingual functions are not available": they are not used
            warnings.simplefilter("ignore", UserWarning)
            wordnet = EnglishWordNet(nltk.data.find("corpora/wordnet"), None)
        wordnet.synsets("dog")
    except Exception as exc:  # LookupError when absent, OSError when incomplete, anything else when broken
        log.warning("WordNet unavailable, METEOR uses exact + stem matching only: %s", str(exc).strip()[:300])
        return None
    return wordnet


def meteor_backend() -> str:
    """``"wordnet"`` when nltk's WordNet corpus loads locally, else ``"exact+stem"`` (cached)."""
    return "wordnet" if _wordnet() is not None else "exact+stem"


_STEMMER = _CachedPorterStemmer()


@cache
def _synonyms(use_wordnet: bool) -> _Synonyms:
    return _Synonyms(_wordnet() if use_wordnet else None)


@lru_cache(maxsize=1 << 16)
def _meteor_tokens(text: str) -> tuple[str, ...]:
    """Lower-cased word tokens: nltk's regex word tokenizer per regex sentence (no punkt needed)."""
    return tuple(tok for sent in split_sentences(text.lower()) for tok in _WORD_TOKENIZER.tokenize(sent))


def meteor(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, use_wordnet: bool | None = None
) -> list[float]:
    """METEOR per prediction, the best over its references; 0.0 for an empty prediction.

    ``use_wordnet``: None uses WordNet synonyms when available (see ``meteor_backend``); False forces exact +
    stem matching (comparable across machines); True requires WordNet and raises RuntimeError without it.
    """
    _check_inputs(predictions, references)
    if use_wordnet is None:
        use_wordnet = _wordnet() is not None
    elif use_wordnet and _wordnet() is None:
        raise RuntimeError("use_wordnet=True but nltk's WordNet corpus cannot be loaded locally")
    synonyms = _synonyms(use_wordnet)
    out: list[float] = []
    for pred, refs in zip(predictions, references, strict=True):
        hyp = _meteor_tokens(pred)
        if not hyp:
            out.append(0.0)
            continue
        value = _nltk_meteor_score([_meteor_tokens(r) for r in refs], hyp, stemmer=_STEMMER, wordnet=synonyms)
        out.append(_clip(value))
    return out


# ---------------------------------------------------------------------------------------------------------
# ROUGE, chrF, BLEU
# ---------------------------------------------------------------------------------------------------------


@cache
def _rouge_scorer(rouge_types: tuple[str, ...]) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True)


def _one_sentence_per_line(text: str) -> str:
    return "\n".join(split_sentences(text))


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Per-example ROUGE F1 for rouge1, rouge2, rougeL and rougeLsum, each the best over the references.

    Texts are put one sentence per line first, which only rougeLsum sees (the others tokenize across lines).
    """
    _check_inputs(predictions, references)
    scorer = _rouge_scorer(ROUGE_TYPES)
    out: dict[str, list[float]] = {key: [] for key in ROUGE_TYPES}
    for pred, refs in zip(predictions, references, strict=True):
        pred_lines = _one_sentence_per_line(pred)
        best = dict.fromkeys(ROUGE_TYPES, 0.0)
        for ref in refs:
            scores = scorer.score(_one_sentence_per_line(ref), pred_lines)
            for key in ROUGE_TYPES:
                best[key] = max(best[key], scores[key].fmeasure)
        for key in ROUGE_TYPES:
            out[key].append(_clip(best[key]))
    return out


def _rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    scorer = _rouge_scorer(("rougeL",))
    return [_clip(max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs))
            for pred, refs in zip(predictions, references, strict=True)]


@cache
def _chrf() -> CHRF:
    from sacrebleu.metrics import CHRF  # only chrf and bleu need sacrebleu

    return CHRF()


@cache
def _bleu() -> BLEU:
    from sacrebleu.metrics import BLEU

    return BLEU(smooth_method="exp", effective_order=True)


def _sacrebleu(metric: CHRF | BLEU, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    return [_clip(metric.sentence_score(pred, list(refs)).score / 100.0)
            for pred, refs in zip(predictions, references, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------

_SCORERS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], list[float]]] = {
    "meteor": meteor,
    "rouge": _rouge_l,
    "chrf": lambda p, r: _sacrebleu(_chrf(), p, r),
    "bleu": lambda p, r: _sacrebleu(_bleu(), p, r),
}


def score(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """One score in [0, 1] per prediction (higher is better) by ``metric``, one of ``METRICS``.

    "rouge" is ROUGE-L F1; each prediction gets the best over its references (chrF and BLEU: sacrebleu's
    multi-reference sentence score).
    """
    if metric not in _SCORERS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    _check_inputs(predictions, references)
    return _SCORERS[metric](predictions, references)


def item_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Per-example rouge1, rouge2, rougeL, rougeLsum and meteor F in [0, 1], and gen_len (words of the
    prediction, whitespace-separated): what paired comparisons of two systems on the same examples need."""
    _check_inputs(predictions, references)
    out = rouge_scores(predictions, references)
    out["meteor"] = meteor(predictions, references)
    out["gen_len"] = [float(len(p.split())) for p in predictions]
    return out


def summarize(items: dict[str, list[float]]) -> dict[str, float]:
    """Corpus means of ``item_scores``: the F scores x100, gen_len as is. Nothing is rounded."""
    n = len(items["meteor"])
    if n == 0:
        raise ValueError("predictions is empty: a summary needs at least one example")
    return {key: (1.0 if key == "gen_len" else 100.0) * sum(values) / n for key, values in items.items()}


def summary(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus means x100 of rouge1, rouge2, rougeL, rougeLsum and meteor, plus gen_len (mean words per prediction).

    Words for gen_len are whitespace-separated. Nothing is rounded.
    """
    _check_inputs(predictions, references)
    if len(predictions) == 0:
        raise ValueError("predictions is empty: a summary needs at least one example")
    return summarize(item_scores(predictions, references))
