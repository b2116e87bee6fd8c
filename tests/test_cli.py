"""The `ptg` command: it lists its commands and passes options through to the library function that does the work."""

import shutil
import subprocess

import pytest
from conftest import REPO
from typer.testing import CliRunner

from ptg import cli
from ptg.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for command in ("init", "run", "track", "quick", "bench", "perf", "guidance", "annotate", "model", "report",
                    "backfill", "ui", "prefect-setup"):
        assert command in out.output
    console = shutil.which("ptg", path=str(REPO / ".venv" / "bin"))
    if console:  # the installed console script is the same app
        done = subprocess.run([console, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "quick" in done.stdout


def test_report_prints_the_table_of_a_finished_run(tmp_path):
    report = tmp_path / "metrics" / "report"
    report.mkdir(parents=True)
    row = {"round": 1, "split": "test", "ptg_rougeL": 30.0, "mle_rougeL": 29.0, "ptg_meteor": 20.0,
           "mle_meteor": 19.0, "ptg_gen_len": 7.0, "mle_gen_len": 6.5}
    (report / "eval_by_round.csv").write_text(",".join(row) + "\n" + ",".join(str(v) for v in row.values()) + "\n")
    (report / "guidance_by_round.csv").write_text("round,val_accuracy,val_pairs,kept_start\n1,0.6,95,False\n")
    out = runner.invoke(app, ["report", str(tmp_path / "metrics")])
    assert out.exit_code == 0, out.output
    assert "0.600 (95 pairs)" in out.output and "30.00" in out.output


def test_bench_passes_its_options_through(tmp_path):
    out = runner.invoke(app, ["bench", "--collect-only", "--dir", str(tmp_path / "none"), "--out",
                              str(tmp_path / "out")])
    assert isinstance(out.exception, FileNotFoundError) and "no finished seed" in str(out.exception)


def test_regroup_keeps_the_documented_multi_value_options():
    argv = ["bench", "--seeds", "0", "1", "--ablation", "pg", "a.b=1", "c.d=x", "--jobs", "2", "--arm", "solo"]
    assert cli.regroup(argv) == ["bench", "--seeds", "0", "--seeds", "1", "--ablation",
                                 f"pg{cli.SEP}a.b=1{cli.SEP}c.d=x", "--jobs", "2", "--arm", "solo"]
    assert cli.regroup(["bench", "--seeds"]) == ["bench", "--seeds"]  # click then says it needs a value


def test_bench_options_reach_the_library_as_argparse_gave_them(tmp_path, monkeypatch):
    """`ptg bench --seeds 3 4 --ablation NAME K=V K=V --ablation-seeds 1 2 --no-arms` as the README writes it."""
    from ptg import bench

    calls = []
    monkeypatch.setattr(bench, "run", lambda *a: calls.append(a))
    argv = ["bench", "--seeds", "3", "4", "--jobs", "2", "--dir", str(tmp_path / "b"), "--out", str(tmp_path / "o"),
            "--ablation", "pg", "train_lm.pg_coeff=0.5", "train_lm.pg_credit=token", "--ablation", "k5",
            "sample.num_samples=5", "--ablation-seeds", "1", "2", "--ablations-only"]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    (params, directory, out, seeds, arms, jobs, collect_only, ablations, ablation_seeds, only), = calls
    assert params.name == "bench.yaml" and directory == (tmp_path / "b").resolve() and out == tmp_path / "o"
    assert seeds == [3, 4] and jobs == 2 and not collect_only and only
    assert ablations == [["pg", "train_lm.pg_coeff=0.5", "train_lm.pg_credit=token"], ["k5", "sample.num_samples=5"]]
    assert ablation_seeds == [1, 2] and arms == bench.ARMS
    calls.clear()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--no-arms", "--arm", "x", "a=1"])
    assert calls[0][3] == [0, 1, 2] and calls[0][4] == ()
    calls.clear()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--arm", "x", "a=1", "b=2"])
    assert calls[0][4] == [["x", "a=1", "b=2"]]


def test_guidance_passes_its_options_through(tmp_path):
    result = runner.invoke(app, ["guidance", "score", str(tmp_path / "nowhere"), "texts.jsonl", "--out",
                                 str(tmp_path / "s.jsonl"), "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0 and "missing.yaml" in str(result.exception)


def test_model_tiny_writes_a_loadable_model(tmp_path):
    out = runner.invoke(app, ["model", "tiny", "tiny-llama", str(tmp_path / "lm")])
    assert out.exit_code == 0, out.output
    from ptg.lm.models import load_lm

    assert load_lm(tmp_path / "lm").config.num_hidden_layers == 2


def test_run_refuses_a_params_file_dvc_would_not_read(tmp_path, monkeypatch):
    """`dvc repro` reads params.yaml only: `ptg run --params other.yaml` would run params.yaml under other.yaml's
    name, so it is refused, saying what to do, before anything runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.yaml").write_text("seed: 1\n")
    ran = []
    monkeypatch.setattr("ptg.tracking.run_command", lambda *a, **k: ran.append(a) or 0)
    out = runner.invoke(app, ["run", "--params", "other.yaml"])
    assert out.exit_code == 2 and not ran
    assert "cp other.yaml params.yaml" in out.output and "ptg quick --params other.yaml" in out.output
    out = runner.invoke(app, ["run", "--params", str(tmp_path / "params.yaml")])  # the project's own, by any path
    assert out.exit_code == 0 and ran[0][0] == ["dvc", "repro"]
