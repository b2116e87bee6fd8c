"""ptg.corpus: the standard-library docstrings corpus, hash splits, local folders and build_examples (no network)."""

import ast
import hashlib
import json
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ptg import corpus
from ptg.config import DataConfig
from ptg.corpus import build_examples, docstrings, load_local, normalize_fields, source_info, split_of
from ptg.corpus.docstrings import python_docstrings
from ptg.io import read_table, write_table
from ptg.schemas import Examples

# ---------------------------------------------------------------------------------------------------------------
# Docstring corpus: a controlled tree
# ---------------------------------------------------------------------------------------------------------------

MODULE = '''\
import os


def add(a, b):
    """Add two numbers and return their sum.

    Longer description that is not part of the target.
    """
    return a + b


def restated(x):
    """restated(x) -> int

    Return an int.
    """
    return 1


def only_doc():
    """This function has nothing but a docstring."""


def short():
    """Too short."""
    return 0


def no_doc():
    return 1


class Box:
    """A box."""

    @property
    def size(self):
        """The size of the box, in litres
        rounded down to whole numbers."""  # trailing comment
        return 3

    async def fill(self, what):
        """Fill the box with something asynchronously."""
        await what


if os.name:
    def conditional():
        """Defined under an if statement only."""
        return None


def one_line(): "Docstring on the def line here."; return 1
'''


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "site-packages").mkdir()
    (root / "pkg" / "__init__.py").write_text(MODULE)
    (root / "mod.py").write_text(MODULE)
    (root / "test_mod.py").write_text(MODULE)
    (root / "pkg" / "tests" / "helpers.py").write_text(MODULE)
    (root / "pkg" / "__pycache__" / "cached.py").write_text(MODULE)
    (root / "site-packages" / "third.py").write_text(MODULE)
    (root / "broken.py").write_text("def f(:\n    '''Not parsed at all here.'''\n")
    (root / "latin.py").write_bytes("# -*- coding: latin-1 -*-\ndef caf():\n    '''Return the café menu now.'''\n"
                                    "    return 'é'\n".encode("latin-1"))
    (root / "bad_utf8.py").write_bytes(b"def g():\n    '''Return bad bytes here \xff.'''\n    return 1\n")
    return root


def test_docstrings_on_a_controlled_tree(tree):
    df = python_docstrings(root=tree)
    by_id = df.set_index("id")
    assert sorted(by_id.index) == sorted([
        "mod.add", "mod.Box.size", "mod.Box.fill", "mod.conditional",
        "pkg.add", "pkg.Box.size", "pkg.Box.fill", "pkg.conditional", "latin.caf"])
    assert by_id.loc["mod.add", "target"] == "Add two numbers and return their sum."
    assert by_id.loc["mod.add", "input"] == "def add(a, b):\n    return a + b\n"
    assert by_id.loc["mod.Box.size", "target"] == "The size of the box, in litres rounded down to whole numbers."
    assert by_id.loc["mod.Box.size", "input"] == "def size(self):\n    return 3\n"  # dedented, decorator left out
    assert by_id.loc["mod.Box.fill", "input"].startswith("async def fill(self, what):\n    await what")
    assert by_id.loc["latin.caf", "input"] == "def caf():\n    return 'é'\n"
    assert list(df.columns) == ["id", "input", "target"]


def test_docstrings_max_input_chars(tree):
    short = python_docstrings(max_input_chars=30, root=tree)
    assert set(short["id"]) == {"mod.Box.size", "pkg.Box.size", "latin.caf"}  # 29, 29 and 26 characters
    assert short["input"].str.len().max() <= 30


def test_docstring_helpers():
    assert docstrings.docstring_summary("  One\n  two   three.\n\n  Rest.") == "One two three."
    assert docstrings.restates_signature("f(a, b) -> int", "f")
    assert docstrings.restates_signature("S.lower() -> str Return a copy.", "lower")
    assert docstrings.restates_signature("f(x) computes things", "f")
    assert not docstrings.restates_signature("Return f(x) for every x.", "f")


# ---------------------------------------------------------------------------------------------------------------
# Docstring corpus: the real standard library (a few seconds, built once)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_corpus():
    return python_docstrings(max_input_chars=2000)


def test_stdlib_corpus_size_and_targets(stdlib_corpus):
    df = stdlib_corpus
    assert len(df) > 1000
    assert df["id"].is_unique
    words = df["target"].str.split().str.len()
    assert words.between(3, 40).all()
    assert not df["target"].str.contains("\n").any()
    assert df["input"].str.len().max() <= 2000
    assert not any({"test", "tests", "idle_test"} & set(i.split(".")[:-1]) for i in df["id"])  # cgi.test is fine


def test_stdlib_inputs_have_no_docstring(stdlib_corpus):
    rows = stdlib_corpus.sample(n=200, random_state=0)
    parsed = 0
    for code, target in zip(rows["input"], rows["target"], strict=True):
        assert code.lstrip().startswith(("def ", "async def "))
        assert target not in " ".join(code.split())
        try:
            fn = ast.parse(code).body[0]
        except SyntaxError:  # dedent can fail on odd indentation of multi-line strings
            continue
        parsed += 1
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(fn) is None
    assert parsed >= 190


def test_python_version_recorded():
    assert docstrings.python_version() == sys.version


# ---------------------------------------------------------------------------------------------------------------
# Hash splits
# ---------------------------------------------------------------------------------------------------------------


def test_split_of_is_stable_and_roughly_80_10_10():
    ids = [f"module.func_{i}" for i in range(20000)]
    first = [split_of(i) for i in ids]
    assert first == [split_of(i) for i in ids]
    counts = Counter(first)
    assert set(counts) == {"train", "validation", "test"}
    assert abs(counts["train"] / len(ids) - 0.8) < 0.02
    assert abs(counts["validation"] / len(ids) - 0.1) < 0.02 and abs(counts["test"] / len(ids) - 0.1) < 0.02
    # the SHA-1 rule itself: a change of hash would silently move examples between splits
    assert all(split_of(i) == _sha1_split(i) for i in ids[:500])


def _sha1_split(x: str) -> str:
    bucket = int(hashlib.sha1(x.encode()).hexdigest()[:16], 16) % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


# ---------------------------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{"id": f"tr{i}", "doc": ["word", str(i)], "summary": f"summary {i}"} for i in range(30)])
    pd.DataFrame({"doc": [f"dev doc {i}" for i in range(12)], "summary": [f"dev sum {i}" for i in range(12)]}).to_csv(
        d / "dev.csv", index=False)
    _jsonl(d / "test.json", [{"id": f"te{i}", "doc": f"test doc {i}", "summary": [f"ref a {i}", f"ref b {i}"]}
                             for i in range(10)])
    return d


def test_load_local_fields_dev_mapping_and_lists(folder):
    df = load_local(folder, "doc", "summary")
    assert list(df.columns) == ["id", "split", "input", "references"]
    assert df["split"].value_counts().to_dict() == {"train": 30, "validation": 12, "test": 10}
    train = df[df["split"] == "train"].set_index("id")
    assert train.loc["tr3", "input"] == "word 3"  # list input joined with spaces
    assert train.loc["tr3", "references"] == ["summary 3"]
    dev = df[df["split"] == "validation"]
    assert dev["id"].tolist()[:2] == ["validation-0", "validation-1"]  # no id column: <split>-<row>
    test = df[df["split"] == "test"].set_index("id")
    assert test.loc["te4", "references"] == ["ref a 4", "ref b 4"]


def test_load_local_missing_field_names_file_and_field(folder):
    with pytest.raises(ValueError, match=r"train\.jsonl.*'body'.*available columns: id, doc, summary"):
        load_local(folder, "body", "summary")


def test_load_local_parquet_and_missing_split(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    for split in ("train", "validation"):
        pd.DataFrame({"input": ["a b", "c d"], "target": [np.array(["x", "y"], dtype=object), np.array(["z"])],
                      "id": [f"{split}1", f"{split}2"]}).to_parquet(d / f"{split}.parquet")
    with pytest.raises(FileNotFoundError, match="no test file"):
        load_local(d)
    pd.DataFrame({"input": ["e"], "target": ["w"]}).to_parquet(d / "test.parquet")
    df = load_local(d)
    assert df.set_index("id").loc["train1", "references"] == ["x", "y"]
    (d / "test.jsonl").write_text('{"input": "e", "target": "w"}\n')
    with pytest.raises(ValueError, match="several test files"):
        load_local(d)


def test_load_local_rejects_rows_without_input_or_target(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for split in ("train", "validation", "test"):
        _jsonl(d / f"{split}.jsonl", [{"input": "x", "target": "y"}, {"input": "x2", "target": ""},
                                      {"input": "", "target": "z"}, {"input": "x3", "target": None}])
    with pytest.raises(ValueError, match=r"train\.jsonl: empty 'input' / 'target' in 3 row\(s\): row 1"):
        load_local(d)


def test_hub_style_normalisation_drops_blank_rows_with_a_warning(caplog):
    raw = pd.DataFrame({"input": ["x", "x2", ""], "target": ["y", "", "z"]})
    df = normalize_fields(raw, "train", "input", "target", "hub[train]", strict=False)
    assert len(df) == 1 and "dropped 2 of 3 rows" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# build_examples
# ---------------------------------------------------------------------------------------------------------------


def test_build_examples_local_caps_and_schema(folder, tmp_path):
    cfg = DataConfig(source=str(folder), input_field="doc", target_field="summary", max_train=8, max_validation=5,
                     max_test=0, prompt_template="Doc: {input}\nSummary:", max_input_chars=0, seed=3)
    frames = build_examples(cfg)
    assert {k: len(v) for k, v in frames.items()} == {"train": 8, "validation": 5, "test": 10}
    again = build_examples(cfg)
    assert all(frames[k]["id"].tolist() == again[k]["id"].tolist() for k in frames)
    other = build_examples(DataConfig(**{**cfg.__dict__, "seed": 4}))
    assert set(other["train"]["id"]) != set(frames["train"]["id"])
    test = frames["test"].set_index("id")
    assert test.loc["te1", "prompt"] == "Doc: test doc 1\nSummary:"
    assert test.loc["te1", "target"] == "ref a 1" and test.loc["te1", "references"] == ["ref a 1", "ref b 1"]
    for split, df in frames.items():
        assert list(df.columns) == list(corpus.EXAMPLE_COLUMNS) and (df["split"] == split).all()
        write_table(df, tmp_path / f"{split}.parquet", Examples)
        read_table(tmp_path / f"{split}.parquet", Examples)


def test_build_examples_docstrings_deterministic_and_disjoint(stdlib_corpus):
    cfg = DataConfig(max_train=50, max_validation=20, max_test=20)
    a, b = build_examples(cfg), build_examples(cfg)
    assert {k: len(v) for k, v in a.items()} == {"train": 50, "validation": 20, "test": 20}
    for split in a:
        assert a[split]["id"].tolist() == b[split]["id"].tolist()
        assert (a[split]["id"].map(split_of) == split).all()
        Examples.validate(a[split])
    ids = [set(df["id"]) for df in a.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    prompt = a["train"]["prompt"].iloc[0]
    assert prompt.startswith("Summarize what this Python function does in one sentence.\n\ndef ")
    info = source_info(cfg, a)
    assert info["rows"] == {"train": 50, "validation": 20, "test": 20}
    assert info["python_version"] == sys.version and info["corpus_size"] == len(stdlib_corpus)
    json.dumps(info)


def test_prompt_template_must_have_only_input():
    with pytest.raises(ValueError, match="input"):
        DataConfig(prompt_template="Summarize this.")
    with pytest.raises(ValueError, match="other"):
        DataConfig(prompt_template="{lang}: {input}")
    assert corpus.format_prompt("Code {{x}}:\n{input}", "f = {'a': 1}") == "Code {x}:\nf = {'a': 1}"


def test_build_examples_rejects_overlapping_local_splits(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for split in ("train", "validation", "test"):
        _jsonl(d / f"{split}.jsonl", [{"id": "same", "input": "x", "target": "y"},
                                      {"id": f"{split}-own", "input": "x", "target": "y"}])
    with pytest.raises(ValueError, match="same"):
        build_examples(DataConfig(source=str(d)))


def test_max_input_chars_drops_long_local_inputs(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for split in ("train", "validation", "test"):
        _jsonl(d / f"{split}.jsonl", [{"input": "x" * 50, "target": "y"}, {"input": "short", "target": "y"}])
    frames = build_examples(DataConfig(source=str(d), max_input_chars=10))
    assert all(df["input"].tolist() == ["short"] for df in frames.values())


def test_datasets_is_not_imported_at_module_level():
    tree = ast.parse(Path(corpus.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert "datasets" not in names and "transformers" not in names


def test_load_hf_uses_load_dataset(monkeypatch):
    class FakeSplit:
        def __init__(self, rows):
            self.rows = rows

        def to_pandas(self):
            return pd.DataFrame(self.rows)

    fake = {"train": FakeSplit({"document": ["a"], "summary": ["b"]}),
            "validation": FakeSplit({"document": ["c"], "summary": ["d"]}),
            "test": FakeSplit({"document": ["e"], "summary": [["f", "g"]]})}
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: calls.append((a, k)) or fake))
    df = corpus.load_hf("someone/xsum-like", "document", "summary")
    assert calls == [(("someone/xsum-like", None), {"revision": None})]
    assert df["split"].tolist() == ["train", "validation", "test"]
    assert df["references"].iloc[2] == ["f", "g"]
    # data.config and data.revision reach load_dataset: the paper's CNN/DailyMail needs its config name
    calls.clear()
    cfg = DataConfig(source="abisee/cnn_dailymail", input_field="document", target_field="summary", config="3.0.0",
                     revision="96df5e6", max_input_chars=0)
    assert len(corpus.load_source(cfg)) == 3
    assert calls == [(("abisee/cnn_dailymail", "3.0.0"), {"revision": "96df5e6"})]


def test_a_hub_revision_on_a_local_folder_names_the_param(folder):
    with pytest.raises(ValueError, match="data.revision 'main' applies to a Hugging Face data set id; "
                                         "data.source .* is a local folder"):
        corpus.load_source(DataConfig(source=str(folder), revision="main"))


def test_a_local_copy_of_a_hub_data_set_is_read_by_its_config_name(tmp_path):
    """data.config on a local folder: the folder is a copy of a hub data set (abisee/cnn_dailymail's layout: its
    README's configs name each configuration's parquet files), read offline by datasets.load_dataset."""
    root = tmp_path / "cnn_dailymail"
    for config, n in (("3.0.0", 3), ("1.0.0", 2)):
        for split in ("train", "validation", "test"):
            (root / config).mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"article": [f"{config} {split} article {i}" for i in range(n)],
                          "highlights": [f"summary {i}" for i in range(n)],
                          "id": [f"{split}{i}" for i in range(n)]}).to_parquet(root / config / f"{split}-0.parquet")
    configs = "".join(f"- config_name: {c}\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: {c}/{s}-*.parquet\n" for s in ("train", "validation", "test"))
        for c in ("3.0.0", "1.0.0"))
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    df = corpus.load_source(DataConfig(source=str(root), input_field="article", target_field="highlights",
                                     config="3.0.0", max_input_chars=0))
    assert len(df) == 9 and df["input"].str.startswith("3.0.0 ").all()
    assert df["references"].iloc[0] == ["summary 0"]
