"""The README's three recipes, run end to end (`dvc repro` of one round up to its evaluation) on tiny models, offline:
the recipe's own params block, read from README.md (```yaml blocks whose first line is `# recipe: <name>`) or its
shipped config, at the quick profile's sizes (``ptg.ops.workspace.at_quick_sizes``), with a local folder standing in
for each hub id. What a recipe says is
what runs: a key renamed in the code or the README fails here."""

import json
import re

import pandas as pd
import pytest
import yaml
from conftest import QUICK, REPO, run

from ptg.guidance import preferences
from ptg.lm.base_models import build_tiny
from ptg.ops.workspace import at_quick_sizes, make_workspace

pytestmark = pytest.mark.slow

def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def recipe(name: str) -> dict:
    """The README's ```yaml block for recipe ``name``."""
    blocks = re.findall(r"```yaml\n(# recipe: (\S+).*?)```", (REPO / "README.md").read_text(), re.S)
    found = [yaml.safe_load(text) for text, label in blocks if label == name]
    assert len(found) == 1, f"README.md: expected one ```yaml block starting '# recipe: {name}', found {len(found)}"
    return found[0]


def own_data(folder, input_field="document", target_field="summary", n=(24, 8, 8)):
    folder.mkdir(parents=True)
    for split, count in zip(("train", "validation", "test"), n, strict=True):
        rows = [{input_field: f"def f{i}_{split}(x): return x + {i}", target_field: f"Add {i} to x."}
                for i in range(count)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def run_pipeline(params: dict, tmp_path) -> dict:
    """``dvc repro`` of ``params`` up to round 1's evaluation (every stage the recipe's data, models and preferences
    reach; the baseline and the report read only what these write, and test_pipeline runs them)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ws = make_workspace(tmp_path / "params.yaml", tmp_path / "project")
    run(["dvc", "repro", "evaluate@1"], ws)
    assert (ws / "data" / "rounds" / "1" / "lm" / "config.json").is_file()  # a trained LM
    return json.loads((ws / "metrics" / "rounds" / "1" / "evaluate.json").read_text())


def test_recipe_own_data_and_a_hub_model(tmp_path):
    """(a) your data folder and a hub model id: the folder and a local model folder (for the hub id) go in as the
    recipe writes them; every test input is evaluated."""
    params = recipe("own-data")
    assert "/" in params["model"]["policy"] and not params["model"]["policy"].startswith(("/", "."))  # a hub id
    build_tiny("tiny-llama", tmp_path / "hub-model")
    small = at_quick_sizes(merge(yaml.safe_load((REPO / "params.yaml").read_text()), params))
    small = merge(small, {"data": {"source": str(own_data(tmp_path / "my-data"))},
                          "model": {"policy": str(tmp_path / "hub-model"), "revision": None}})
    assert run_pipeline(small, tmp_path)["items"] == 8


def test_recipe_preference_file_to_a_trained_lm(tmp_path):
    """(b) your preference file (pairwise) beside the inputs it answers: round 1 fits the guidance on it first, then
    mixes it in; the preferences are read with the data's prompt template (preferences.prompt_template null)."""
    params = recipe("preferences")
    assert params["preferences"].get("prompt_template") is None
    data = own_data(tmp_path / "my-data", "input", "target")
    examples = pd.read_json(data / "train.jsonl", lines=True).assign(id=lambda d: d.index.astype(str))
    pairs = preferences.corruption_fixture(examples, seed=0, layout="pairwise")
    pairs.to_json(tmp_path / "prefs.jsonl", orient="records", lines=True)
    params = merge(params, {"data": {"source": str(data)}, "preferences": {"path": str(tmp_path / "prefs.jsonl")}})
    params = merge(yaml.safe_load(QUICK.read_text()), params)
    run_pipeline(at_quick_sizes(params), tmp_path)
    fit = json.loads((tmp_path / "project" / "metrics" / "rounds" / "1" / "fit_guidance.json").read_text())
    assert fit["prior_updates"] == params["preferences"]["prior_updates"] and fit["preference_train_groups"] > 0


def test_recipe_the_papers_cnn_dailymail_setting(tmp_path):
    """(c) configs/paper-cnndm.yaml: abisee/cnn_dailymail's config 3.0.0 and t5-small, here a local copy of the
    data set in the hub's layout (read by datasets with the config name) and a tiny T5 for t5-small."""
    params = yaml.safe_load((REPO / "configs" / "paper-cnndm.yaml").read_text())
    assert (params["data"]["source"], params["data"]["config"]) == ("abisee/cnn_dailymail", "3.0.0")
    copy = tmp_path / "cnn_dailymail"
    for split in ("train", "validation", "test"):
        (copy / "3.0.0").mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"article": [f"({split} {i}) The council voted {i} to 2 to open the bridge." for i in range(24)],
                      "highlights": [f"Council votes {i} to 2 for the bridge." for i in range(24)],
                      "id": [f"{split}{i}" for i in range(24)]}).to_parquet(copy / "3.0.0" / f"{split}-0.parquet")
    files = "".join(f"  - split: {s}\n    path: 3.0.0/{s}-*.parquet\n" for s in ("train", "validation", "test"))
    (copy / "README.md").write_text(f"---\nconfigs:\n- config_name: 3.0.0\n  data_files:\n{files}---\n")
    build_tiny("tiny-t5", tmp_path / "t5-small")
    params = merge(at_quick_sizes(params), {"data": {"source": str(copy)}, "model": {
        "policy": str(tmp_path / "t5-small"), "guidance": str(tmp_path / "t5-small")}})
    assert run_pipeline(params, tmp_path)["items"] == 16  # the quick profile's test cap
