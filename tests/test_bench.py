"""ptg.bench: the statistics of a finished bench (synthetic results) and, slow, one seed of the quick profile run
as a real DVC experiment in a git + DVC repository of its own."""

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO

from ptg import bench, cli, stats
from ptg.bench import experiments
from ptg.ops.workspace import commit, dvc_env


def _fake_seed(root, seed, rng, delta, n_items=40, rounds=(1, 2), name=None, info=None):
    name = name or f"seed-{seed}"
    d = root / "results" / name / "metrics"
    ids = [f"t{i}" for i in range(n_items)]
    for r in rounds:
        base = rng.uniform(0.1, 0.5, n_items)
        for folder, shift in (("baseline", 0.0), ("rounds", delta)):
            (d / folder / str(r)).mkdir(parents=True, exist_ok=True)
            items = pd.DataFrame({"id": ids, "rougeL": base + shift, "rouge2": base / 2, "meteor": base,
                                  "gen_len": 12.0 if folder == "rounds" else 15.0})
            items.to_csv(d / folder / str(r) / "evaluate_items.csv", index=False)
            (d / folder / str(r) / "train_lm.json").write_text(json.dumps({"seconds": 2.0}))
        rounds_dir = d / "rounds" / str(r)
        (rounds_dir / "sample.json").write_text(json.dumps({"seconds": 1.0}))
        (rounds_dir / "evaluate.json").write_text(json.dumps({"reward_eos": 0.6, "reward_other": 0.5}))
        rows = []
        for split in ("train", "validation"):
            for g in range(20):
                lengths = rng.integers(3, 30, 3)
                pref = lengths + rng.normal(0, 1, 3)  # longer is better here, and the guidance agrees with pref
                for k in range(3):
                    rows.append({"id": f"{split}{g}", "sample_idx": k, "split": split, "preference": pref[k],
                                 "n_tokens": lengths[k], "finished": True, "guidance": pref[k]})
        pd.DataFrame(rows).to_csv(rounds_dir / "guidance_groups.csv", index=False)
    (root / "results" / name / "seconds.json").write_text(json.dumps({"seconds": 100.0} | (info or {})))


def test_collect_pairs_items_and_seeds(tmp_path):
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        _fake_seed(tmp_path, seed, rng, delta=0.01)
    summary = bench.collect(tmp_path, tmp_path / "out", [0, 1, 2])  # seed 2 never ran: left out
    assert summary["seeds"] == [0, 1]
    r1 = summary["rounds"][0]
    assert r1["items"] == 40 and r1["seeds"] == 2
    # PTG is baseline + 0.01 on every item: +1.00 ROUGE-L x100, no uncertainty; ROUGE-2 identical: 0.
    assert r1["rougeL"]["mean"] == pytest.approx(1.0) and r1["rougeL"]["lo"] == pytest.approx(1.0)
    assert r1["rouge2"]["mean"] == pytest.approx(0.0)
    assert r1["words"] == {"ptg": 12.0, "baseline": 15.0}
    g = r1["guidance"]
    assert g["guidance"]["accuracy"] == 1.0 and g["length"]["direction"] == 1
    assert 0.5 < g["length"]["accuracy"] < 1.0 and g["guidance_minus_length"]["diff"] > 0
    assert (tmp_path / "out" / "by_round.png").stat().st_size > 1000
    table = (tmp_path / "out" / "table.md").read_text()
    assert "+1.00 [+1.00, +1.00]" in table and table.count("\n| 1 |") == 1


def test_collect_pairs_each_item_with_itself_in_its_seed(tmp_path):
    """Differences that vary by item and seed, PTG's rows in another order than the baseline's: the CI is the
    bootstrap of the (seeds x items) matrix paired by id; a transposed matrix or rows paired by position differ."""
    rng = np.random.default_rng(1)
    ids = [f"t{i}" for i in range(40)]
    diffs = {}
    for seed in (0, 1):
        _fake_seed(tmp_path, seed, rng, delta=0.0, rounds=(1,))
        d = tmp_path / "results" / f"seed-{seed}" / "metrics"
        base = pd.read_csv(d / "baseline" / "1" / "evaluate_items.csv")
        diffs[seed] = pd.Series(rng.normal(0.01 * (seed + 1), 0.03, len(ids)), index=ids)
        ptg = base.assign(rougeL=base["rougeL"] + diffs[seed].to_numpy())
        ptg.sample(frac=1.0, random_state=seed).to_csv(d / "rounds" / "1" / "evaluate_items.csv", index=False)
    got = bench.collect(tmp_path, tmp_path / "out", [0, 1])["rounds"][0]["rougeL"]
    order = sorted(ids)
    want = stats.paired_bootstrap(np.stack([diffs[s].loc[order].to_numpy() for s in (0, 1)]) * 100)
    assert {k: got[k] for k in ("mean", "lo", "hi", "n_items", "n_seeds")} == pytest.approx(
        {k: want[k] for k in ("mean", "lo", "hi", "n_items", "n_seeds")}, abs=1e-9)
    transposed = stats.paired_bootstrap(np.stack([diffs[s].loc[order].to_numpy() for s in (0, 1)]).T * 100)
    assert (got["lo"], got["hi"]) != pytest.approx((transposed["lo"], transposed["hi"]), abs=1e-3)
    assert got["mean"] == pytest.approx(100 * np.mean([diffs[0].mean(), diffs[1].mean()]))


def _fake_ablation(root, variant, seed, delta, overrides=(), tree="t1"):
    targets = ["evaluate@1", "baseline"] if variant == bench.ABLATION_REFERENCE else ["evaluate@1"]
    # The same rng per seed: a variant's items are its reference's plus delta (its own baseline folder is unused).
    _fake_seed(root, seed, np.random.default_rng(10 + seed), delta=delta, rounds=(1,),
               name=bench.ablation_name(variant, seed),
               info={"overrides": [f"seed={seed}", bench.VALIDATION, *overrides], "targets": targets, "tree": tree})


def test_ablations_compare_round_one_with_the_reference_on_validation_over_seeds(tmp_path):
    assert [name for name, _, _ in bench.ablation_experiments([0, 1], [["sum", "fit_guidance.agg=sum"]])] == \
        ["abl-reference-s0", "abl-sum-s0", "abl-reference-s1", "abl-sum-s1"]
    assert bench.collect_ablations(tmp_path / "none", tmp_path / "out") == []
    for seed in (0, 1):
        _fake_ablation(tmp_path, "reference", seed, delta=0.01)
    _fake_ablation(tmp_path, "sum", 0, delta=0.03, overrides=["fit_guidance.agg=sum"])
    _fake_ablation(tmp_path, "sum", 1, delta=0.01, overrides=["fit_guidance.agg=sum"])
    rows = bench.collect_ablations(tmp_path, tmp_path / "out")
    assert [r["variant"] for r in rows] == ["bench config", "sum"]
    assert rows[0]["overrides"] == [] and rows[1]["overrides"] == ["fit_guidance.agg=sum"]
    assert rows[0]["seeds"] == rows[1]["seeds"] == [0, 1] and rows[1]["vs_reference"]["n_seeds"] == 2
    # Paired within each seed: the reference is +1 over its baseline; sum is +2 over the reference with seed 0
    # and +0 with seed 1, so +1 on average, and the CI spans the two seeds.
    assert rows[0]["vs_reference"]["mean"] == pytest.approx(0.0)
    assert rows[0]["vs_baseline"]["mean"] == pytest.approx(1.0)
    assert rows[1]["vs_reference"]["mean"] == pytest.approx(1.0)
    assert rows[1]["vs_reference"]["lo"] == pytest.approx(0.0) and rows[1]["vs_reference"]["hi"] == pytest.approx(2.0)
    assert rows[1]["vs_baseline"]["mean"] == pytest.approx(2.0)
    assert "| sum | fit_guidance.agg=sum | 0,1 |" in (tmp_path / "out" / "ablations.md").read_text()
    # A seed run with other code or bench params than that seed's reference is not comparable: left out.
    _fake_ablation(tmp_path, "sum", 1, delta=0.05, overrides=["fit_guidance.agg=sum"], tree="older")
    _fake_ablation(tmp_path, "old", 0, delta=0.05, tree="older")
    rows = bench.collect_ablations(tmp_path, tmp_path / "out")
    assert [(r["variant"], r["seeds"]) for r in rows] == [("bench config", [0, 1]), ("sum", [0])]
    assert rows[1]["vs_reference"]["mean"] == pytest.approx(2.0)


def test_collect_without_a_finished_seed_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished seed"):
        bench.collect(tmp_path, tmp_path / "out", [0])


def ptg_bench(args: list[str]) -> None:
    """`ptg bench ARGS` in this process; a failure raises its own exception."""
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", *args])
    assert done.value.code == 0


@pytest.mark.slow
def test_bench_runs_seeds_side_by_side_as_dvc_experiments_and_resumes(tmp_path, monkeypatch):
    # What runs where and is reused, not what MLflow records (tests/test_tracking.py, test_flows.py): tracking off
    # saves each of the 6 experiments' stages their MLflow start-up.
    monkeypatch.setenv("PTG_TRACKING", "off")
    # One round (collecting over several rounds is test_collect_pairs_items_and_seeds's): half the CPU.
    params = yaml.safe_load((REPO / "configs" / "quick.yaml").read_text()) | {"rounds": {"1": {"prev": 0}}}
    (tmp_path / "quick-1.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    directory = tmp_path / "bench"
    args = ["--params", str(tmp_path / "quick-1.yaml"), "--seeds", "3", "4", "--jobs", "2",
            "--dir", str(directory), "--out", str(tmp_path / "out")]
    ptg_bench(args)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["seeds"] == [3, 4] and [r["round"] for r in summary["rounds"]] == [1]
    assert summary["rounds"][-1]["items"] == 16  # the quick profile's whole test split
    assert all(s > 0 for s in summary["cpu_seconds_per_seed"])
    # The policy-gradient arms ran the whole chain with every seed and are paired with that seed's baseline.
    arms = {(a["arm"], a["vs"]): a for a in summary["arms"]}
    assert set(arms) == {("ptg", "uniform MLE"), ("mle-pg-sequence", "uniform MLE"), ("mle-pg-token", "uniform MLE"),
                         ("mle-pg-token", "mle-pg-sequence")}
    assert all(a["seeds"] == [3, 4] and a["items"] == 16 for a in arms.values())
    pg = json.loads((directory / "results" / "arm-mle-pg-token-s3" / "metrics" / "rounds" / "1" /
                     "train_lm.json").read_text())
    assert pg["guided"] and pg["weight_cv"] == 0  # contrast 0: uniform MLE weights beside the token-level term
    # Each seed's own results (not the other's, not the workspace's): different seeds sample differently.
    ranks = [(directory / "results" / f"seed-{s}" / "metrics" / "rounds" / "1" / "rank.json").read_text()
               for s in (3, 4)]
    assert ranks[0] != ranks[1]
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=directory, env=dvc_env(), check=True,
                           capture_output=True, text=True).stdout
    assert "bench-seed-3" in shown and "bench-seed-4" in shown
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                          capture_output=True, text=True, check=True).stdout == ""  # the workspace is untouched
    # A second call finds the seed done and only recomputes the statistics.
    seconds = (directory / "results" / "seed-3" / "seconds.json").read_text()
    ptg_bench(args)
    assert (directory / "results" / "seed-3" / "seconds.json").read_text() == seconds


def test_a_finished_experiment_is_reused_only_with_the_same_snapshot(tmp_path, monkeypatch):
    """The key a finished experiment is reused by is the bench repository's committed tree (code and bench params,
    read from git itself), its overrides and its targets; only the DVC run and the export are stand-ins."""
    calls = []
    monkeypatch.setattr(experiments, "run_tracked", lambda cmd, cwd, threads=None: calls.append(cmd) or 1.0)
    monkeypatch.setattr(experiments, "export_metrics",
                        lambda directory, name, dest: (dest / "metrics").mkdir(parents=True))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    (tmp_path / ".gitignore").write_text("/.dvc/tmp/\n/results/\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("LR = 1\n")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    commit(tmp_path, ["."], "bench")
    ran = lambda: sum("exp" in c for c in calls)  # noqa: E731
    bench.run_experiment(tmp_path, "seed-0", ["seed=0"])
    bench.run_experiment(tmp_path, "seed-0", ["seed=0"])
    assert ran() == 1  # the same snapshot: skipped
    (tmp_path / "params.yaml").write_text("seed: 0\ntrain_lm: {normalize: batch}\n")
    commit(tmp_path, ["."], "other bench params")
    bench.run_experiment(tmp_path, "seed-0", ["seed=0"])
    assert ran() == 2  # other bench params: the stale result is not reused
    (tmp_path / "src" / "train.py").write_text("LR = 2\n")
    commit(tmp_path, ["."], "other code")
    bench.run_experiment(tmp_path, "seed-0", ["seed=0"])
    assert ran() == 3  # other code
    bench.run_experiment(tmp_path, "seed-0", ["seed=0"], targets=["evaluate@1"])
    assert ran() == 4  # other targets
    bench.run_experiment(tmp_path, "seed-0", ["seed=1"])
    assert ran() == 5  # other overrides
    bench.run_experiment(tmp_path, "seed-0", ["seed=1"])
    assert ran() == 5
    # The parent run records the experiment's own params, not the bench params it started from.
    assert yaml.safe_load((tmp_path / ".dvc" / "tmp" / "bench-seed-0.params.yaml").read_text())["seed"] == 1


def test_overrides_apply_to_nested_params_as_yaml_values():
    params = {"seed": 0, "train_lm": {"lr": 1e-4}}
    out = bench.with_overrides(params, ["seed=2", "train_lm.lr=3.0e-4", "evaluate.split=validation"])
    assert out == {"seed": 2, "train_lm": {"lr": 3e-4}, "evaluate": {"split": "validation"}}
    assert params == {"seed": 0, "train_lm": {"lr": 1e-4}}  # the bench params are not changed


def _write_items(folder, ids, rouge):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "rougeL": rouge, "rouge2": rouge, "meteor": rouge, "gen_len": 10.0}).to_csv(
        folder / "evaluate_items.csv", index=False)


def test_arms_are_paired_with_their_own_seeds_baseline_by_item_id(tmp_path):
    """Each arm's last round against the same seed's uniform MLE on the same items, matched by id (the files list
    items in different orders), and token- against sequence-level credit; a seed an arm has not finished is left
    out of that arm."""
    rng = np.random.default_rng(1)
    ids = [f"t{i}" for i in range(30)]
    shift = {"ptg": 0.0, "mle-pg-sequence": 0.01, "mle-pg-token": 0.03}
    for seed in (0, 1):
        base = rng.uniform(0.1, 0.5, 30) + 0.2 * seed  # seeds differ: a pairing across seeds would show it
        _write_items(tmp_path / "results" / f"seed-{seed}" / "metrics" / "baseline" / "2", ids, base)
        for arm, d in shift.items():
            name = f"seed-{seed}" if arm == "ptg" else bench.arm_name(arm, seed)
            if arm == "mle-pg-token" and seed == 1:
                continue  # unfinished
            order = rng.permutation(30)
            _write_items(tmp_path / "results" / name / "metrics" / "rounds" / "2", [ids[i] for i in order],
                         (base + d)[order])
            (tmp_path / "results" / name / "seconds.json").write_text("{}")
    rows = bench.arm_differences(tmp_path, [0, 1], bench.ARMS, 2)
    by = {(r["arm"], r["vs"]): r for r in rows}
    assert by[("ptg", "uniform MLE")]["mean"] == pytest.approx(0.0, abs=1e-9)
    seq = by[("mle-pg-sequence", "uniform MLE")]
    assert seq["seeds"] == [0, 1] and seq["items"] == 30
    assert seq["mean"] == pytest.approx(1.0) and seq["lo"] == pytest.approx(1.0) and seq["hi"] == pytest.approx(1.0)
    tok = by[("mle-pg-token", "uniform MLE")]
    assert tok["seeds"] == [0] and tok["mean"] == pytest.approx(3.0)
    assert by[("mle-pg-token", "mle-pg-sequence")]["mean"] == pytest.approx(2.0)
    assert "mle-pg-token | mle-pg-sequence | 30 x 1" in bench.format_table({"rounds": [], "arms": rows})


def test_every_arm_runs_with_every_seed_through_the_last_evaluation():
    exps = bench.arm_experiments([0, 1], bench.ARMS, 3)
    assert [e[0] for e in exps] == ["arm-mle-pg-sequence-s0", "arm-mle-pg-token-s0", "arm-mle-pg-sequence-s1",
                                    "arm-mle-pg-token-s1"]
    assert all(e[2] == ["evaluate@3"] and e[1][0].startswith("seed=") for e in exps)
    # The two policy-gradient arms differ in their credit only.
    seq, tok = ({o for o in e[1] if "pg_credit" not in o} for e in exps[:2])
    assert seq == tok


def test_validation_curves_follow_every_arm_across_rounds(tmp_path):
    """Each arm's val_score rows (train_lm.eval_every), rounds laid end to end on one update axis, per seed;
    updates without validation are skipped and the plot is written."""
    for name, kind in (("seed-0", "rounds"), ("seed-0", "baseline_history"), ("arm-mle-pg-token-s0", "rounds")):
        for r, scores in ((1, [20.0, None, 22.0]), (2, [22.0, None, 25.0])):
            d = tmp_path / "results" / name / "metrics" / kind / str(r)
            d.mkdir(parents=True)
            pd.DataFrame({"update": [0, 1, 2], "val_score": scores}).to_csv(d / "train_lm_history.csv", index=False)
    curves = bench.validation_curves(tmp_path, [0, 1], bench.ARMS)
    assert set(curves) == {"ptg", "uniform MLE", "mle-pg-token"}
    assert curves["ptg"][0] == [(0, 20.0), (2, 22.0), (2, 22.0), (4, 25.0)]
    assert bench.plot_curves(curves, tmp_path / "c.png").stat().st_size > 1000
