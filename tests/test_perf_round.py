"""ptg.ops.perf_round: a bench round's cost stage by stage (here the quick profile's round 1 on tiny models; the real
measurement is `ptg perf --bench-round`), and the old-against-new comparison's bookkeeping."""

from pathlib import Path

import yaml
from conftest import REPO

from ptg.ops import perf_round


def test_stage_commands_come_from_dvc_yaml():
    assert perf_round.stage_command(REPO, "fit_guidance", 3)[1:] == ["stages/fit_guidance.py", "--round", "3"]
    assert perf_round.stage_command(REPO, "baseline")[1:] == ["stages/baseline.py"]


def test_a_round_runs_every_stage_and_records_its_cost_and_outputs(tmp_path):
    params = yaml.safe_load((REPO / "configs" / "quick.yaml").read_text()) | {"rounds": {"1": {"prev": 0}}}
    params_file = tmp_path / "one_round.yaml"
    params_file.write_text(yaml.safe_dump(params))
    result = perf_round.run_round(REPO, tmp_path / "round", threads=1, params_file=params_file)
    assert list(result["stages"]) == [*perf_round.SETUP_STAGES, *perf_round.ROUND_STAGES]
    for stage, cost in result["stages"].items():
        assert cost["cpu_s"] > 0.5 and cost["wall_s"] > 0, stage  # at least the interpreter's start
    md5 = result["data_md5"]
    for path in ("rounds/1/samples.parquet", "rounds/1/rankings.parquet", "rounds/1/lm/model.safetensors",
                 "rounds/1/predictions.parquet", "baseline/1/predictions.parquet"):
        assert len(md5[path]) == 32, path
    assert perf_round.round_cpu(result) == sum(result["stages"][s]["cpu_s"] for s in perf_round.ROUND_STAGES)


def test_compare_alternates_the_codes_keeps_the_lowest_cost_and_names_the_files_that_differ(monkeypatch, tmp_path):
    calls = []
    costs = {"old": iter([10.0, 8.0]), "new": iter([4.0, 5.0])}

    def fake_round(checkout, directory, threads=None, params_file=None, precision=None):
        name = Path(checkout).name
        calls.append(name)
        cpu = next(costs[name])
        stages = {s: {"cpu_s": cpu, "wall_s": 1.0} for s in (*perf_round.SETUP_STAGES, *perf_round.ROUND_STAGES)}
        md5 = {"same": "a", "lm": "b" if name == "old" else "c"} | ({"only-old": "d"} if name == "old" else {})
        return {"checkout": name, "stages": stages, "data_md5": md5}

    monkeypatch.setattr(perf_round, "run_round", fake_round)
    result = perf_round.compare(Path("old"), Path("new"), tmp_path, repeats=2)
    assert calls == ["old", "new", "old", "new"]
    assert result["cpu_s"]["old"]["train_lm"] == 8.0 and result["cpu_s"]["new"]["train_lm"] == 4.0
    assert result["ratio"]["train_lm"] == 0.5
    assert result["round_cpu_s"] == {"old": 8.0 * 6, "new": 4.0 * 6} and result["round_ratio"] == 0.5
    assert result["data_files_differ"] == ["lm", "only-old"]
    table = perf_round.format_comparison(result)
    assert "**0.50**" in table and "2 files differ: lm, only-old" in table
