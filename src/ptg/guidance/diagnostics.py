"""Does the guidance know which tokens mattered? Diagnostics of a fitted guidance on held-out samples, pure math
over numbers the fit_guidance stage gathers (``fit_guidance.json``):

- ``clear_pair_accuracy``: pairwise ranking accuracy on the held-out pairs whose preference differs by a clear
  margin (at least the median absolute difference of all held-out pairs), where a near-tie of the metric cannot
  hide a guidance that ranks at chance;
- ``occlusions`` / ``occlusion_agreement``: occlusion credit, the change in a sample's sequence-level score when
  each of its tokens is dropped, and the mean Spearman correlation between it and the guidance's token rewards:
  whether the tokens the guidance pays for are those whose loss costs the metric most.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def clear_pair_accuracy(scores: Sequence[Sequence[float]], preferences: Sequence[Sequence[float]],
                        margin: float | None = None) -> dict[str, float]:
    """Pairwise accuracy of ``scores`` against ``preferences`` (one list per group, K items each; a higher
    preference is better) over the within-group pairs whose preferences differ by at least ``margin`` (default:
    the median absolute difference of all pairs with different preferences). A pair the scores tie counts one
    half, as ``ptg.guidance.model.pairwise_accuracy``. Returns accuracy, pairs and the margin used."""
    diffs, agree = [], []
    for s, p in zip(scores, preferences, strict=True):
        if len(s) != len(p):
            raise ValueError(f"a group has {len(s)} scores and {len(p)} preferences")
        for i in range(len(p)):
            for j in range(i + 1, len(p)):
                dp, ds = p[i] - p[j], s[i] - s[j]
                if dp != 0:
                    diffs.append(abs(dp))
                    agree.append(1.0 if ds * dp > 0 else 0.5 if ds == 0 else 0.0)
    if not diffs:
        return {"accuracy": float("nan"), "pairs": 0, "margin": float("nan")}
    d = np.asarray(diffs)
    cut = float(np.median(d)) if margin is None else margin
    kept = d >= cut
    return {"accuracy": float(np.mean(np.asarray(agree)[kept])) if kept.any() else float("nan"),
            "pairs": int(kept.sum()), "margin": cut}


def occlusions(token_ids: Sequence[int]) -> list[list[int]]:
    """The sample with each of its tokens dropped in turn: T variants of T - 1 tokens."""
    ids = list(token_ids)
    return [ids[:t] + ids[t + 1:] for t in range(len(ids))]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant or has < 2 values."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two equally long sequences; got {a.shape} and {b.shape}")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = v.argsort(kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=np.float64)
        for value in np.unique(v):  # ties share their average rank
            same = v == value
            r[same] = r[same].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def occlusion_agreement(rewards: Sequence[Sequence[float]], full: Sequence[float],
                        dropped: Sequence[Sequence[float]]) -> dict[str, float]:
    """Mean Spearman correlation between each sample's token rewards and its occlusion credit, full score minus
    the score with that token dropped (a token whose loss costs the metric more has more credit). ``rewards`` and
    ``dropped``: one list per sample, one value per token; ``full``: one score per sample. Samples where either
    side is constant (a metric no single token moves) have no correlation and are counted apart."""
    rhos = []
    for r, f, d in zip(rewards, full, dropped, strict=True):
        rhos.append(spearman(r, [f - x for x in d]))
    defined = [x for x in rhos if not np.isnan(x)]
    return {"spearman": float(np.mean(defined)) if defined else float("nan"), "samples": len(defined),
            "undefined": len(rhos) - len(defined)}
