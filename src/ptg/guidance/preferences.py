"""Preference data people already have, as ranked groups for the guidance.

Two layouts, read from a jsonl / csv / parquet file, a folder of such files, or a Hugging Face dataset id when
online (``PreferencesParams.path``):

* **listwise** (long): one row per candidate, columns ``input``, ``text``, ``score`` (higher = better) and
  optionally ``group`` (candidates of one list; default: the input), ``reference`` and ``split``
  (``train`` / ``validation``). A group may have any K >= 2, and K may differ between groups.
* **pairwise**: one row per comparison, columns ``prompt``, ``chosen``, ``rejected``: a K = 2 list (ListMLE on
  two candidates is the Bradley-Terry loss).

Column names are configurable. ``normalize`` turns either into the validated long table (schema
``schemas.Preferences``: group, input, text, score, reference, split). Groups with fewer than two candidates or
with one score for all candidates carry no ranking and are skipped and counted (an error when all are); a
duplicate candidate, a blank text, a list where text belongs, a score that is no number, NaN or infinite, an
empty file and an input in both the fitting and the held-out split are errors naming the file, column and rows.
Inputs without a ``split`` go to the held-out split by a stable hash of the input (``heldout_fraction``), so an
input never lands on both sides.

``corruption_fixture`` makes a scored fixture from any examples: each
reference with known degrees of corruption, the degree as the score.

Parameters: ``ptg.config.PreferencesParams`` (params' ``preferences`` group). The standalone entry (fit a guidance
on a preference file, score texts with one) is ``ptg.guidance.standalone``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ptg import schemas
from ptg.io import import_extra, read_records, validate_table

if TYPE_CHECKING:
    from ptg.config import PreferencesParams

log = logging.getLogger(__name__)

COLUMNS = ("group", "input", "text", "score", "reference", "split")  # the long table (schemas.Preferences)
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# ---------------------------------------------------------------------------------------------------------------
# Reading and normalising
# ---------------------------------------------------------------------------------------------------------------


def read_raw(path: str) -> pd.DataFrame:
    """The records at ``path``: one table file, every table file of a folder (sorted), or a hub dataset id."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in TABLE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{p}: no {'/'.join(TABLE_SUFFIXES)} files in this folder")
        return pd.concat([read_records(f) for f in files], ignore_index=True)
    if p.exists() or p.suffix.lower() in TABLE_SUFFIXES:
        return read_records(p)
    # Neither a file nor a folder: a Hugging Face dataset id (needs the network or a warm cache).
    datasets = import_extra("datasets", "hub", f"preferences.path {path!r} (no such file: a dataset id?)")
    return datasets.load_dataset(path, split="train").to_pandas()


def require_columns(raw: pd.DataFrame, source: str, columns: dict[str, str]) -> None:
    missing = [f"{col!r} (preferences.{key})" for key, col in columns.items() if col not in raw.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; the table has "
                         f"{', '.join(map(repr, raw.columns))}")


def as_text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _score(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")  # the schema reports it, with its row


def _shown(values: pd.Series, shown: int = 5) -> str:
    return "; ".join(f"[{i}] {str(v)[:60]!r}" for i, v in list(values.items())[:shown]) + (
        f" (+{len(values) - shown} more)" if len(values) > shown else "")


def _texts(raw: pd.DataFrame, column: str, param: str, source: str) -> pd.Series:
    """A text column as strings (missing = ""); a list or mapping in it is an error naming the column and rows."""
    odd = raw[column][raw[column].map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray)))]
    if not odd.empty:
        raise ValueError(f"{source}: column {column!r} (preferences.{param}) must hold text; {len(odd)} row(s) "
                         f"hold a {type(odd.iloc[0]).__name__}: {_shown(odd)}")
    return raw[column].map(as_text)


def _scores(raw: pd.DataFrame, column: str, source: str) -> pd.Series:
    """The score column as floats; a value that is no number (a word, a list) is an error naming it and its row
    (a missing or NaN score becomes NaN, which the schema reports)."""
    scores = raw[column].map(_score)
    missing = raw[column].map(lambda v: v is None or bool(pd.api.types.is_scalar(v) and pd.isna(v)))
    odd = raw[column][scores.isna() & ~missing & ~raw[column].map(lambda v: str(v).strip().lower() == "nan")]
    if not odd.empty:
        raise ValueError(f"{source}: column {column!r} (preferences.score_field) must hold numbers; {len(odd)} row(s) "
                         f"do not: {_shown(odd)}")
    return scores


def normalize(raw: pd.DataFrame, pp: PreferencesParams, source: str) -> pd.DataFrame:
    """The long table (schemas.Preferences) of a listwise or pairwise ``raw`` frame, before cleaning."""
    layout = pp.layout
    if layout == "auto":
        layout = "pairwise" if pp.chosen_field in raw.columns else "listwise"
    if raw.empty:
        raise ValueError(f"{source}: no preference rows (an empty table)")
    has_ref = pp.reference_field in raw.columns
    refs = _texts(raw, pp.reference_field, "reference_field", source) if has_ref else pd.Series("", index=raw.index)
    splits = raw["split"].map(as_text) if "split" in raw.columns else pd.Series("", index=raw.index)
    if layout == "pairwise":
        require_columns(raw, source, {"prompt_field": pp.prompt_field, "chosen_field": pp.chosen_field,
                               "rejected_field": pp.rejected_field})
        n = len(raw)
        group = [f"pair-{i}" for i in range(n)]
        prompts = _texts(raw, pp.prompt_field, "prompt_field", source).tolist()
        long = pd.DataFrame({
            "group": group + group, "input": prompts + prompts,
            "text": _texts(raw, pp.chosen_field, "chosen_field", source).tolist()
            + _texts(raw, pp.rejected_field, "rejected_field", source).tolist(),
            "score": [1.0] * n + [0.0] * n, "reference": refs.tolist() * 2, "split": splits.tolist() * 2,
            "row": list(range(n)) * 2})
        long = long.sort_values(["row", "score"], ascending=[True, False], kind="stable").drop(columns="row")
    else:
        require_columns(raw, source, {"input_field": pp.input_field, "text_field": pp.text_field,
                               "score_field": pp.score_field})
        inputs = _texts(raw, pp.input_field, "input_field", source)
        group = raw[pp.group_field].map(as_text) if pp.group_field in raw.columns else inputs
        long = pd.DataFrame({"group": group, "input": inputs, "text": _texts(raw, pp.text_field, "text_field", source),
                             "score": _scores(raw, pp.score_field, source), "reference": refs, "split": splits})
    return validate_table(long.reset_index(drop=True), schemas.Preferences, source)


def drop_uninformative(long: pd.DataFrame, source: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Groups that rank something: at least two candidates and two different scores. Returns the kept rows and
    the counts of skipped groups; an error when no group is left."""
    by = long.groupby("group", sort=False)
    size, distinct = by["text"].transform("size"), by["score"].transform("nunique")
    keep = (size >= 2) & (distinct >= 2)
    counts = {"groups": int(long["group"].nunique()),
              "skipped_single_candidate": int(long.loc[size < 2, "group"].nunique()),
              "skipped_equal_scores": int(long.loc[(size >= 2) & (distinct < 2), "group"].nunique())}
    if not keep.any():
        raise ValueError(f"{source}: none of the {counts['groups']} groups ranks anything (each needs two "
                         f"candidates with different scores): {counts}")
    return long[keep].reset_index(drop=True), counts


def _heldout(text: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def assign_splits(long: pd.DataFrame, fraction: float, seed: int, source: str) -> pd.DataFrame:
    """``split`` = train / validation for every row: given ones are kept (an input on both sides is an error);
    the rest by a stable hash of the input, so one input's groups never straddle the split."""
    given = long["split"] != ""
    bad = sorted(set(long.loc[given, "split"]) - {"train", "validation"})
    if bad:
        raise ValueError(f"{source}: column 'split' must be train or validation; got {bad[:5]}")
    out = long.copy()
    out.loc[~given, "split"] = ["validation" if _heldout(t, seed, fraction) else "train"
                                for t in out.loc[~given, "input"]]
    both = out.groupby("input")["split"].nunique()
    if (both > 1).any():
        shown = [s[:60] for s in both[both > 1].index[:3]]
        raise ValueError(f"{source}: {int((both > 1).sum())} input(s) are in both the train and the validation "
                         f"split (column 'split'), e.g. {shown}")
    return out


def load(pp: PreferencesParams) -> tuple[pd.DataFrame, dict[str, int]]:
    """The cleaned, split long table of ``pp.path`` and its counts (groups, skipped, per split)."""
    if not pp.path:
        raise ValueError("preferences.path is not set")
    long = normalize(read_raw(pp.path), pp, pp.path)
    long, counts = drop_uninformative(long, pp.path)
    long = assign_splits(long, pp.heldout_fraction, pp.seed, pp.path)
    for split in ("train", "validation"):
        counts[f"{split}_groups"] = int(long.loc[long["split"] == split, "group"].nunique())
    log.info("%s: %s", pp.path, counts)
    return long, counts


# ---------------------------------------------------------------------------------------------------------------
# To ranked groups, mixing
# ---------------------------------------------------------------------------------------------------------------


def ranked_groups(long: pd.DataFrame, tokenizer: Any, backbone: Any, pp: PreferencesParams, mp: Any) -> list[Any]:
    """One RankedGroup per group of ``long`` (in order of first appearance): the prompt through ``prompt_template``
    and the chat template as the pipeline encodes prompts, each candidate ending with the turn-end token."""
    from ptg.guidance.model import RankedGroup
    from ptg.lm.encoding import encode_prompts, encode_responses, turn_end_id
    from ptg.lm.models import is_seq2seq

    groups = list(long.groupby("group", sort=False))
    prompts = encode_prompts(tokenizer, [pp.prompt(g["input"].iloc[0]) for _, g in groups],
                             mp.max_prompt_tokens, is_seq2seq(backbone))
    texts = [t for _, g in groups for t in g["text"]]
    responses = iter(encode_responses(tokenizer, texts, mp.max_target_tokens, turn_end_id(backbone, tokenizer)))
    return [RankedGroup(p, [next(responses) for _ in range(len(g))], g["score"].astype(float).tolist())
            for p, (_, g) in zip(prompts, groups, strict=True)]


def mix_groups(own: Sequence[Any], prefs: Sequence[Any], weight: float, seed: int) -> list[Any]:
    """The training groups of a round: ``own`` and a seeded draw of ``prefs`` making up ``weight`` of the whole
    (drawn without replacement while there are enough, then again). weight 0: ``own``; weight 1: ``prefs``."""
    if weight <= 0 or not prefs:
        return list(own)
    if weight >= 1 or not own:
        return list(prefs)
    n = round(len(own) * weight / (1 - weight))
    rng = random.Random(seed)
    drawn: list[Any] = []
    while len(drawn) < n:
        drawn += rng.sample(list(prefs), min(len(prefs), n - len(drawn)))
    return list(own) + drawn


# ---------------------------------------------------------------------------------------------------------------
# A scored fixture from any examples
# ---------------------------------------------------------------------------------------------------------------

CORRUPTIONS = ("none", "replace_30", "replace_60_shuffle", "other_function")


def corrupt(words: list[str], level: int, vocabulary: list[str], other: list[str], rng: random.Random) -> list[str]:
    """``words`` corrupted to ``level`` (``CORRUPTIONS``): 0 unchanged; 1 a third of the words replaced by words
    drawn from ``vocabulary``; 2 two thirds replaced and the order shuffled; 3 ``other`` (another example's
    reference). Levels 1-2 keep the word count, so length alone cannot tell them apart."""
    if level == 0:
        return list(words)
    if level == 3:
        return list(other)
    out = list(words)
    k = max(1, round(len(out) * (1 / 3 if level == 1 else 2 / 3)))
    for i in rng.sample(range(len(out)), min(k, len(out))):
        out[i] = rng.choice(vocabulary)
    if level == 2:
        rng.shuffle(out)
    return out


def corruption_fixture(examples: pd.DataFrame, seed: int = 0, layout: str = "listwise",
                       levels: Sequence[int] = (0, 1, 2, 3)) -> pd.DataFrame:
    """A scored preference table from ``examples`` (columns id, input, target): per example the target at each of
    ``levels`` (``CORRUPTIONS``; score 3 - level). ``layout="pairwise"``: one (prompt, chosen, rejected) row per
    example, a seeded pair of two different levels. ``reference`` is the uncorrupted target. Level 3 (another
    function's docstring) is told apart only by reading the code; levels 1-2 by the words themselves."""
    rng = random.Random(seed)
    targets = examples["target"].astype(str).tolist()
    vocabulary = sorted({w for t in targets for w in t.split()})
    rows, pairs = [], []
    for i, (ex_id, text, target) in enumerate(zip(examples["id"], examples["input"], targets, strict=True)):
        other = targets[(i + 1 + rng.randrange(len(targets) - 1)) % len(targets)].split()
        candidates = {lv: " ".join(corrupt(target.split(), lv, vocabulary, other, rng)) for lv in levels}
        for level, cand in candidates.items():
            rows.append({"group": str(ex_id), "input": text, "text": cand, "score": float(3 - level),
                         "reference": target, "corruption": CORRUPTIONS[level]})
        a, b = sorted(rng.sample(list(levels), 2))
        pairs.append({"prompt": text, "chosen": candidates[a], "rejected": candidates[b], "reference": target})
    table = pd.DataFrame(rows if layout == "listwise" else pairs)
    if layout == "listwise":  # a corruption can collide with another level's text (one-word targets): keep one
        table = table.drop_duplicates(["group", "text"], keep="first").reset_index(drop=True)
    else:
        table = table[table["chosen"] != table["rejected"]].reset_index(drop=True)
    return table
