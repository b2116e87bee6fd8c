"""One folder per task (``ptg.tasks``): the rest of ptg never asks which task runs, and editing one task's code
reruns nothing of another task's pipeline (dvc.yaml names a task's modules by ``${task.name}``)."""

import ast
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_workspace, run

from ptg.config import task_names

SRC = Path(__file__).resolve().parents[1] / "src" / "ptg"
# `ptg bench --task`: which bench runs (summarisation, prompt or rl, which is no task), not a pipeline branch.
BENCH_CHOICE = SRC / "cli.py"


def task_branches(path: Path) -> list[str]:
    """Where ``path`` compares something with a task's name or asks ``is_prompt``: ``line: code``."""
    names = set(task_names())
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        literal = isinstance(node, ast.Compare) and any(
            isinstance(x, ast.Constant) and x.value in names for x in (node.left, *node.comparators))
        call = isinstance(node, ast.Call) and "is_prompt" in ast.unparse(node.func)
        if literal or call:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_task_branch_outside_the_tasks_package():
    """A task's behaviour lives in its folder: no module outside ``ptg/tasks`` (nor a stage) compares the task's
    name or asks ``is_prompt``."""
    roots = [SRC, SRC.parents[1] / "stages", SRC.parents[1] / "flows"]
    offenders = {str(p.relative_to(SRC.parents[1])): found for root in roots for p in sorted(root.rglob("*.py"))
                 if SRC / "tasks" not in p.parents and p != BENCH_CHOICE and (found := task_branches(p))}
    assert not offenders, f"task branches outside ptg/tasks: {offenders}"


def test_the_branch_finder_finds_a_branch(tmp_path):
    """The test above fails on the code it was written against (``tasks.is_prompt`` and ``task.name == "prompt"``)."""
    planted = tmp_path / "planted.py"
    planted.write_text('if tasks.is_prompt(params):\n    pass\nif task.name == "prompt":\n    pass\n')
    assert task_branches(planted) == ["1: tasks.is_prompt(params)", "3: task.name == 'prompt'"]


def test_an_unknown_task_is_named_with_the_tasks_there_are(tmp_path):
    import yaml

    from ptg.config import ParamsError
    from ptg.config import load as load_params

    params = yaml.safe_load((SRC.parents[1] / "configs" / "quick.yaml").read_text())
    params["task"]["name"] = "summarise"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"params.yaml: task: name 'summarise': ptg has no such task .* the tasks "
                                          r"are copy, prompt, summarisation"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.slow
def test_editing_one_tasks_code_reruns_nothing_of_another_tasks_pipeline(quick_pipeline, tmp_path):
    """On the finished summarisation pipeline, with its code as a copy (not the link to the package): editing the
    prompt task's data module (the WordNet and few-shot readers) or the bench's bootstrap leaves `dvc status` as it
    was; editing the summarisation task's data module makes prepare (and what reads its task data) stale."""
    import shutil

    ws = copy_workspace(quick_pipeline, tmp_path / "ws")
    code = ws / "src" / "ptg"
    target = code.resolve()
    code.unlink()
    # What DVC hashes (the stages still import the installed package); the template's dvc.yaml would be a second
    # pipeline in the workspace.
    shutil.copytree(target, code, ignore=shutil.ignore_patterns("__pycache__", "template"))

    def stale() -> set[str]:
        out = run(["dvc", "status"], ws).stdout
        return {line.strip().rstrip(":") for line in out.splitlines() if line and not line.startswith("\t")
                and line.rstrip().endswith(":")}

    before = stale()
    assert before <= {"sources", "preferences"}, before  # always_changed, nothing else
    for edited in ("tasks/prompt/data.py", "tasks/prompt/scoring.py", "tasks/prompt/evaluation.py", "stats.py"):
        with (code / edited).open("a") as f:
            f.write("\n# edited\n")
        assert stale() == before, edited
    with (code / "tasks" / "summarisation" / "data.py").open("a") as f:
        f.write("\n# edited\n")
    after = stale() - before
    assert {"prepare", "base_model", "sample@1", "fit_guidance@1", "train_lm@1", "baseline"} <= after, after
    assert not {"rank@1", "evaluate@1", "report"} & after, after  # they run no task data code


@pytest.mark.slow
def test_a_third_task_is_one_folder_and_runs_the_whole_pipeline(tmp_path):
    """The toy task ``copy`` (src/ptg/tasks/copy, which no other file names) runs every stage of the packaged
    pipeline with ``task.name: copy``: its generated examples are prepared, its samples ranked by their similarity
    to the input, and PTG and the baseline trained, evaluated and reported; dvc.lock records its folder's modules."""
    import yaml

    from ptg.ops.workspace import make_workspace

    params = yaml.safe_load((SRC.parents[1] / "configs" / "quick.yaml").read_text())
    params["task"]["name"] = "copy"
    params["data"] |= {"prompt_template": "Copy: {input}", "max_train": 16, "max_validation": 8, "max_test": 8}
    params["sample"] |= {"train_inputs": 8, "validation_inputs": 4}
    params["rounds"] = {"1": {"prev": 0}}
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ws = make_workspace(tmp_path / "copy.yaml", tmp_path / "ws")
    run(["dvc", "repro"], ws, env={"OMP_NUM_THREADS": "1"})

    prepared = pd.read_parquet(ws / "data" / "prepared" / "test.parquet")
    assert len(prepared) == 8 and (prepared["target"] == prepared["input"]).all()
    assert prepared["prompt"].str.startswith("Copy: ").all()
    rankings = pd.read_parquet(ws / "data" / "rounds" / "1" / "rankings.parquet")
    assert len(rankings) == (8 + 4) * 3 and rankings["score"].between(0, 1).all()
    for arm in ("rounds", "baseline"):
        assert json.loads((ws / "metrics" / arm / "1" / "evaluate.json").read_text())["items"] == 8
    report = pd.read_csv(ws / "metrics" / "report" / "eval_by_round.csv")
    assert report["round"].tolist() == [1] and {"ptg_rougeL", "mle_rougeL"} <= set(report.columns)
    lock = (ws / "dvc.lock").read_text()
    assert "src/ptg/tasks/copy/data.py" in lock and "src/ptg/tasks/summarisation" not in lock
