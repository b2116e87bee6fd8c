"""ptg.bench.rl: the learning-curve statistics of a finished RL bench (synthetic results: the area under each
validation input's held-out reward curve, paired by input and seed against sequence-level credit and the placebo;
final test scores paired by item), and the plan of experiments."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO

from ptg.bench import rl
from ptg.config import load as load_params
from ptg.ops.workspace import template_file

UPDATES = (0, 5, 10, 15)


def _curve(rng, n_items: int, gain: float) -> pd.DataFrame:
    """A held-out reward curve per item: the same start, rising by ``gain`` per checkpoint, item noise."""
    start = rng.uniform(0.1, 0.3, n_items)
    rows = [{"update": u, "id": f"v{i}", "reward_greedy": start[i] + gain * j,
             "reward_sampled": start[i] + gain * j + 0.01 * i} for j, u in enumerate(UPDATES) for i in range(n_items)]
    return pd.DataFrame(rows)


def _write(metrics, folder: str, curve: pd.DataFrame, test: np.ndarray) -> None:
    d = metrics / folder / "1"
    d.mkdir(parents=True, exist_ok=True)
    curve.to_csv(d / "train_lm_curve.csv", index=False)
    pd.DataFrame({"id": [f"t{i}" for i in range(len(test))], "rougeL": test, "meteor": test / 2}).to_csv(
        d / "evaluate_items.csv", index=False)
    (d / "train_lm.json").write_text(json.dumps({"seconds_per_update": 3.0, "best_update": UPDATES[-1]}))


def _fake_bench(root, seeds=(0, 1), gains=None, n_items=20, n_test=30):
    gains = gains or {"spread": 0.03, "sequence": 0.02, "placebo": 0.02, "token": 0.0}
    for s in seeds:
        rng = np.random.default_rng(s)
        test = rng.uniform(0.2, 0.4, n_test)
        for method, gain in gains.items():
            name = rl.seed_name(s) if method in ("spread", "sequence") else rl.arm_name(method, s)
            run = root / "results" / name
            # each method's own item noise is the same (one rng state per seed): differences are the gains alone
            _write(run / "metrics", "baseline" if method == "sequence" else "rounds",
                   _curve(np.random.default_rng(100 + s), n_items, gain), test + gain)
            (run / "seconds.json").write_text(json.dumps({"seconds": 50.0, "cpu_seconds": 90.0}))
            if method == "spread":
                (run / "metrics" / "rounds" / "1" / "fit_guidance.json").write_text(json.dumps(
                    {"val_accuracy": 0.6, "val_accuracy_clear": 0.7, "reward_cv": 0.1, "occlusion_spearman": 0.2}))


def test_area_is_the_mean_gain_over_the_start_per_input():
    curve = pd.DataFrame({"update": [0, 0, 5, 5, 10, 10], "id": ["a", "b"] * 3,
                          "reward_sampled": [0.1, 0.2, 0.3, 0.2, 0.5, 0.1]})
    area = rl.area(curve, "reward_sampled")
    assert area.to_dict() == pytest.approx({"a": (0.2 + 0.4) / 2, "b": (0.0 - 0.1) / 2})
    with pytest.raises(ValueError, match="needs update 0"):
        rl.area(curve[curve["update"] > 0], "reward_sampled")


def test_collect_pairs_areas_by_input_and_seed_against_sequence_credit_and_the_placebo(tmp_path):
    _fake_bench(tmp_path)
    summary = rl.collect(tmp_path, tmp_path / "out", [0, 1, 2], rl.ARMS)  # seed 2 and the grpo arm never ran
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"spread", "sequence", "placebo", "token"} and summary["seeds"] == [0, 1]
    # Every curve rises by its gain per checkpoint: area = gain x mean(1, 2, 3) = 2 x gain, the same on every input.
    for method, gain in (("spread", 0.03), ("sequence", 0.02), ("token", 0.0)):
        assert rows[method]["area_reward_sampled"] == pytest.approx(2 * gain)
    vs = rows["spread"]["reward_sampled_vs_sequence"]
    assert vs["mean"] == pytest.approx(0.02) and vs["lo"] == pytest.approx(0.02) and vs["items"] == 20
    assert rows["spread"]["reward_sampled_ratio_to_sequence"] == pytest.approx(1.5)
    assert rows["spread"]["reward_sampled_vs_placebo"]["mean"] == pytest.approx(0.02)
    assert rows["token"]["reward_greedy_vs_sequence"]["mean"] == pytest.approx(-0.04)
    assert "reward_sampled_vs_sequence" not in rows["sequence"]
    assert rows["spread"]["rougeL_vs_sequence"]["mean"] == pytest.approx(1.0)  # test + 0.03 vs + 0.02, x100
    assert summary["guidance"]["occlusion_spearman"] == pytest.approx(0.2)
    assert summary["cpu_seconds"] == pytest.approx(2 * 3 * 90.0)  # 2 seeds x (seed experiment + 2 arms)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| spread | 2 | 6.00 | +2.00 [+2.00, +2.00] | +2.00 [+2.00, +2.00] |" in table
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_collect_without_a_finished_seed_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished seed"):
        rl.collect(tmp_path, tmp_path / "out", [0], rl.ARMS)


def test_the_plan_runs_every_arm_with_every_seed_and_the_peer_on_the_first_seeds():
    plan = rl.experiments([0, 1, 2], rl.ARMS, peer_seeds=1)
    names = [name for name, _, _ in plan]
    assert names[:3] == ["rl-s0", "rl-s1", "rl-s2"]  # the seeds first: their stages are every arm's run cache
    assert "rl-grpo-s0" in names and "rl-grpo-s1" not in names and "rl-placebo-s2" in names
    assert all(targets == ["evaluate@1"] for name, _, targets in plan[3:])
    assert all(overrides[0] == f"seed={name[-1]}" for name, overrides, _ in plan)


@pytest.mark.parametrize("profile", ["bench-rl", "bench-rl-gpu"])
def test_the_profile_and_every_arm_are_valid_params(tmp_path, profile):
    """configs/bench-rl.yaml and its GPU profile load, train by policy gradient alone, and each arm's overrides give
    valid params."""
    from ptg.bench.experiments import with_overrides

    base = yaml.safe_load(template_file(f"configs/{profile}.yaml").read_text())
    assert template_file(f"configs/{profile}.yaml").resolve() == (REPO / "configs" / f"{profile}.yaml").resolve()
    for name, *overrides in (("spread",), *rl.ARMS):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(with_overrides(base, overrides)))
        load_params(path)
        cfg = load_params(path).train_lm
        assert cfg.objective in ("pg", "grpo") and cfg.pg_coeff == 0 and cfg.eval_every > 0


def test_the_gpu_profile_has_ten_times_the_samples_and_the_same_settings():
    """The GPU profile: >= 10x the CPU profile's on-policy samples per arm, the settings chosen on validation
    (beta, tau, lr, K, the credit) unchanged."""
    cpu, gpu = (load_params(template_file(f"configs/{p}.yaml")).train_lm for p in ("bench-rl", "bench-rl-gpu"))
    samples = [c.max_updates * c.batch_size * c.pg_samples for c in (cpu, gpu)]
    assert samples[1] >= 10 * samples[0]
    for key in ("objective", "pg_credit", "pg_spread", "pg_temperature", "lr", "pg_samples", "entropy_coeff"):
        assert getattr(gpu, key) == getattr(cpu, key), key


def test_every_arm_is_paired_with_the_peer_on_the_seeds_the_peer_ran(tmp_path):
    """TRL's GRPO on fewer seeds (--peer-seeds): each arm's difference from it is paired over the seeds both have,
    and the table says what the bench cost and on which CPU."""
    _fake_bench(tmp_path)
    _fake_bench(tmp_path, seeds=(0,), gains={"grpo": 0.025})
    summary = rl.collect(tmp_path, tmp_path / "out", [0, 1], rl.ARMS)
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["grpo"]["seeds"] == [0] and rows["spread"]["seeds"] == [0, 1]
    vs = rows["spread"]["reward_sampled_vs_grpo"]
    assert vs["seeds"] == [0] and vs["mean"] == pytest.approx(2 * (0.03 - 0.025))
    assert rows["token"]["reward_greedy_vs_grpo"]["mean"] == pytest.approx(-2 * 0.025)
    assert "reward_sampled_vs_grpo" not in rows["grpo"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| vs GRPO [95% CI] |" in table and "| spread | 2 | 6.00 | +2.00 [+2.00, +2.00] | +2.00 [+2.00, +2.00] " \
                                               "| +1.00 [+1.00, +1.00] |" in table
    assert f"cost: {7 * 90 / 60:.0f} core-minutes" in table and " ".join(summary["machine"]["flags"]) in table
