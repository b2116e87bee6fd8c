"""The `ptg` command: it lists its commands and passes options through to the module that does the work."""

import shutil
import subprocess

from conftest import REPO
from typer.testing import CliRunner

from ptg.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for command in ("init", "run", "quick", "bench", "perf", "guidance", "annotate", "model", "report", "backfill",
                    "ui", "prefect-setup"):
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


def test_guidance_passes_its_options_through(tmp_path):
    result = runner.invoke(app, ["guidance", "score", str(tmp_path / "nowhere"), "texts.jsonl", "--out",
                                 str(tmp_path / "s.jsonl"), "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0 and "missing.yaml" in str(result.exception)


def test_model_tiny_writes_a_loadable_model(tmp_path):
    out = runner.invoke(app, ["model", "tiny", "tiny-llama", str(tmp_path / "lm")])
    assert out.exit_code == 0, out.output
    from ptg.models import load_lm

    assert load_lm(tmp_path / "lm").config.num_hidden_layers == 2
