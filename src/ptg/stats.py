"""Statistics of the PTG benchmark: paired bootstrap CIs and p-values for PTG vs baseline, and ranking accuracy.

Two questions, both answered with percentile bootstrap confidence intervals and two-sided bootstrap p-values:

* Does the PTG-trained LM beat the baseline LM? ``paired_bootstrap`` takes the per-item metric difference
  PTG - baseline, shape (S seeds, N test items), and resamples items (the same item indices for every seed, since
  both arms and all seeds are scored on the same items) and, when S > 1, seeds too (seeds are a random factor).
* Does a scorer (the guidance, or the ``length_heuristic`` baseline) order the K candidates of each input as the
  preferences do? ``pairwise_agreement`` counts agreeing pairs per group, ``accuracy_ci`` bootstraps the pairwise
  accuracy over groups and ``paired_accuracy_diff`` compares two scorers on the same groups.

Conventions: a higher preference means a more preferred candidate and a higher score means the scorer prefers it.
Every bootstrap is deterministic for a given ``seed`` (``np.random.default_rng(seed)``) and runs in chunks of at
most 1000 resamples (fewer for wide inputs) so memory stays bounded. p-values use +1 smoothing:
``p = min(1, 2 * min(#(boot <= null) + 1, #(boot >= null) + 1) / (n_boot + 1))``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

_CHUNK = 1000  # resamples per chunk, at most
_CELLS = 1 << 22  # resample-count cells per chunk, at most (4M int64 = 32 MiB)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_boot_args(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _chunk_size(n_units: int) -> int:
    return max(1, min(_CHUNK, _CELLS // max(n_units, 1)))


def _resample_counts(rng: np.random.Generator, n_units: int, size: int) -> np.ndarray:
    """How often each of ``n_units`` units is drawn in each of ``size`` resamples with replacement: (size, n_units)."""
    idx = rng.integers(0, n_units, size=(size, n_units))
    flat = (idx + np.arange(size)[:, None] * n_units).ravel()
    return np.bincount(flat, minlength=size * n_units).reshape(size, n_units)


def _bootstrap_units(n_units: int, n_boot: int, rng: np.random.Generator,
                     stat: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``stat`` of ``n_boot`` resamples of ``n_units`` units: ``stat`` maps counts (B, n_units) to values (B,)."""
    chunk = _chunk_size(n_units)
    out = [stat(_resample_counts(rng, n_units, min(chunk, n_boot - start))) for start in range(0, n_boot, chunk)]
    return np.concatenate(out)


def _percentile_ci(boot: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _two_sided_p(boot: np.ndarray, null: float) -> float:
    """Two-sided bootstrap p-value of ``null`` with +1 smoothing, at most 1."""
    n = boot.size
    below = int(np.count_nonzero(boot <= null))
    above = int(np.count_nonzero(boot >= null))
    return float(min(1.0, 2.0 * min(below + 1, above + 1) / (n + 1)))


def _require_columns(frame: pd.DataFrame, name: str, columns: list[str]) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; it has {list(frame.columns)}")


def _numeric_column(frame: pd.DataFrame, name: str, column: str) -> np.ndarray:
    try:
        values = pd.to_numeric(frame[column], errors="raise").to_numpy(dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}[{column!r}] must be numeric: {err}") from err
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}[{column!r}] has {int(np.sum(~np.isfinite(values)))} NaN or infinite value(s)")
    return values


# ---------------------------------------------------------------------------------------------------------------
# PTG vs baseline
# ---------------------------------------------------------------------------------------------------------------


def paired_bootstrap(diff: np.ndarray, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean per-item difference PTG - baseline with a two-level (items x seeds) percentile bootstrap CI.

    ``diff``: (S, N), row s = training/evaluation seed, column n = test item, value = metric(PTG) - metric(baseline)
    on that item with that seed. The statistic is the mean over all S * N cells. Each resample draws N item indices
    with replacement, the same ones for every seed (items are the shared unit), and, when S > 1, S seed indices
    with replacement. Items and seeds come from two independent streams spawned from
    ``np.random.default_rng(seed)``, so the item draws do not depend on S.

    Returns ``{"mean", "lo", "hi", "p_value", "n_items": N, "n_seeds": S}``; ``p_value`` is the two-sided bootstrap
    p-value of a zero mean difference.
    """
    try:
        d = np.asarray(diff, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"diff must be a numeric array of shape (S, N): {err}") from err
    if d.ndim != 2:
        raise ValueError(f"diff must be 2-D of shape (S seeds, N items), got shape {d.shape}")
    if d.size == 0:
        raise ValueError(f"diff is empty (shape {d.shape}); it needs at least one seed and one item")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"diff has {int(np.sum(~np.isfinite(d)))} NaN or infinite value(s)")
    _check_boot_args(n_boot, level)

    n_seeds, n_items = d.shape
    item_rng, seed_rng = np.random.default_rng(seed).spawn(2)
    chunk = _chunk_size(max(n_items, n_seeds))
    boots = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        item_counts = _resample_counts(item_rng, n_items, size)  # (B, N)
        per_seed = item_counts @ d.T  # (B, S): each seed's sum over the resampled items
        if n_seeds > 1:
            per_seed = per_seed * _resample_counts(seed_rng, n_seeds, size)
        boots.append(per_seed.sum(axis=1) / (n_seeds * n_items))
    boot = np.concatenate(boots)

    lo, hi = _percentile_ci(boot, level)
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "p_value": _two_sided_p(boot, 0.0),
            "n_items": n_items, "n_seeds": n_seeds}


# ---------------------------------------------------------------------------------------------------------------
# Ranking accuracy of a scorer
# ---------------------------------------------------------------------------------------------------------------


def pairwise_agreement(groups: pd.DataFrame, score_col: str, pref_col: str = "preference",
                       group_col: str = "id") -> pd.DataFrame:
    """Per group, how many candidate pairs the score orders as the preference does.

    ``groups``: one row per candidate, (sum of K_g, ...) with columns ``group_col``, ``score_col`` and ``pref_col``;
    groups may have different K. Over all unordered pairs of a group whose preferences differ, a pair counts 1 if
    the score orders it as the preference does, 0.5 if the scores tie and 0 otherwise.

    Returns one row per group with at least one such pair (groups with none are dropped), in order of first
    appearance: columns ``group_col``, ``"agree"`` (float) and ``"pairs"`` (int).
    """
    _require_columns(groups, "groups", [group_col, score_col, pref_col])
    if groups[group_col].isna().any():
        raise ValueError(f"groups[{group_col!r}] has {int(groups[group_col].isna().sum())} missing group id(s)")
    scores = _numeric_column(groups, "groups", score_col)
    prefs = _numeric_column(groups, "groups", pref_col)

    sub = pd.DataFrame({"g": groups[group_col].to_numpy(), "s": scores, "p": prefs, "r": np.arange(len(groups))})
    pairs = sub.merge(sub, on="g", suffixes=("_i", "_j"))
    pairs = pairs[(pairs["r_i"] < pairs["r_j"]) & (pairs["p_i"] != pairs["p_j"])]
    ds = (pairs["s_i"] - pairs["s_j"]).to_numpy()
    dp = (pairs["p_i"] - pairs["p_j"]).to_numpy()
    credit = np.where(ds == 0, 0.5, (np.sign(ds) == np.sign(dp)).astype(float))
    out = (pd.DataFrame({"g": pairs["g"].to_numpy(), "agree": credit})
           .groupby("g", sort=False)["agree"].agg(["sum", "size"]).reset_index())
    out.columns = [group_col, "agree", "pairs"]
    if out.empty:  # keep the group column's dtype even with no comparable pair
        out[group_col] = out[group_col].astype(groups[group_col].dtype)
    return out.astype({"agree": float, "pairs": np.int64})


def _check_per_group(per_group: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(agree, pairs) of an output of ``pairwise_agreement``, validated: (G,) each."""
    _require_columns(per_group, name, ["agree", "pairs"])
    if per_group.empty:
        raise ValueError(f"{name} has no groups (no group had a pair with different preferences)")
    agree = _numeric_column(per_group, name, "agree")
    pairs = _numeric_column(per_group, name, "pairs")
    if np.any(pairs <= 0):
        raise ValueError(f"{name}['pairs'] must be positive in every group")
    if np.any(agree < 0) or np.any(agree > pairs):
        raise ValueError(f"{name}['agree'] must lie in [0, pairs] in every group")
    return agree, pairs


def accuracy_ci(per_group: pd.DataFrame, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                chance: float = 0.5) -> dict[str, float]:
    """Pairwise accuracy sum(agree) / sum(pairs) with a percentile bootstrap CI over groups.

    ``per_group``: (G, ...) output of ``pairwise_agreement``. Each resample draws G groups with replacement and
    takes the ratio of the sums. Returns ``{"accuracy", "lo", "hi", "p_vs_chance", "groups": G, "pairs"}``;
    ``p_vs_chance`` is the two-sided bootstrap p-value of accuracy == ``chance``.
    """
    agree, pairs = _check_per_group(per_group, "per_group")
    _check_boot_args(n_boot, level)
    if not 0.0 <= float(chance) <= 1.0:
        raise ValueError(f"chance must be in [0, 1], got {chance!r}")

    boot = _bootstrap_units(agree.size, n_boot, np.random.default_rng(seed),
                            lambda counts: (counts @ agree) / (counts @ pairs))
    lo, hi = _percentile_ci(boot, level)
    return {"accuracy": float(agree.sum() / pairs.sum()), "lo": lo, "hi": hi,
            "p_vs_chance": _two_sided_p(boot, float(chance)), "groups": int(agree.size), "pairs": int(pairs.sum())}


def paired_accuracy_diff(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                         group_col: str = "id") -> dict[str, float]:
    """Difference of the pairwise accuracies of two scorers on the same groups, bootstrapped over groups jointly.

    ``a``, ``b``: (G_a, ...) and (G_b, ...) outputs of ``pairwise_agreement``, inner-joined on ``group_col``
    (G common groups). Each resample draws G groups with replacement and applies the same draw to both scorers.
    Returns ``{"diff": acc_a - acc_b, "lo", "hi", "p_value", "groups": G}``; ``p_value`` is the two-sided bootstrap
    p-value of a zero difference.
    """
    for name, frame in (("a", a), ("b", b)):
        _require_columns(frame, name, [group_col, "agree", "pairs"])
        if frame[group_col].duplicated().any():
            raise ValueError(f"{name}[{group_col!r}] has duplicated group ids; pass one row per group")
    _check_boot_args(n_boot, level)
    joined = a[[group_col, "agree", "pairs"]].merge(b[[group_col, "agree", "pairs"]], on=group_col,
                                                   suffixes=("_a", "_b"))
    if joined.empty:
        raise ValueError(f"a and b share no group in column {group_col!r}")
    agree_a, pairs_a = _check_per_group(joined.rename(columns={"agree_a": "agree", "pairs_a": "pairs"}), "a")
    agree_b, pairs_b = _check_per_group(joined.rename(columns={"agree_b": "agree", "pairs_b": "pairs"}), "b")

    def stat(counts: np.ndarray) -> np.ndarray:
        return (counts @ agree_a) / (counts @ pairs_a) - (counts @ agree_b) / (counts @ pairs_b)

    boot = _bootstrap_units(len(joined), n_boot, np.random.default_rng(seed), stat)
    lo, hi = _percentile_ci(boot, level)
    diff = agree_a.sum() / pairs_a.sum() - agree_b.sum() / pairs_b.sum()
    return {"diff": float(diff), "lo": lo, "hi": hi, "p_value": _two_sided_p(boot, 0.0), "groups": len(joined)}


def length_heuristic(groups: pd.DataFrame, length_col: str = "n_tokens", pref_col: str = "preference",
                     group_col: str = "id", fit: pd.DataFrame | None = None) -> tuple[pd.Series, int]:
    """A baseline scorer ranking candidates by length, in the direction that agrees best with preferences on ``fit``.

    ``groups``: one row per candidate, columns ``group_col``, ``length_col`` and ``pref_col``. The direction
    (+1: longer is better, -1: shorter is better) is the one with the higher pairwise accuracy on ``fit`` (e.g. the
    training groups; same columns), +1 on a tie; on ``groups`` itself when ``fit`` is None. Ties in length count
    one half either way, so accuracy(-1) = 1 - accuracy(+1) and +1 is chosen iff accuracy(+1) >= 0.5.

    Returns (``direction * length`` as a float Series aligned with ``groups.index``, shape (len(groups),);
    the direction). Raises ValueError when the frame the direction is chosen on has no comparable pair.
    """
    _require_columns(groups, "groups", [group_col, length_col, pref_col])
    lengths = _numeric_column(groups, "groups", length_col)
    name, frame = ("groups", groups) if fit is None else ("fit", fit)
    _require_columns(frame, name, [group_col, length_col, pref_col])

    counts = pairwise_agreement(frame, length_col, pref_col=pref_col, group_col=group_col)
    if counts.empty:
        raise ValueError(f"{name} has no pair of candidates with different preferences to choose a direction on")
    direction = 1 if counts["agree"].sum() >= 0.5 * counts["pairs"].sum() else -1
    return pd.Series(direction * lengths, index=groups.index, name=f"{length_col}_score"), direction


def guidance_vs_length(held: pd.DataFrame, fit: pd.DataFrame | None = None, score_col: str = "guidance"
                       ) -> dict[str, dict[str, float]]:
    """Held-out pairwise accuracy of ``score_col`` with its CI, of ranking by length (``n_tokens``, direction chosen
    on ``fit`` when given), and their paired difference. ``held``/``fit``: one row per candidate with columns id,
    preference, n_tokens and ``score_col``."""
    guided = pairwise_agreement(held, score_col)
    length_score, direction = length_heuristic(held, fit=fit)
    by_length = pairwise_agreement(held.assign(length=length_score), "length")
    return {"guidance": accuracy_ci(guided), "length": accuracy_ci(by_length) | {"direction": direction},
            "guidance_minus_length": paired_accuracy_diff(guided, by_length)}
