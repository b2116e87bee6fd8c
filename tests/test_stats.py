"""Tests for ptg.stats: paired two-level bootstrap, pairwise agreement, accuracy CIs and the length heuristic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ptg.stats import accuracy_ci, length_heuristic, paired_accuracy_diff, paired_bootstrap, pairwise_agreement


def random_groups(n_groups: int, k: int, seed: int = 0) -> pd.DataFrame:
    """n_groups groups of k candidates with distinct random preferences."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": np.repeat([f"g{i}" for i in range(n_groups)], k),
                         "preference": rng.permutation(n_groups * k).astype(float)})


# ---------------------------------------------------------------------------------------------------------------
# pairwise_agreement
# ---------------------------------------------------------------------------------------------------------------


def test_pairwise_agreement_hand_computed_with_ties_and_unequal_k() -> None:
    rows = [  # (group, preference, score); rows of different groups interleaved, non-default index
        ("a", 3, 0.9), ("b", 1, 0.5), ("a", 2, 0.9), ("c", 1, 1.0), ("a", 1, 0.1), ("b", 2, 0.2),
        ("c", 1, 2.0), ("c", 2, 3.0), ("d", 5, 1.0), ("c", 2, 0.0), ("d", 5, 2.0),
    ]
    frame = pd.DataFrame(rows, columns=["item", "pref", "s"], index=np.arange(100, 100 + len(rows)))
    out = pairwise_agreement(frame, "s", pref_col="pref", group_col="item")
    # a (K=3): (3,2) score tie 0.5, (3,1) agree, (2,1) agree -> 2.5 of 3
    # b (K=2): preference says the second, score the first -> 0 of 1
    # c (K=4, preference ties): only the 4 cross pairs count; (1.0 vs 3.0) and (2.0 vs 3.0) agree -> 2 of 4
    # d: equal preferences, no comparable pair -> dropped
    assert list(out.columns) == ["item", "agree", "pairs"]
    assert out["item"].tolist() == ["a", "b", "c"]
    assert out["agree"].tolist() == [2.5, 0.0, 2.0]
    assert out["pairs"].tolist() == [3, 1, 4]


def test_pairwise_agreement_of_the_preference_itself_and_its_negation() -> None:
    frame = random_groups(30, 5, seed=1)
    frame["good"] = frame["preference"] * 2.0
    frame["bad"] = -frame["preference"]
    good = pairwise_agreement(frame, "good")
    bad = pairwise_agreement(frame, "bad")
    assert (good["pairs"] == 10).all() and (good["agree"] == 10).all()
    assert (bad["agree"] == 0).all()


def test_pairwise_agreement_rejects_bad_input() -> None:
    frame = random_groups(3, 3)
    with pytest.raises(ValueError, match="score"):
        pairwise_agreement(frame, "score")
    frame["score"] = 1.0
    frame.loc[0, "score"] = np.nan
    with pytest.raises(ValueError, match="'score'.*NaN"):
        pairwise_agreement(frame, "score")


# ---------------------------------------------------------------------------------------------------------------
# accuracy_ci
# ---------------------------------------------------------------------------------------------------------------


def test_accuracy_of_a_perfect_scorer_is_one_with_a_degenerate_ci() -> None:
    frame = random_groups(40, 4, seed=2)
    frame["score"] = frame["preference"] + 100.0
    res = accuracy_ci(pairwise_agreement(frame, "score"), n_boot=999)
    assert res["accuracy"] == res["lo"] == res["hi"] == 1.0
    assert res["p_vs_chance"] == pytest.approx(2 / 1000)
    assert res["groups"] == 40 and res["pairs"] == 40 * 6


def test_accuracy_of_a_constant_scorer_is_chance() -> None:
    frame = random_groups(40, 4, seed=3)
    frame["score"] = 7.0
    res = accuracy_ci(pairwise_agreement(frame, "score"), n_boot=500)
    assert res["accuracy"] == res["lo"] == res["hi"] == 0.5
    assert res["p_vs_chance"] == 1.0


def test_accuracy_is_a_ratio_of_sums_not_a_mean_of_ratios() -> None:
    per_group = pd.DataFrame({"id": ["x", "y"], "agree": [1.0, 0.0], "pairs": [1, 3]})
    res = accuracy_ci(per_group, n_boot=200)
    assert res["accuracy"] == 0.25
    assert 0.0 <= res["lo"] <= 0.25 <= res["hi"] <= 1.0
    # Resamples are {x, x} -> 1, {y, y} -> 0 (1/4 each) and {x, y} -> 0.25 (1/2): the middle 40% is all 0.25
    # (a mean of per-group ratios would give 0.5 there).
    res = accuracy_ci(per_group, n_boot=2000, level=0.4)
    assert res["lo"] == res["hi"] == 0.25


def test_accuracy_ci_width_matches_the_binomial_standard_error() -> None:
    rng = np.random.default_rng(4)
    n_groups = 2000  # one pair per group: the accuracy is a binomial proportion
    agree = (rng.random(n_groups) < 0.7).astype(float)
    per_group = pd.DataFrame({"id": np.arange(n_groups), "agree": agree, "pairs": 1})
    res = accuracy_ci(per_group, n_boot=4000, seed=1)
    p = agree.mean()
    half = 1.959964 * np.sqrt(p * (1 - p) / n_groups)
    assert res["hi"] - res["lo"] == pytest.approx(2 * half, rel=0.1)
    assert res["lo"] < p < res["hi"]
    assert res["p_vs_chance"] < 0.01


def test_accuracy_ci_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="per_group.*no groups"):
        accuracy_ci(pd.DataFrame({"id": [], "agree": [], "pairs": []}))
    with pytest.raises(ValueError, match="agree"):
        accuracy_ci(pd.DataFrame({"id": [1], "agree": [3.0], "pairs": [2]}))
    with pytest.raises(ValueError, match="level"):
        accuracy_ci(pd.DataFrame({"id": [1], "agree": [1.0], "pairs": [2]}), level=1.0)


# ---------------------------------------------------------------------------------------------------------------
# paired_accuracy_diff
# ---------------------------------------------------------------------------------------------------------------


def test_paired_accuracy_diff_of_a_scorer_with_itself_is_exactly_zero() -> None:
    frame = random_groups(50, 4, seed=5)
    frame["score"] = frame["preference"] + np.random.default_rng(0).normal(0, 20, len(frame))
    per_group = pairwise_agreement(frame, "score")
    res = paired_accuracy_diff(per_group, per_group, n_boot=500)
    assert res["diff"] == res["lo"] == res["hi"] == 0.0
    assert res["p_value"] == 1.0


def test_paired_accuracy_diff_perfect_vs_constant() -> None:
    frame = random_groups(60, 3, seed=6)
    frame["perfect"] = frame["preference"]
    frame["constant"] = 0.0
    res = paired_accuracy_diff(pairwise_agreement(frame, "perfect"), pairwise_agreement(frame, "constant"),
                               n_boot=500)
    assert res["diff"] == res["lo"] == res["hi"] == 0.5
    assert res["p_value"] == pytest.approx(2 / 501)
    assert res["groups"] == 60


def test_paired_accuracy_diff_aligns_groups_and_resamples_them_jointly() -> None:
    rng = np.random.default_rng(7)
    n_groups = 300
    ids = np.arange(n_groups)
    pairs = rng.integers(1, 11, n_groups)
    agree_a = rng.binomial(pairs, 0.6).astype(float)
    agree_b = np.maximum(agree_a - (rng.random(n_groups) < 0.1), 0.0)  # b = a, one pair worse in ~10% of groups
    a = pd.DataFrame({"id": ids, "agree": agree_a, "pairs": pairs})
    b = pd.DataFrame({"id": ids, "agree": agree_b, "pairs": pairs})
    res = paired_accuracy_diff(a, b, n_boot=2000)
    # b shuffled and padded with groups a lacks: the inner join gives the same answer
    extra = pd.DataFrame({"id": [-1, -2], "agree": [0.0, 5.0], "pairs": [5, 5]})
    shuffled = pd.concat([b.sample(frac=1.0, random_state=0), extra], ignore_index=True)
    assert paired_accuracy_diff(a, shuffled, n_boot=2000) == pytest.approx(res)

    assert res["diff"] == pytest.approx(agree_a.sum() / pairs.sum() - agree_b.sum() / pairs.sum())
    assert 0.0 < res["lo"] < res["diff"] < res["hi"]
    assert res["p_value"] < 0.01
    # joint resampling cancels the shared between-group variance: the paired CI is far narrower than either CI
    width_a = accuracy_ci(a, n_boot=2000)["hi"] - accuracy_ci(a, n_boot=2000)["lo"]
    assert res["hi"] - res["lo"] < 0.5 * width_a


def test_paired_accuracy_diff_rejects_disjoint_or_duplicated_groups() -> None:
    a = pd.DataFrame({"id": [1, 2], "agree": [1.0, 0.0], "pairs": [1, 1]})
    b = pd.DataFrame({"id": [3, 4], "agree": [1.0, 0.0], "pairs": [1, 1]})
    with pytest.raises(ValueError, match="share no group"):
        paired_accuracy_diff(a, b)
    with pytest.raises(ValueError, match="duplicated"):
        paired_accuracy_diff(a, pd.concat([a, a]))


# ---------------------------------------------------------------------------------------------------------------
# paired_bootstrap
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 30), (4, 30)])
def test_paired_bootstrap_of_a_constant_difference(shape: tuple[int, int]) -> None:
    res = paired_bootstrap(np.full(shape, 0.3), n_boot=999)
    assert res["mean"] == pytest.approx(0.3)
    assert res["lo"] == pytest.approx(0.3) and res["hi"] == pytest.approx(0.3)
    assert res["p_value"] == pytest.approx(2 / 1000)
    assert (res["n_seeds"], res["n_items"]) == shape
    assert paired_bootstrap(np.zeros(shape), n_boot=999)["p_value"] == 1.0


def test_paired_bootstrap_detects_a_real_effect_and_its_ci_has_the_right_width() -> None:
    rng = np.random.default_rng(8)
    diff = rng.normal(0.5, 1.0, size=(1, 2000))
    res = paired_bootstrap(diff, n_boot=4000)
    assert res["mean"] == pytest.approx(diff.mean())
    assert res["lo"] < 0.5 < res["hi"]
    assert res["lo"] > 0.0
    assert res["p_value"] < 0.001
    half = 1.959964 * diff.std(ddof=1) / np.sqrt(diff.size)
    assert res["hi"] - res["lo"] == pytest.approx(2 * half, rel=0.1)


def test_paired_bootstrap_under_the_null_gives_a_large_p_value() -> None:
    diff = np.random.default_rng(9).normal(0.0, 1.0, size=(3, 2000))
    res = paired_bootstrap(diff, n_boot=4000)
    assert res["lo"] < 0.0 < res["hi"]
    assert res["p_value"] > 0.2


def test_paired_bootstrap_coverage_is_close_to_nominal() -> None:
    rng = np.random.default_rng(10)
    true_mean, n_sim = 0.2, 200
    covered = 0
    for i in range(n_sim):
        diff = rng.normal(true_mean, 1.0, size=(1, 40))
        res = paired_bootstrap(diff, n_boot=300, seed=i)
        covered += res["lo"] <= true_mean <= res["hi"]
    assert 0.88 <= covered / n_sim <= 0.99


def test_resampling_seeds_widens_the_ci_when_seeds_vary() -> None:
    rng = np.random.default_rng(11)
    items = rng.normal(0.3, 1.0, size=300)
    seed_offsets = np.array([-1.0, 0.0, 1.0, 2.0, -2.0])[:, None]  # large between-seed variance
    diff = items[None, :] + seed_offsets + rng.normal(0, 0.1, size=(5, 300))
    two_level = paired_bootstrap(diff, n_boot=2000)
    # Resampling items only (the same indices for every seed) gives exactly the CI of the seed-averaged row.
    items_only = paired_bootstrap(diff.mean(axis=0, keepdims=True), n_boot=2000)
    assert two_level["mean"] == pytest.approx(items_only["mean"])
    assert two_level["hi"] - two_level["lo"] > 3 * (items_only["hi"] - items_only["lo"])


def test_the_same_item_indices_are_used_for_every_seed() -> None:
    row = np.random.default_rng(12).normal(0.1, 1.0, size=(1, 200))
    single = paired_bootstrap(row, n_boot=2000, seed=3)
    tiled = paired_bootstrap(np.repeat(row, 4, axis=0), n_boot=2000, seed=3)
    # With identical rows, resampling seeds changes nothing, and with shared item indices the CI is the single
    # row's; independent item draws per seed would average them out and shrink the CI by about 1/sqrt(4).
    assert tiled["lo"] == pytest.approx(single["lo"], rel=1e-9, abs=1e-12)
    assert tiled["hi"] == pytest.approx(single["hi"], rel=1e-9, abs=1e-12)
    assert tiled["p_value"] == single["p_value"]


def test_paired_bootstrap_is_deterministic_per_seed() -> None:
    diff = np.random.default_rng(13).normal(0.0, 1.0, size=(2, 100))
    assert paired_bootstrap(diff, n_boot=3000, seed=5) == paired_bootstrap(diff, n_boot=3000, seed=5)
    assert paired_bootstrap(diff, n_boot=3000, seed=5)["lo"] != paired_bootstrap(diff, n_boot=3000, seed=6)["lo"]


@pytest.mark.parametrize(("diff", "message"), [
    (np.array([[0.1, np.nan, 0.2]]), "diff.*NaN"),
    (np.array([0.1, 0.2]), "diff.*2-D"),
    (np.zeros((0, 5)), "diff.*empty"),
    (np.zeros((2, 0)), "diff.*empty"),
    ([["a", "b"]], "diff.*numeric"),
])
def test_paired_bootstrap_rejects_bad_diff(diff: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(diff)  # type: ignore[arg-type]


def test_paired_bootstrap_rejects_bad_n_boot_and_level() -> None:
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(np.zeros((1, 3)), n_boot=0)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(np.zeros((1, 3)), level=0.0)


# ---------------------------------------------------------------------------------------------------------------
# length_heuristic
# ---------------------------------------------------------------------------------------------------------------


def length_groups(longer_is_better: bool, n_groups: int = 20, k: int = 3, seed: int = 0) -> pd.DataFrame:
    frame = random_groups(n_groups, k, seed=seed)
    sign = 1.0 if longer_is_better else -1.0
    frame["n_tokens"] = (100 + sign * frame["preference"]).astype(int)
    return frame


def test_length_heuristic_direction_is_chosen_on_fit() -> None:
    train = length_groups(longer_is_better=True, seed=14)
    test = length_groups(longer_is_better=False, seed=15)
    test.index = np.arange(500, 500 + len(test))
    scores, direction = length_heuristic(test, fit=train)
    assert direction == 1
    assert scores.index.equals(test.index)
    assert np.array_equal(scores.to_numpy(), test["n_tokens"].to_numpy(dtype=float))
    test["score"] = scores
    assert accuracy_ci(pairwise_agreement(test, "score"), n_boot=100)["accuracy"] == 0.0

    scores, direction = length_heuristic(test)  # chosen on test itself: shorter is better there
    assert direction == -1
    assert np.array_equal(scores.to_numpy(), -test["n_tokens"].to_numpy(dtype=float))


def test_length_heuristic_tie_gives_longer_and_no_pairs_raises() -> None:
    frame = pd.DataFrame({"id": [1, 1, 2, 2], "preference": [1, 2, 1, 2], "len": [5, 9, 9, 5]})
    assert length_heuristic(frame, length_col="len")[1] == 1  # one pair each way: accuracy 0.5 for both
    flat = frame.assign(preference=1)
    with pytest.raises(ValueError, match="fit"):
        length_heuristic(frame, length_col="len", fit=flat)
