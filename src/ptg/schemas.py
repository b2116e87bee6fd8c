"""The tables that pipeline stages hand to each other, as pandera ``DataFrameModel`` classes (one per table).

Every table is written with ``ptg.io.write_table`` and read with ``ptg.io.read_table``, which validate against
these models, so a stage fails on a malformed input at once, naming the file, the column and the rows, instead of
crashing later in training. The models are strict (no extra columns) and coerce where it is harmless (ids to
``str``, integers to ``float``); booleans are never coerced (``"False"`` would become ``True``).

List-valued columns (``references``, ``token_ids``) come back from parquet as numpy arrays, so their checks
accept a ``list``, ``tuple`` or 1-D ``numpy.ndarray``.

Tables: ``Examples`` (prepare), ``Samples`` (sampling), ``Rankings`` (scoring), ``AnnotationSheet`` (samples
exported for people to score), ``HumanScores`` (imported human preferences) and ``Predictions`` (evaluation).
``check_disjoint_splits`` guards against an id in two splits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")

_SEQUENCE_TYPES = (list, tuple, np.ndarray)


# ---------------------------------------------------------------------------------------------------------------
# Element predicates (pure; shared by the models and usable by stages).
# ---------------------------------------------------------------------------------------------------------------


def _as_sequence(value: Any) -> list[Any] | None:
    """``value`` as a list when it is a list, tuple or 1-D array; else None."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim == 1 else None
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def is_reference_list(value: Any) -> bool:
    """True for a list/tuple/1-D array of at least one string, every one non-empty after stripping."""
    items = _as_sequence(value)
    return bool(items) and all(isinstance(x, str) and x.strip() != "" for x in items)


def is_token_list(value: Any) -> bool:
    """True for a non-empty list/tuple/1-D integer array of token ids >= 0 (booleans are not token ids)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.size > 0 and np.issubdtype(value.dtype, np.integer) and bool(
            (value >= 0).all())
    items = _as_sequence(value)
    return bool(items) and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x >= 0 for x in items)


def _first(value: Any) -> Any:
    items = _as_sequence(value)
    return items[0] if items else None


def _finite(s: pd.Series) -> pd.Series:
    return pd.Series(np.isfinite(pd.to_numeric(s, errors="coerce").astype(float)), index=s.index)


def _non_blank(s: pd.Series) -> pd.Series:
    return s.map(lambda v: isinstance(v, str) and v.strip() != "").astype(bool)


def _has(df: pd.DataFrame, *columns: str) -> bool:
    """Whether ``df`` has ``columns``: a dataframe check passes when they are missing (reported on their own)."""
    return set(columns) <= set(df.columns)


def _all_true(df: pd.DataFrame) -> pd.Series:
    return pd.Series(True, index=df.index, dtype=bool)


def _by_id(df: pd.DataFrame, column: str, predicate: Any) -> pd.Series:
    """Broadcast ``predicate(group_values) -> bool`` over every row of each id (row-aligned boolean Series)."""
    if not _has(df, "id", column):
        return _all_true(df)
    ok = df.groupby("id", sort=False)[column].transform(lambda g: bool(predicate(g.to_numpy())))
    return ok.astype(bool)


def _is_permutation(values: np.ndarray, start: int) -> bool:
    try:
        return sorted(int(v) for v in values) == list(range(start, start + len(values)))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class Examples(pa.DataFrameModel):
    """One row per input of one split: what the model reads (``prompt``) and what it should say."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1}, coerce=True)
    split: Series[str] = pa.Field(isin=list(SPLITS))
    input: Series[str]
    prompt: Series[str] = pa.Field(str_length={"min_value": 1})
    target: Series[str]
    references: Series[object]

    class Config:
        strict = True

    @pa.check("input", "target", name="non_blank")
    def _non_blank(cls, s: pd.Series) -> pd.Series:
        return _non_blank(s)

    @pa.check("references", element_wise=True, name="list_of_non_empty_strings")
    def _references(cls, value: Any) -> bool:
        return is_reference_list(value)

    @pa.dataframe_check(name="target_is_first_reference")
    def _target_first(cls, df: pd.DataFrame) -> pd.Series:
        if not _has(df, "references", "target"):
            return _all_true(df)
        return pd.Series([_first(r) == t for r, t in zip(df["references"], df["target"], strict=True)],
                         index=df.index, dtype=bool)


class Samples(pa.DataFrameModel):
    """K sampled continuations per input id: ``sample_idx`` is 0..K-1 for every id, K >= 2 and the same for all
    ids."""

    id: Series[str] = pa.Field(str_length={"min_value": 1}, coerce=True)
    sample_idx: Series[int] = pa.Field(ge=0, coerce=True)
    text: Series[str]
    token_ids: Series[object]
    n_tokens: Series[int] = pa.Field(ge=1, coerce=True)
    finished: Series[bool]

    class Config:
        strict = True
        unique = ["id", "sample_idx"]

    @pa.check("token_ids", element_wise=True, name="non_empty_list_of_token_ids")
    def _token_ids(cls, value: Any) -> bool:
        return is_token_list(value)

    @pa.dataframe_check(name="n_tokens_is_len_token_ids")
    def _n_tokens(cls, df: pd.DataFrame) -> pd.Series:
        if not _has(df, "token_ids", "n_tokens"):
            return _all_true(df)
        lengths = df["token_ids"].map(lambda v: len(v) if isinstance(v, _SEQUENCE_TYPES) else -1)
        return (lengths == df["n_tokens"]).astype(bool)

    @pa.dataframe_check(name="same_K_samples_for_every_id")
    def _same_k(cls, df: pd.DataFrame) -> pd.Series:
        if df.empty or not _has(df, "id"):
            return _all_true(df)
        per_id = df.groupby("id", sort=False).size()
        k = per_id.mode().min()  # the most common K (the smallest of equally common ones)
        return df["id"].map(per_id).eq(k).astype(bool)

    @pa.dataframe_check(name="at_least_2_samples_per_id")
    def _two_or_more(cls, df: pd.DataFrame) -> pd.Series:
        # One sample per input ranks nothing: the guidance learns from the order of two or more.
        if df.empty or not _has(df, "id"):
            return _all_true(df)
        return df.groupby("id", sort=False)["id"].transform("size").ge(2).astype(bool)

    @pa.dataframe_check(name="sample_idx_is_0_to_K-1_per_id")
    def _sample_idx_range(cls, df: pd.DataFrame) -> pd.Series:
        return _by_id(df, "sample_idx", lambda g: _is_permutation(g, 0))


class Rankings(pa.DataFrameModel):
    """Preference score and rank of every sample: rank is 1..K within each id and rank 1 has the top score."""

    id: Series[str] = pa.Field(str_length={"min_value": 1}, coerce=True)
    sample_idx: Series[int] = pa.Field(ge=0, coerce=True)
    score: Series[float] = pa.Field(coerce=True)
    rank: Series[int] = pa.Field(ge=1, coerce=True)

    class Config:
        strict = True
        unique = ["id", "sample_idx"]

    @pa.check("score", name="finite")
    def _finite_score(cls, s: pd.Series) -> pd.Series:
        return _finite(s)

    @pa.dataframe_check(name="rank_is_permutation_of_1_to_K_per_id")
    def _rank_permutation(cls, df: pd.DataFrame) -> pd.Series:
        return _by_id(df, "rank", lambda g: _is_permutation(g, 1))

    @pa.dataframe_check(name="rank_1_has_max_score_per_id")
    def _rank_one_is_best(cls, df: pd.DataFrame) -> pd.Series:
        if not _has(df, "id", "score", "rank"):
            return _all_true(df)
        score = pd.to_numeric(df["score"], errors="coerce").astype(float)
        best = score.groupby(df["id"], sort=False).transform("max")
        # Rows of rank 1 must hold their id's maximum score (ties with other ranks are fine).
        return (~(df["rank"] == 1) | (score >= best)).astype(bool)


class Preferences(pa.DataFrameModel):
    """Preference data in the long layout (``ptg.guidance.preferences``): one row per candidate of a ranked group."""

    group: Series[str] = pa.Field(str_length={"min_value": 1})
    input: Series[str]
    text: Series[str]
    score: Series[float] = pa.Field(coerce=True)
    reference: Series[str]
    split: Series[str] = pa.Field(isin=["", "train", "validation"])

    class Config:
        strict = True
        unique = ["group", "text"]  # a duplicate candidate would be ranked against itself

    @pa.check("input", "text", name="non_blank")
    def _non_blank(cls, s: pd.Series) -> pd.Series:
        return _non_blank(s)

    @pa.check("score", name="finite")
    def _finite_score(cls, s: pd.Series) -> pd.Series:
        return _finite(s)

    @pa.dataframe_check(name="one_input_per_group")
    def _one_input(cls, df: pd.DataFrame) -> pd.Series:
        if not _has(df, "group", "input"):
            return _all_true(df)
        return df.groupby("group", sort=False)["input"].transform("nunique").eq(1).astype(bool)


class AnnotationSheet(pa.DataFrameModel):
    """One round's candidates as exported for people to score (``ptg annotate export``): one row per distinct
    (id, candidate text), ``score`` left empty for the annotator."""

    item: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    id: Series[str] = pa.Field(str_length={"min_value": 1}, coerce=True)
    input: Series[str]
    candidate: Series[str]
    score: Series[object] = pa.Field(nullable=True)

    class Config:
        strict = True
        unique = ["id", "candidate"]


class HumanScores(pa.DataFrameModel):
    """Human preference scores imported from a file: one score (higher = better) per (id, response text)."""

    id: Series[str] = pa.Field(str_length={"min_value": 1}, coerce=True)
    text: Series[str]
    score: Series[float] = pa.Field(coerce=True)

    class Config:
        strict = True

    @pa.check("score", name="finite")
    def _finite_score(cls, s: pd.Series) -> pd.Series:
        return _finite(s)


class Predictions(pa.DataFrameModel):
    """One generated prediction per test input with its metrics (ROUGE and METEOR F in [0, 1]) and length."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1}, coerce=True)
    prediction: Series[str]
    references: Series[object]
    rouge1: Series[float] = pa.Field(ge=0.0, le=1.0, coerce=True)
    rouge2: Series[float] = pa.Field(ge=0.0, le=1.0, coerce=True)
    rougeL: Series[float] = pa.Field(ge=0.0, le=1.0, coerce=True)
    rougeLsum: Series[float] = pa.Field(ge=0.0, le=1.0, coerce=True)
    meteor: Series[float] = pa.Field(ge=0.0, le=1.0, coerce=True)
    gen_len: Series[float] = pa.Field(ge=0.0, coerce=True)  # words of the prediction
    n_tokens: Series[int] = pa.Field(ge=1, coerce=True)  # generated tokens, EOS included
    # Missing (NaN) only for the MLE baseline, which has no guidance; never infinite.
    guidance_score: Series[float] = pa.Field(coerce=True, nullable=True)

    class Config:
        strict = True

    @pa.check("references", element_wise=True, name="list_of_non_empty_strings")
    def _references(cls, value: Any) -> bool:
        return is_reference_list(value)

    @pa.check("guidance_score", name="finite_or_missing")
    def _finite_score(cls, s: pd.Series) -> pd.Series:
        return _finite(s) | s.isna()


# ---------------------------------------------------------------------------------------------------------------
# Cross-table checks
# ---------------------------------------------------------------------------------------------------------------


def check_disjoint_splits(frames: Mapping[str, pd.DataFrame], max_shown: int = 10, where: str | None = None) -> None:
    """Raise ``ValueError`` naming the shared ids (at most ``max_shown``) when an id occurs in two splits; ``where``
    (the data source) starts the message."""
    ids = {name: set(df["id"].astype(str)) for name, df in frames.items()}
    names = list(ids)
    problems = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(ids[a] & ids[b])
            if shared:
                more = f" ... ({len(shared) - max_shown} more)" if len(shared) > max_shown else ""
                listed = ", ".join(map(repr, shared[:max_shown]))
                problems.append(f"{a} & {b}: {len(shared)} shared ids: {listed}{more}")
    if problems:
        raise ValueError(f"{where + ': ' if where else ''}splits are not disjoint: " + "; ".join(problems))



class ClassificationExamples(pa.DataFrameModel):
    """One labelled text of a few-shot classification split (``ptg.tasks.prompt.data``): ``label`` is a class name."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1}, coerce=True)
    text: Series[str]
    label: Series[str] = pa.Field(str_length={"min_value": 1})
    split: Series[str] = pa.Field(isin=list(SPLITS))

    class Config:
        strict = True

    @pa.check("text", name="non_blank")
    def _non_blank(cls, s: pd.Series) -> pd.Series:
        return _non_blank(s)


class PromptCandidates(pa.DataFrameModel):
    """The prompt task's candidates of one evaluated policy (``ptg.tasks.prompt.evaluation.evaluate_prompts``):
    each prompt with its validation gap reward and accuracy, its rank there (1 = chosen), the accuracy on the
    evaluated split of the top 3 (NaN for the rest) and the guidance's summed token reward (NaN without a
    guidance)."""

    prompt: Series[str]
    token_ids: Series[object]
    greedy: Series[bool]
    validation_reward: Series[float] = pa.Field(coerce=True)
    validation_accuracy: Series[float] = pa.Field(ge=0.0, le=1.0, coerce=True)
    rank: Series[int] = pa.Field(ge=1, unique=True, coerce=True)
    accuracy: Series[float] = pa.Field(ge=0.0, le=1.0, coerce=True, nullable=True)
    guidance_score: Series[float] = pa.Field(coerce=True, nullable=True)

    class Config:
        strict = True
