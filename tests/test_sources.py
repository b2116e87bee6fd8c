"""Local data and model folders named in params are DVC dependencies through the `sources` stage (ptg.pipeline.sources):
editing one in place reruns the stage that reads it; a run with nothing edited reruns nothing."""

import json

import pandas as pd
import pytest
import yaml
from conftest import QUICK, run

from ptg.lm.base_models import build_tiny
from ptg.ops.workspace import make_workspace
from ptg.pipeline import sources

ROWS = {"train": 6, "validation": 3, "test": 3}


def _write_split(folder, split, n, extra=""):
    rows = [{"input": f"def f{i}(): return {i}{extra}", "target": f"Return {i}."} for i in range(n)]
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def local_project(tmp_path):
    """A workspace of the quick profile whose data.source and model.policy are local folders."""
    data = tmp_path / "my-data"
    data.mkdir()
    for split, n in ROWS.items():
        _write_split(data, split, n)
    build_tiny("tiny-llama", tmp_path / "my-lm", seed=1)
    params = yaml.safe_load(QUICK.read_text())
    params["data"]["source"], params["model"]["policy"] = str(data), str(tmp_path / "my-lm")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return make_workspace(tmp_path / "params.yaml", tmp_path / "ws"), data, tmp_path / "my-lm"


def _ran(out) -> set[str]:
    return {line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")}


def test_editing_local_data_or_model_in_place_reruns_what_reads_it(local_project):
    ws, data, lm = local_project
    assert _ran(run(["dvc", "repro", "prepare", "base_model"], ws)) == {"sources", "prepare", "base_model"}
    assert _ran(run(["dvc", "repro", "prepare", "base_model"], ws)) == {"sources"}  # nothing edited
    _write_split(data, "test", 4, extra="  # edited")  # the user edits a file of data.source in place
    assert _ran(run(["dvc", "repro", "prepare", "base_model"], ws)) == {"sources", "prepare"}
    test = pd.read_parquet(ws / "data" / "prepared" / "test.parquet")
    assert len(test) == 4 and test["input"].str.endswith("# edited").all()
    before = (ws / "data" / "rounds" / "0" / "lm" / "model.safetensors").read_bytes()
    build_tiny("tiny-llama", lm, seed=2)  # new weights in the model folder
    assert _ran(run(["dvc", "repro", "prepare", "base_model"], ws)) == {"sources", "base_model"}
    assert (ws / "data" / "rounds" / "0" / "lm" / "model.safetensors").read_bytes() != before


def test_a_fingerprint_lists_files_and_keeps_ids_as_written(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bb")
    (folder / "sub" / "a.txt").write_text("a")
    got = sources.fingerprint(str(folder))
    assert [f[:2] for f in got["files"]] == [["b.txt", 2], ["sub/a.txt", 1]]
    assert sources.fingerprint(str(folder)) == got  # nothing changed: the same
    (folder / "b.txt").write_text("bbb")
    assert sources.fingerprint(str(folder)) != got
    assert sources.fingerprint("python-docstrings") == {"spec": "python-docstrings"}  # a built-in name or hub id
    assert sources.fingerprint(None) == {"spec": None}
