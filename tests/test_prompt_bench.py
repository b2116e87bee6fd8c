"""`ptg bench --task prompt`'s statistics on hand-made results: methods paired with the sequence-level baseline by
text id within each seed (whatever the row order), classifier calls summed over rounds, the untrained baselines."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ptg import stats
from ptg.bench import prompt as prompt_bench

ROUNDS = {"1": {"prev": 0}, "2": {"prev": 1}}


def _params(directory: Path) -> None:
    """The bench's params file: the prompt profile with two rounds."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "prompt.yaml").read_text())
    (directory / "params.yaml").write_text(yaml.safe_dump(params | {"rounds": ROUNDS}, sort_keys=False))
FIXED_COLUMNS = [f"{name}_correct" for name in prompt_bench.FIXED]


def write_run(run, ptg_correct, base_correct, seed):
    """One finished seed experiment: 2 rounds, the last one's per-text results (rows in different orders)."""
    rng = np.random.default_rng(seed)
    ids = [f"t{i}" for i in range(len(ptg_correct))]
    for folder, correct in (("rounds", ptg_correct), ("baseline", base_correct)):
        for r in (1, 2):
            d = run / "metrics" / folder / str(r)
            d.mkdir(parents=True, exist_ok=True)
            items = pd.DataFrame({"id": ids, "label": "a", "correct": correct})
            if folder == "rounds":
                items = items.assign(**{c: [i % 2 == 0 for i in range(len(ids))] for c in FIXED_COLUMNS})
            items.iloc[rng.permutation(len(ids))].to_csv(d / "evaluate_items.csv", index=False)
            (d / "evaluate.json").write_text(json.dumps({"prompt": f"{folder} {r}", "majority_rate": 0.5}))
            if folder == "rounds":
                (d / "rank.json").write_text(json.dumps({"classifier_pairs_train": 100 * r,
                                                         "classifier_pairs": 1000}))
            else:
                (d / "train_lm.json").write_text(json.dumps({"classifier_pairs": 10 * r}))
    (run / "seconds.json").write_text(json.dumps({"seconds": 1.0, "cpu_seconds": 2.0}))


def test_collect_pairs_by_text_and_counts_training_calls(tmp_path):
    _params(tmp_path)
    n = 40
    ptg = [i < 30 for i in range(n)]  # 75 % right
    base = [i < 10 for i in range(n)]  # 25 % right, the same texts right where both are
    for seed in (0, 1):
        write_run(tmp_path / "results" / prompt_bench.seed_name(seed), ptg, base, seed)
    summary = prompt_bench.collect(tmp_path, tmp_path / "out", [0, 1, 2], arms=())
    (vs_sequence, ptg_vs_manual, seq_vs_manual, ptg_vs_best, seq_vs_best) = summary["rows"]
    assert (ptg_vs_best["vs"], seq_vs_best["method"]) == ("best_of_n", "sequence")
    assert summary["seeds"] == [0, 1]  # seed 2 never finished
    assert vs_sequence["method"] == "ptg" and vs_sequence["vs"] == "sequence" and vs_sequence["items"] == n
    # Paired by id within each seed (the files' rows are in other orders): exactly the bootstrap of the paired matrix
    order = sorted(range(n), key=lambda i: f"t{i}")
    paired = np.array([[100.0 * (ptg[i] - base[i]) for i in order]] * 2)
    expected = stats.paired_bootstrap(paired)
    assert {k: vs_sequence[k] for k in expected} == expected and vs_sequence["mean"] == pytest.approx(50.0)
    assert summary["accuracy"]["ptg"] == pytest.approx(75.0) and summary["accuracy"]["sequence"] == 25.0
    assert summary["accuracy"]["manual"] == 50.0 and ptg_vs_manual["mean"] == pytest.approx(25.0)
    assert seq_vs_manual["mean"] == pytest.approx(-25.0)
    # Training signal: PTG's rank@r on the training texts over both rounds; the baseline's train_lm credit
    assert summary["calls"] == {"ptg": 300.0, "sequence": 30.0}
    assert summary["prompts"]["ptg"] == {"0": "rounds 2", "1": "rounds 2"}
    assert (tmp_path / "out" / "accuracy_vs_calls.png").stat().st_size > 0
    assert "| ptg | 75.0 | 300 | sequence | +50.0" in (tmp_path / "out" / "table.md").read_text()


def test_collect_without_a_finished_seed_says_so(tmp_path):
    _params(tmp_path)
    with pytest.raises(FileNotFoundError, match="no finished prompt-task seed among \\[0\\]"):
        prompt_bench.collect(tmp_path, tmp_path / "out", [0], arms=())


def test_experiments_give_each_seed_its_own_draw_and_arms_run_to_the_last_evaluation():
    planned = prompt_bench.experiments([0, 1], prompt_bench.ARMS, last_round=2)
    assert planned[0] == ("prompt-s0", ["seed=0", "data.seed=0"], ())
    assert ("prompt-pg-spread-s1", ["seed=1", "data.seed=1", *prompt_bench.PG, "train_lm.pg_credit=spread"],
            ["evaluate@2"]) in planned
    assert len(planned) == 2 + 2 * len(prompt_bench.ARMS)


def test_every_arm_is_a_valid_variant_of_the_prompt_params(tmp_path):
    """Each arm's overrides give params the stages accept (an arm with a misspelt value fails here, not after the
    seeds' hour of CPU)."""
    from ptg.bench import with_overrides
    from ptg.config import load as load_params

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "prompt.yaml").read_text())
    for name, *overrides in prompt_bench.ARMS:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(with_overrides(base, overrides)))
        load_params(path)


def test_the_policy_gradient_arms_are_compared_with_each_other_and_count_their_own_calls(tmp_path):
    """pg-spread against pg-sequence and the placebo, paired by text; calls: the ranking only for the arms that
    train on the guidance (pg-sequence does not), plus what each arm's training scored."""
    _params(tmp_path)
    n = 20
    right = {"pg-sequence": 10, "pg-spread": 15, "pg-placebo": 5}
    for seed in (0, 1):
        write_run(tmp_path / "results" / prompt_bench.seed_name(seed), [True] * n, [False] * n, seed)
        for arm, k in right.items():
            run = tmp_path / "results" / prompt_bench.arm_name(arm, seed)
            write_run(run, [i < k for i in range(n)], [False] * n, seed)
            for r in (1, 2):
                (run / "metrics" / "rounds" / str(r) / "train_lm.json").write_text(json.dumps({"classifier_pairs": 7}))
    summary = prompt_bench.collect(tmp_path, tmp_path / "out", [0, 1], arms=prompt_bench.ARMS)
    rows = {(r["method"], r["vs"]): r for r in summary["rows"]}
    assert rows[("pg-spread", "pg-sequence")]["mean"] == pytest.approx(25.0)  # 15 vs 10 of 20 texts right
    assert rows[("pg-spread", "pg-placebo")]["mean"] == pytest.approx(50.0)
    assert rows[("ptg", "pg-sequence")]["mean"] == pytest.approx(50.0)
    assert summary["calls"]["pg-spread"] == 300 + 14 and summary["calls"]["pg-sequence"] == 14
