"""From per-sample preference scores to ranks within each input's group (rank 1 = most preferred)."""

from __future__ import annotations

import pandas as pd


def rank_within_groups(scores: pd.DataFrame) -> pd.DataFrame:
    """Add ``rank`` to a frame of id, sample_idx, score: 1..K within each id by descending score, ties broken by
    sample_idx (ListMLE breaks them randomly again when fitting)."""
    ordered = scores.sort_values(["id", "score", "sample_idx"], ascending=[True, False, True], kind="stable")
    ordered["rank"] = ordered.groupby("id", sort=False).cumcount() + 1
    return ordered.sort_values(["id", "sample_idx"], kind="stable").reset_index(drop=True)


def unfinished_last(scores: pd.Series, finished: pd.Series) -> pd.Series:
    """Ranking scores with every unfinished sample (``finished`` False) below every finished one: unfinished scores
    are lowered by more than the spread of all scores, so the order within each class is the score's."""
    offset = float(scores.max() - scores.min()) + 1.0
    return scores - offset * (~finished.astype(bool)).astype(float)


def human_scores(samples: pd.DataFrame, scores: pd.DataFrame, source: str) -> list[float]:
    """Look up each sample's score by (id, text) in a human-scores table; a missing pair, and a pair scored twice
    differently, are errors naming it."""
    spread = scores.groupby(["id", "text"], sort=False)["score"].agg(["nunique", list])
    twice = spread[spread["nunique"] > 1]
    if not twice.empty:
        shown = "; ".join(f"id={i!r} text={t[:60]!r}: {s}" for (i, t), s in twice["list"][:5].items())
        raise ValueError(f"{source}: {len(twice)} (id, text) pair(s) have different scores in different rows, "
                         f"e.g. {shown}")
    lookup = scores.drop_duplicates(["id", "text"], keep="last").set_index(["id", "text"])["score"]
    keys = list(zip(samples["id"], samples["text"], strict=True))
    missing = [k for k in keys if k not in lookup.index]
    if missing:
        shown = "; ".join(f"id={i!r} text={t[:60]!r}" for i, t in missing[:5])
        raise ValueError(f"{source}: no score for {len(missing)} sample(s), e.g. {shown}")
    return [float(lookup[k]) for k in keys]
