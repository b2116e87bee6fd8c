"""The human-in-the-loop round trip: round r's samples go out as a sheet people score, and their scores come back
as the ``HumanScores`` table (id, text, score) that ``rank.metric: file`` reads from ``rank.scores_file``.

``export_samples`` and ``import_scores`` are pure table functions; ``export_round`` and ``import_round`` read and
write the files of the DVC project in the working directory. Run from the project folder:
``ptg annotate export --round R --out sheet.csv``, fill the ``score`` column (higher = better), then
``ptg annotate import sheet.csv --round R --out scores.csv``.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ptg import pipeline, schemas
from ptg.io import MAX_ROWS_SHOWN, TableError, read_records, read_table, short, write_records

SHEET_COLUMNS = ["item", "id", "input", "candidate", "score"]
SHEET_FORMATS = (".csv", ".jsonl")  # what people open in a spreadsheet or an annotation tool
_KEY = ["id", "candidate"]

# What can be wrong with one score cell.
_BLANK = "blank"
_NOT_NUMBER = "not a number"
_NOT_FINITE = "not finite"


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def _shuffled(texts: list[str], seed: int, id_: str) -> list[str]:
    """``texts`` in an order drawn from (seed, id) alone, so other ids' candidates never change it."""
    digest = hashlib.sha256(f"{seed}/{id_}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(texts))
    return [texts[i] for i in order]


def export_samples(samples: pd.DataFrame, examples: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The sheet people score (schema ``AnnotationSheet``): one row per distinct (id, sample text), ``score`` empty.

    ``samples`` is a Samples table, ``examples`` Examples holding every sampled id (``input`` is shown). Ids come
    in sorted order; an id's candidates in a seeded shuffled order, so annotators do not see the sampling order, and
    a text sampled twice for one id appears once (its score goes back to both samples). ``item`` is
    ``"<id>#<position>"``, a row key unique in the sheet.
    """
    inputs = examples.set_index("id")["input"]
    unknown = sorted(set(samples["id"]) - set(inputs.index))
    if unknown:
        raise ValueError(f"samples of {len(unknown)} id(s) have no prepared example, e.g. {unknown[:MAX_ROWS_SHOWN]}")
    distinct = samples.sort_values(["id", "sample_idx"], kind="stable").drop_duplicates(["id", "text"])
    rows = [{"item": f"{id_}#{k}", "id": id_, "input": inputs[id_], "candidate": text, "score": None}
            for id_, group in distinct.groupby("id", sort=True)
            for k, text in enumerate(_shuffled(group["text"].tolist(), seed, str(id_)))]
    return pd.DataFrame(rows, columns=SHEET_COLUMNS)


# ---------------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------------


def _parse_score(value: Any) -> float | str:
    """A score cell as a finite float, or what is wrong with it (``_BLANK``, ``_NOT_NUMBER``, ``_NOT_FINITE``).

    JSON null and a float NaN (what pandas makes of a null) are blank, as is an empty or all-space string; the
    strings "nan" and "inf" are numbers that are not finite.
    """
    if isinstance(value, str):
        if not value.strip():
            return _BLANK
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        return _BLANK
    elif isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return _NOT_NUMBER
    try:
        number = float(value)
    except ValueError:
        return _NOT_NUMBER
    return number if math.isfinite(number) else _NOT_FINITE


def _rows(sheet: pd.DataFrame, mask: pd.Series, columns: list[str], what: str) -> list[str]:
    """One report line for the rows of ``sheet`` where ``mask`` holds (none when it holds nowhere): how many, what
    is wrong, and the first few as ``row N (item ...) column=value``; rows count from 1 after the header."""
    index = sheet.index[mask.to_numpy(dtype=bool)]
    if index.empty:
        return []
    shown = []
    for i in index[:MAX_ROWS_SHOWN]:
        item = f" (item {short(sheet.at[i, 'item'])})" if "item" in sheet.columns else ""
        shown.append(f"row {i + 1}{item} " + ", ".join(f"{c}={short(sheet.at[i, c])}" for c in columns))
    more = f" (+{len(index) - MAX_ROWS_SHOWN} more)" if len(index) > MAX_ROWS_SHOWN else ""
    named = ", ".join(repr(c) for c in columns)
    return [f"  column{'s' * (len(columns) > 1)} {named}: {len(index)} row(s) {what}: " + "; ".join(shown) + more]


def _unscored(pairs: pd.DataFrame, sheet_keys: set[tuple[str, str]]) -> list[str]:
    """The report line for (id, text) pairs of the samples that have no row in the sheet at all."""
    absent = [(i, t) for i, t in zip(pairs["id"], pairs["text"], strict=True) if (i, t) not in sheet_keys]
    if not absent:
        return []
    shown = "; ".join(f"id={short(i)}, candidate={short(t)}" for i, t in absent[:MAX_ROWS_SHOWN])
    more = f" (+{len(absent) - MAX_ROWS_SHOWN} more)" if len(absent) > MAX_ROWS_SHOWN else ""
    return [f"  columns 'id', 'candidate': {len(absent)} sampled candidate(s) have no row (every candidate of every"
            f" id needs a score; was a row deleted or a candidate edited?): {shown}{more}"]


def _score_problems(sheet: pd.DataFrame, parsed: pd.Series, score: pd.Series,
                    score_range: tuple[float, float] | None) -> list[str]:
    """Report lines for score cells that are blank, not numbers, not finite or outside ``score_range``."""
    lo, hi = score_range if score_range is not None else (-math.inf, math.inf)
    return [
        *_rows(sheet, parsed.eq(_BLANK), ["score"], "have no score (every candidate needs one)"),
        *_rows(sheet, parsed.eq(_NOT_NUMBER), ["score"], "hold something that is not a number"),
        *_rows(sheet, parsed.eq(_NOT_FINITE), ["score"], "hold NaN or an infinite score"),
        *_rows(sheet, score.notna() & ~score.between(lo, hi), ["score"], f"hold a score outside [{lo:g}, {hi:g}]"),
    ]


def import_scores(annotated: pd.DataFrame, samples: pd.DataFrame, source: str,
                  score_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """The ``HumanScores`` table (id, text, score) of a scored sheet, one row per distinct (id, text) of
    ``samples``, in sample order; ``rank.metric: file`` maps each score back to every sample with that text.

    ``annotated`` is the sheet ``export_samples`` wrote with its ``score`` column filled (extra columns, such as an
    annotator's notes, are ignored); ``source`` names it in errors. Every problem is collected into one
    ``TableError`` naming ``source``, the column and example rows: a missing column, a blank, non-numeric or
    non-finite score, a score outside ``score_range`` (inclusive), a row whose (id, candidate) is not among
    ``samples`` (a stale sheet or an edited id or candidate), one (id, candidate) scored differently twice, and a
    sampled candidate with no row.
    """
    absent = [c for c in ("id", "candidate", "score") if c not in annotated.columns]
    if absent:
        raise TableError(f"{source}: missing column(s) {', '.join(map(repr, absent))}; the exported sheet has "
                         f"columns {', '.join(SHEET_COLUMNS)}")
    if score_range is not None and score_range[0] > score_range[1]:
        raise ValueError(f"score range: min {score_range[0]} is above max {score_range[1]}")
    sheet = annotated.reset_index(drop=True).assign(id=lambda d: d["id"].astype(str),
                                                   candidate=lambda d: d["candidate"].astype(str))
    parsed = sheet["score"].map(_parse_score)
    numeric = parsed.map(lambda v: isinstance(v, float))
    score = parsed.where(numeric).astype(float)
    keys = list(zip(sheet["id"], sheet["candidate"], strict=True))
    pairs = samples.sort_values(["id", "sample_idx"], kind="stable").drop_duplicates(["id", "text"])[["id", "text"]]
    sampled = set(zip(pairs["id"], pairs["text"], strict=True))
    known = pd.Series([k in sampled for k in keys], index=sheet.index, dtype=bool)
    usable = numeric & known
    by_key = score[usable].groupby([sheet["id"][usable], sheet["candidate"][usable]])
    conflicting = by_key.transform("nunique").reindex(sheet.index).gt(1)
    problems = [
        *_score_problems(sheet, parsed, score, score_range),
        *_rows(sheet, ~known, _KEY, "are not among the round's samples (a stale sheet, or an edited id or candidate)"),
        *_rows(sheet, conflicting, [*_KEY, "score"], "score the same (id, candidate) differently"),
        *_unscored(pairs, set(keys)),
    ]
    if problems:
        raise TableError(f"{source}: {len(problems)} problem(s) with the scores:\n" + "\n".join(problems))
    scored = pd.DataFrame({"id": sheet["id"], "text": sheet["candidate"], "score": score})[usable]
    return pairs.merge(scored.drop_duplicates(["id", "text"]), on=["id", "text"], how="left").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Files of a DVC project (paths relative to the working directory)
# ---------------------------------------------------------------------------------------------------------------


def _round_samples(r: int) -> pd.DataFrame:
    return read_table(pipeline.round_dir(r) / "samples.parquet", schemas.Samples)


def export_round(r: int, out: str | os.PathLike[str], seed: int = 0) -> pd.DataFrame:
    """Write round ``r``'s sheet to ``out`` (.csv or .jsonl) atomically; returns the sheet."""
    if Path(out).suffix.lower() not in SHEET_FORMATS:
        raise ValueError(f"{out}: write the sheet as {' or '.join(SHEET_FORMATS)}")
    sheet = export_samples(_round_samples(r), pipeline.read_examples("train", "validation"), seed)
    return write_records(sheet, out, schemas.AnnotationSheet)


def import_round(path: str | os.PathLike[str], r: int, out: str | os.PathLike[str],
                 score_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """Check the scored sheet at ``path`` against round ``r``'s samples and write its ``HumanScores`` to ``out``
    (.csv, .jsonl or .parquet) atomically; on any problem nothing is written. Returns the scores."""
    scores = import_scores(read_records(path), _round_samples(r), str(path), score_range)
    return write_records(scores, out, schemas.HumanScores)
