"""ptg.io (atomic writes, validated tables, readable TableErrors) and the ptg.schemas table models."""

import json

import numpy as np
import pandas as pd
import pytest

from ptg import schemas
from ptg.io import (
    TableError,
    atomic_path,
    read_json,
    read_records,
    read_table,
    validate_table,
    write_json,
    write_records,
    write_table,
)
from ptg.schemas import Examples, HumanScores, Predictions, Rankings, Samples, check_disjoint_splits


def examples() -> pd.DataFrame:
    return pd.DataFrame({
        "id": ["a", "b", "c"],
        "split": ["train", "train", "test"],
        "input": ["def f(): pass", "x", "y"],
        "prompt": ["Summarize: def f(): pass", "Summarize: x", "Summarize: y"],
        "target": ["Does nothing at all.", "the x", "the y"],
        "references": [["Does nothing at all."], ["the x", "an x"], ["the y"]],
    })


def samples(k: int = 3, ids: tuple[str, ...] = ("a", "b")) -> pd.DataFrame:
    rows = [{"id": i, "sample_idx": j, "text": "" if j == 0 else f"t{j}", "token_ids": list(range(1, j + 2)),
             "n_tokens": j + 1, "finished": j % 2 == 0} for i in ids for j in range(k)]
    return pd.DataFrame(rows)


def rankings() -> pd.DataFrame:
    return pd.DataFrame({"id": ["a"] * 3 + ["b"] * 3, "sample_idx": [0, 1, 2] * 2,
                         "score": [0.1, 0.9, 0.5, 2.0, 2.0, -1.0], "rank": [3, 1, 2, 2, 1, 3]})


def predictions() -> pd.DataFrame:
    return pd.DataFrame({"id": ["a", "b"], "prediction": ["p", ""], "references": [["r"], ["s", "t"]],
                         "rouge1": [0.5, 0.0], "rouge2": [0.0, 0.0], "rougeL": [0.5, 0.0], "rougeLsum": [0.5, 0.0],
                         "meteor": [1.0, 0.25], "gen_len": [1.0, 0.0], "n_tokens": [2, 1],
                         "guidance_score": [-3.0, 0.7]})


# ---------------------------------------------------------------------------------------------------------------
# atomic_path / JSON
# ---------------------------------------------------------------------------------------------------------------


def test_atomic_file_replaces_on_success(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".out.txt.tmp-") and not tmp.exists()
        tmp.write_text("new")
        assert not path.exists()
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_atomic_file_error_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_file_error_leaves_no_file(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(KeyError), atomic_path(path) as tmp:
        tmp.write_text("{")
        raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_block_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote nothing"), atomic_path(tmp_path / "x"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_old_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_directory_error_keeps_old_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights.bin").write_text("old")
    with pytest.raises(ValueError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("half")
        raise ValueError
    assert (out / "weights.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_json_format_and_round_trip(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": 1, "a": [1.5, "é"]})
    text = path.read_text(encoding="utf-8")
    assert text == '{\n  "a": [\n    1.5,\n    "é"\n  ],\n  "b": 1\n}\n'
    assert read_json(path) == {"a": [1.5, "é"], "b": 1}
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_json(tmp_path / "nope.json")


def test_write_json_unserialisable_leaves_old_file(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


# ---------------------------------------------------------------------------------------------------------------
# Tables: good frames round-trip
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "schema"), [(examples, Examples), (samples, Samples), (rankings, Rankings),
                                              (predictions, Predictions)])
def test_parquet_round_trip_validates(tmp_path, make, schema):
    path = tmp_path / "t.parquet"
    write_table(make(), path, schema)
    back = read_table(path, schema)
    assert len(back) == len(make()) and list(back.columns) == list(make().columns)


def test_examples_round_trip_list_references_come_back_as_arrays(tmp_path):
    path = tmp_path / "examples.parquet"
    write_table(examples(), path, Examples)
    back = read_table(path, Examples)
    assert isinstance(back["references"].iloc[1], np.ndarray)
    assert list(back["references"].iloc[1]) == ["the x", "an x"]
    assert back["target"].tolist() == examples()["target"].tolist()


def test_samples_accept_tuples_and_int_arrays_and_empty_text():
    df = samples()
    df["token_ids"] = [np.array(t, dtype=np.int32) if i % 2 else tuple(t) for i, t in enumerate(df["token_ids"])]
    validate_table(df, Samples)


def test_human_scores_and_coercion():
    out = validate_table(pd.DataFrame({"id": [1, 2], "text": ["a", "b"], "score": [1, 2]}), HumanScores)
    assert out["id"].tolist() == ["1", "2"] and out["score"].dtype == float
    with pytest.raises(TableError, match="finite"):
        validate_table(pd.DataFrame({"id": ["1"], "text": ["a"], "score": [float("-inf")]}), HumanScores)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_write_records_by_suffix_round_trips_and_refuses_bad_tables(tmp_path, suffix):
    scores = pd.DataFrame({"id": ["7", "a"], "text": ['x, "y"\nz', ""], "score": [1.5, -2.0]})
    path = tmp_path / f"scores{suffix}"
    write_records(scores, path, HumanScores)
    pd.testing.assert_frame_equal(read_table(path, HumanScores), validate_table(scores, HumanScores))
    before = path.read_bytes()
    with pytest.raises(TableError, match=f"(?s)scores{suffix}: .*column 'score'"):
        write_records(scores.assign(score=[np.nan, 1.0]), path, HumanScores)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match=r"scores\.txt: unsupported table format"):
        write_records(scores, tmp_path / "scores.txt", HumanScores)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_rank_ties_are_allowed():
    df = rankings()  # id b: samples 0 and 1 tie at 2.0; sample 1 has rank 1
    validate_table(df, Rankings)
    validate_table(df.assign(rank=[3, 1, 2, 1, 2, 3]), Rankings)


# ---------------------------------------------------------------------------------------------------------------
# Tables: bad frames are refused with a readable TableError and nothing is written
# ---------------------------------------------------------------------------------------------------------------


def _bad_cases():
    ex = examples()
    sm = samples()
    rk = rankings()
    return [
        ("missing_column", ex.drop(columns=["target"]), Examples, "target"),
        ("extra_column", ex.assign(extra=1), Examples, "extra"),
        ("empty_target", ex.assign(target=["Does nothing at all.", "  ", "the y"],
                                   references=[["Does nothing at all."], ["  "], ["the y"]]), Examples, "target"),
        ("target_not_first_reference", ex.assign(target=["Does nothing at all.", "an x", "the y"]), Examples,
         "target_is_first_reference"),
        ("empty_references", ex.assign(references=[["Does nothing at all."], [], ["the y"]]), Examples,
         "references"),
        ("bad_split", ex.assign(split=["train", "dev", "test"]), Examples, "split"),
        ("duplicate_id", ex.assign(id=["a", "a", "c"]), Examples, "id"),
        ("nan_score", rk.assign(score=[0.1, np.nan, 0.5, 2.0, 2.0, -1.0]), Rankings, "score"),
        ("inf_score", rk.assign(score=[0.1, np.inf, 0.5, 2.0, 2.0, -1.0]), Rankings, "score"),
        ("rank_not_permutation", rk.assign(rank=[1, 1, 2, 2, 1, 3]), Rankings, "rank"),
        ("rank1_not_best", rk.assign(rank=[1, 3, 2, 2, 1, 3]), Rankings, "rank_1_has_max_score"),
        ("k_differs", samples().iloc[:-1], Samples, "sample_idx"),
        ("sample_idx_gap", sm.assign(sample_idx=[0, 1, 3, 0, 1, 2]), Samples, "sample_idx"),
        ("duplicate_sample", sm.assign(sample_idx=[0, 0, 1, 0, 1, 2]), Samples, "sample_idx"),
        ("n_tokens_mismatch", sm.assign(n_tokens=[1, 2, 9, 1, 2, 3]), Samples, "n_tokens"),
        ("empty_token_ids", sm.assign(token_ids=[[1], [], [1, 2, 3], [1], [1, 2], [1, 2, 3]]), Samples,
         "token_ids"),
        ("negative_token", sm.assign(token_ids=[[-1], [1, 2], [1, 2, 3], [1], [1, 2], [1, 2, 3]]), Samples,
         "token_ids"),
        ("finished_not_bool", sm.assign(finished=["yes"] * 6), Samples, "finished"),
        ("meteor_above_1", predictions().assign(meteor=[1.5, 0.2]), Predictions, "meteor"),
    ]


@pytest.mark.parametrize(("df", "schema", "needle"), [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()])
def test_write_table_refuses_bad_frame(tmp_path, df, schema, needle):
    path = tmp_path / "bad.parquet"
    with pytest.raises(TableError) as info:
        write_table(df, path, schema)
    message = str(info.value)
    assert str(path) in message and needle in message and schema.__name__ in message
    assert info.value.failure_cases is not None and len(info.value.failure_cases)
    assert len(message.splitlines()) <= 30
    assert list(tmp_path.iterdir()) == []


def test_write_table_failure_keeps_previous_table(tmp_path):
    path = tmp_path / "rankings.parquet"
    write_table(rankings(), path, Rankings)
    before = path.read_bytes()
    with pytest.raises(TableError):
        write_table(rankings().assign(score=np.nan), path, Rankings)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rankings.parquet"]


def test_table_error_shows_at_most_five_rows_per_check():
    df = pd.DataFrame({"id": [f"i{j}" for j in range(20)], "text": ["x"] * 20, "score": [np.inf] * 20})
    with pytest.raises(TableError) as info:
        validate_table(df, HumanScores, "scores.csv")
    message = str(info.value)
    assert message.startswith("scores.csv:") and "'score'" in message and "20 values" in message
    assert "[4] inf" in message and "[5] inf" not in message and "+15 more" in message


def test_read_table_validates_and_names_missing_file(tmp_path):
    path = tmp_path / "samples.parquet"
    samples().iloc[:-1].to_parquet(path)  # written around the schema: K differs between ids
    with pytest.raises(TableError, match="same_K"):
        read_table(path, Samples)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_table(tmp_path / "missing.parquet", Samples)


def test_check_disjoint_splits_names_shared_ids():
    frames = {"train": pd.DataFrame({"id": ["a", "b", "c"]}), "validation": pd.DataFrame({"id": ["d"]}),
              "test": pd.DataFrame({"id": ["c", "a", "e"]})}
    with pytest.raises(ValueError, match=r"train & test: 2 shared ids: 'a', 'c'"):
        check_disjoint_splits(frames)
    frames["test"] = pd.DataFrame({"id": ["e"]})
    check_disjoint_splits(frames)


def test_element_predicates():
    assert schemas.is_reference_list(["a"]) and schemas.is_reference_list(np.array(["a", "b"], dtype=object))
    assert schemas.is_reference_list(("a",))
    assert not schemas.is_reference_list([]) and not schemas.is_reference_list("a")
    assert not schemas.is_reference_list(["a", ""]) and not schemas.is_reference_list([1])
    assert schemas.is_token_list([0, 5]) and schemas.is_token_list(np.array([3], dtype=np.int64))
    assert not schemas.is_token_list([]) and not schemas.is_token_list([True])
    assert not schemas.is_token_list(np.array([1.0])) and not schemas.is_token_list([1, -2])


def test_atomic_write_removes_what_a_killed_writer_left_beside_the_path(tmp_path):
    # SIGKILL inside atomic_path leaves .<name>.tmp-* (and, mid-swap, .<name>.old-*); the next write cleans up.
    (tmp_path / ".lm.tmp-dead").mkdir()
    (tmp_path / ".lm.tmp-dead" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".lm.old-dead").mkdir()
    (tmp_path / ".other.tmp-keep").write_text("another path's temporary is not ours")
    with atomic_path(tmp_path / "lm") as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "lm"]


def test_a_truncated_parquet_table_names_itself_and_the_remedy(tmp_path):
    path = tmp_path / "samples.parquet"
    pd.DataFrame({"a": range(100)}).to_parquet(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"samples.parquet: not a readable parquet table, truncated or corrupt"):
        read_records(path)


def test_a_missing_extra_names_what_needs_it_and_the_extra_to_install(monkeypatch):
    import sys

    from ptg.corpus import load_hf

    monkeypatch.setitem(sys.modules, "datasets", None)  # as in an install without ptg[hub]
    with pytest.raises(ModuleNotFoundError, match=r"data.source 'org/set' .*pip install 'ptg\[hub\]'"):
        load_hf("org/set")
