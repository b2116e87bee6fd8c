"""The bad-input table (#11): each case feeds ptg one bad input through the path a user hits (a stage's ``main``,
run in a scratch project folder) and checks that it stops with an error naming the file or the param, the field
and the offending values, and that it wrote nothing: no output at the stage's paths and no temporaries.

Inputs that are not errors by design have their own tests at the end: an input longer than every limit (dropped by
``data.max_input_chars``, or with ``max_input_chars: 0`` kept and cut to ``model.max_prompt_tokens`` keeping its
start), preference lists of different K, and a one-candidate preference list (skipped and counted).
Tiny models only; no network."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import REPO

from ptg import schemas
from ptg.config import ParamsError
from ptg.io import TableError, read_json, read_table, write_table

QUICK = REPO / "configs" / "quick.yaml"

# What each stage writes: none of it may exist after a failure.
PREPARE_OUT = ("data/prepared", "metrics/prepare.json")
PREFERENCES_OUT = ("data/preferences.parquet", "metrics/preferences.json")
BASE_OUT = ("data/rounds/0",)
SAMPLE_OUT = ("data/rounds/1/samples.parquet", "metrics/rounds/1")
RANK_OUT = ("data/rounds/1/rankings.parquet", "metrics/rounds/1")
FIT_OUT = ("data/rounds/1/guidance", "metrics/rounds/1")
TRAIN_OUT = ("data/rounds/1/lm", "metrics/rounds/1")
REPORT_OUT = ("metrics/report",)


def stage(name: str) -> Any:
    """The module of stages/<name>.py (its ``main`` is what `dvc repro` runs)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def good_rows(split: str, n: int = 3) -> list[dict[str, Any]]:
    prefix = {"train": "tr", "validation": "va", "test": "te"}[split]
    return [{"id": f"{prefix}{i}", "input": f"def f{i}(x): return x + {i}", "target": f"Add {i} to x."}
            for i in range(n)]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def data_folder(ws: Path, suffix: str = ".jsonl", **files: bytes) -> dict[str, Any]:
    """ws/mydata with a train, validation and test file (good rows unless given as bytes); the params that use it."""
    folder = ws / "mydata"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        name = split + (suffix if split in files else ".jsonl")
        (folder / name).write_bytes(files.get(split, jsonl(good_rows(split))))
    return {"data": {"source": str(folder)}}


def samples_frame(k_by_id: dict[str, int]) -> pd.DataFrame:
    rows = [{"id": i, "sample_idx": j, "text": f"sample {j} of {i}", "token_ids": [5 + j, 4], "n_tokens": 2,
             "finished": True} for i, k in k_by_id.items() for j in range(k)]
    return pd.DataFrame(rows)


def put_samples(ws: Path, k_by_id: dict[str, int]) -> None:
    """Round 1's samples.parquet as written outside the schema (so bad ones reach the stage that reads them)."""
    (ws / "data" / "rounds" / "1").mkdir(parents=True, exist_ok=True)
    samples_frame(k_by_id).to_parquet(ws / "data" / "rounds" / "1" / "samples.parquet")


def put_prepared(ws: Path) -> None:
    for split in ("train", "validation"):
        rows = good_rows(split)
        frame = pd.DataFrame({"id": [r["id"] for r in rows], "split": split, "input": [r["input"] for r in rows],
                              "prompt": [f"Summarize.\n\n{r['input']}" for r in rows],
                              "target": [r["target"] for r in rows], "references": [[r["target"]] for r in rows]})
        write_table(frame, ws / "data" / "prepared" / f"{split}.parquet", schemas.Examples)


def scores_file(ws: Path, text: str) -> dict[str, Any]:
    """ws/scores.csv with ``text`` (human scores of round 1's samples a:0-2, b:0-2) and the params that rank by it."""
    put_samples(ws, {"a": 3, "b": 3})
    (ws / "scores.csv").write_text("id,text,score\n" + text)
    return {"rank": {"metric": "file", "scores_file": str(ws / "scores.csv")}}


GOOD_SCORES = {(i, j): f"{i},sample {j} of {i},{j}" for i in "ab" for j in range(3)}


def scores_with(**changed: str) -> str:
    """The good scores.csv body with some rows replaced (keys like a1 = id a, sample 1)."""
    rows = dict(GOOD_SCORES) | {(k[0], int(k[1])): v for k, v in changed.items()}
    return "".join(v + "\n" for v in rows.values())


def preferences_file(ws: Path, content: bytes, name: str = "prefs.jsonl", **params: Any) -> dict[str, Any]:
    (ws / name).write_bytes(content)
    return {"preferences": {"path": str(ws / name), **params}}


def pref_rows(groups: dict[str, int]) -> list[dict[str, Any]]:
    """Listwise rows: for each input, K candidates with scores 0..K-1."""
    return [{"input": f"def {g}(): pass", "text": f"candidate {j} of {g}", "score": float(j)}
            for g, k in groups.items() for j in range(k)]


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One row: ``make(ws, models)`` writes the bad input and returns the params overrides (or None); ``run()`` is
    the stage that reads it."""

    make: Callable[[Path, dict[str, Path]], dict[str, Any] | None]
    run: Callable[[], None]
    error: type[Exception]
    says: tuple[str, ...]  # what the message must name: the file or param, the field, offending values
    outputs: tuple[str, ...]


def prepare() -> None:
    stage("prepare").main("params.yaml")


def preferences() -> None:
    stage("preferences").main("params.yaml")


def rank() -> None:
    stage("rank").main(1, "params.yaml")


def sample() -> None:
    stage("sample").main(1, "params.yaml")


def fit_guidance() -> None:
    stage("fit_guidance").main(1, "params.yaml")


def train_lm() -> None:
    stage("train_lm").main(1, "params.yaml")


def base_model() -> None:
    stage("base_model").main("params.yaml")


def report() -> None:
    stage("report").main("params.yaml")


NOT_UTF8 = "café".encode("latin-1")  # b"caf\xe9"

CASES: dict[str, Bad] = {
    # --- a user data folder (data.source), read by `prepare`
    "data-missing-column": Bad(
        lambda ws, m: data_folder(ws, train=jsonl([{"input": "x", "summary": "y"}])),
        prepare, ValueError, ("mydata/train.jsonl", "no field 'target'", "available columns: input, summary"),
        PREPARE_OUT),
    "data-wrong-column-type": Bad(
        lambda ws, m: data_folder(ws, train=jsonl([*good_rows("train"), {"id": "tr9", "input": {"code": "def f()"},
                                                                          "target": "y"}])),
        prepare, ValueError, ("mydata/train.jsonl", "field 'input' must hold text", "row 3 (id 'tr9')",
                              "{'code': 'def f()'}"), PREPARE_OUT),
    "data-empty-text": Bad(
        lambda ws, m: data_folder(ws, validation=jsonl([*good_rows("validation", 1),
                                                        {"id": "va1", "input": "x", "target": ""}])),
        prepare, ValueError, ("mydata/validation.jsonl", "empty 'target'", "row 1 (id 'va1')"), PREPARE_OUT),
    "data-whitespace-only-text": Bad(
        lambda ws, m: data_folder(ws, test=jsonl([{"id": "te0", "input": " \t\n ", "target": "y"},
                                                  *good_rows("test")[1:]])),
        prepare, ValueError, ("mydata/test.jsonl", "empty 'input'", "row 0 (id 'te0')"), PREPARE_OUT),
    "data-not-utf8-jsonl": Bad(
        lambda ws, m: data_folder(ws, train=jsonl(good_rows("train", 1)) + b'{"input": "' + NOT_UTF8
                                  + b'", "target": "y"}\n'),
        prepare, ValueError, ("mydata/train.jsonl:2", "not UTF-8", r"b'\xe9'", "caf"), PREPARE_OUT),
    "data-not-utf8-csv": Bad(
        lambda ws, m: data_folder(ws, ".csv", train=b"id,input,target\ntr0,x,y\ntr1," + NOT_UTF8 + b",z\n"),
        prepare, ValueError, ("mydata/train.csv:3", "not UTF-8", r"b'\xe9'"), PREPARE_OUT),
    "data-duplicate-ids": Bad(
        lambda ws, m: data_folder(ws, test=jsonl([*good_rows("test"), {"id": "te0", "input": "z", "target": "w"}])),
        prepare, ValueError, ("mydata/test.jsonl", "field 'id' must be unique", "'te0' (rows 0, 3)"), PREPARE_OUT),
    "data-ids-shared-between-splits": Bad(
        lambda ws, m: data_folder(ws, test=jsonl(good_rows("train", 2))),
        prepare, ValueError, ("mydata", "splits are not disjoint", "train & test: 2 shared ids: 'tr0', 'tr1'"),
        PREPARE_OUT),
    "data-empty-split-file": Bad(
        lambda ws, m: data_folder(ws, test=b""),
        prepare, ValueError, ("mydata/test.jsonl", "the test file has no rows"), PREPARE_OUT),
    "data-header-only-csv": Bad(
        lambda ws, m: data_folder(ws, ".csv", validation=b"id,input,target\n"),
        prepare, ValueError, ("mydata/validation.csv", "the validation file has no rows"), PREPARE_OUT),
    # --- human scores (rank.metric: file, rank.scores_file), read by `rank`
    "scores-missing-column": Bad(
        lambda ws, m: _scores_renamed(ws),
        rank, TableError, ("scores.csv", "missing columns: 'score'", "unexpected columns: 'rating'"), RANK_OUT),
    "scores-string": Bad(
        lambda ws, m: scores_file(ws, scores_with(a1="a,sample 1 of a,good")),
        rank, TableError, ("scores.csv", "column 'score'", "[1] 'good'"), RANK_OUT),
    "scores-nan": Bad(
        lambda ws, m: scores_file(ws, scores_with(b2="b,sample 2 of b,nan")),
        rank, TableError, ("scores.csv", "column 'score'", "not_nullable", "[5] nan"), RANK_OUT),
    "scores-inf": Bad(
        lambda ws, m: scores_file(ws, scores_with(a0="a,sample 0 of a,-inf")),
        rank, TableError, ("scores.csv", "column 'score'", "finite", "[0] -inf"), RANK_OUT),
    "scores-duplicate-pair": Bad(
        lambda ws, m: scores_file(ws, scores_with() + "a,sample 1 of a,7\n"),
        rank, ValueError, ("scores.csv", "different scores", "id='a' text='sample 1 of a': [1.0, 7.0]"), RANK_OUT),
    # --- samples and rankings tables (pipeline outputs, or written by hand)
    "samples-mismatched-k": Bad(
        lambda ws, m: put_samples(ws, {"a": 3, "b": 2, "c": 3}),
        rank, TableError, ("data/rounds/1/samples.parquet", "same_K_samples_for_every_id", "id='b'"), RANK_OUT),
    "samples-one-candidate-groups": Bad(
        lambda ws, m: put_samples(ws, {"a": 1, "b": 1}),
        rank, TableError, ("data/rounds/1/samples.parquet", "at_least_2_samples_per_id", "id='a'", "id='b'"),
        RANK_OUT),
    "rankings-mismatched-k": Bad(
        lambda ws, m: _rankings_of_other_k(ws),
        fit_guidance, ValueError, ("data/rounds/1", "does not rank", "('b', 2)"), FIT_OUT),
    # --- preference data (preferences.path), read by `preferences`
    "preferences-string-score": Bad(
        lambda ws, m: preferences_file(ws, jsonl([*pref_rows({"f": 2}),
                                                  {"input": "def f(): pass", "text": "odd", "score": "high"}])),
        preferences, ValueError, ("prefs.jsonl", "column 'score' (preferences.score_field) must hold numbers",
                                  "[2] 'high'"), PREFERENCES_OUT),
    "preferences-wrong-column-type": Bad(
        lambda ws, m: preferences_file(ws, jsonl([*pref_rows({"f": 2}),
                                                  {"input": "def f(): pass", "text": ["a", "list"], "score": 3}])),
        preferences, ValueError, ("prefs.jsonl", "column 'text' (preferences.text_field) must hold text",
                                  "[2] \"['a', 'list']\""), PREFERENCES_OUT),
    "preferences-whitespace-input": Bad(
        lambda ws, m: preferences_file(ws, jsonl([*pref_rows({"f": 2}), {"input": "   ", "text": "t", "score": 1},
                                                  {"input": "   ", "text": "u", "score": 0}])),
        preferences, TableError, ("prefs.jsonl", "column 'input'", "non_blank", "[2] '   '"), PREFERENCES_OUT),
    "preferences-not-utf8-csv": Bad(
        lambda ws, m: preferences_file(ws, b"input,text,score\nf," + NOT_UTF8 + b",1\nf,tea,0\n", "prefs.csv"),
        preferences, ValueError, ("prefs.csv:2", "not UTF-8", r"b'\xe9'"), PREFERENCES_OUT),
    "preferences-empty-file": Bad(
        lambda ws, m: preferences_file(ws, b""),
        preferences, ValueError, ("prefs.jsonl", "no preference rows"), PREFERENCES_OUT),
    "preferences-only-one-candidate-groups": Bad(
        lambda ws, m: preferences_file(ws, jsonl(pref_rows({"f": 1, "g": 1}))),
        preferences, ValueError, ("prefs.jsonl", "none of the 2 groups ranks anything",
                                  "'skipped_single_candidate': 2"), PREFERENCES_OUT),
    # --- params.yaml
    "params-string-for-a-number": Bad(
        lambda ws, m: {"fit_guidance": {"lr": "5e-4"}},  # YAML 1.1 reads 5e-4 (no dot) as a string
        fit_guidance, ParamsError, ("params.yaml: fit_guidance", "lr must be a number", "'5e-4' (str)", "5.0e-4"),
        FIT_OUT),
    "params-quoted-integer": Bad(
        lambda ws, m: {"sample": {"num_samples": "3"}},
        sample, ParamsError, ("params.yaml: sample", "num_samples must be an integer", "'3' (str)"), SAMPLE_OUT),
    "params-bool-for-an-integer": Bad(
        lambda ws, m: {"seed": True},
        prepare, ParamsError, ("params.yaml", "seed must be an integer", "True (bool)"), PREPARE_OUT),
    "params-out-of-range": Bad(
        lambda ws, m: {"sample": {"top_p": 1.5}},
        sample, ParamsError, ("params.yaml: sample", "top_p must be <= 1", "got 1.5"), SAMPLE_OUT),
    "params-zero-prompt-tokens": Bad(
        lambda ws, m: {"model": {"max_prompt_tokens": 0}},
        sample, ParamsError, ("params.yaml: model", "max_prompt_tokens must be >= 1", "got 0"), SAMPLE_OUT),
    "params-one-sample-per-input": Bad(
        lambda ws, m: {"sample": {"num_samples": 1}},
        sample, ParamsError, ("params.yaml: sample", "num_samples must be >= 2", "got 1"), SAMPLE_OUT),
    "params-integer-round-keys": Bad(
        lambda ws, m: {"rounds": {1: {"prev": 0}, 2: {"prev": 1}}},
        report, ParamsError, ("params.yaml", "rounds entry 1", "(a quoted key)", "got 1: {'prev': 0}"), REPORT_OUT),
    "params-unknown-metric": Bad(
        lambda ws, m: {"rank": {"metric": "bleurt"}},
        rank, ParamsError, ("params.yaml: rank", "metric must be one of meteor", "got 'bleurt'"), RANK_OUT),
    "params-unknown-objective": Bad(
        lambda ws, m: {"train_lm": {"objective": "ppo"}},
        train_lm, ParamsError, ("params.yaml: train_lm", "objective must be one of wmle, reinforce", "got 'ppo'"),
        TRAIN_OUT),
    "params-unknown-aggregation": Bad(
        lambda ws, m: {"fit_guidance": {"agg": "median"}},
        fit_guidance, ParamsError, ("params.yaml: fit_guidance", "agg must be one of avg", "got 'median'"), FIT_OUT),
    "params-unknown-preference-layout": Bad(
        lambda ws, m: {"preferences": {"layout": "columns"}},
        preferences, ParamsError, ("params.yaml: preferences", "layout must be one of auto", "got 'columns'"),
        PREFERENCES_OUT),
    # --- model folders
    "model-missing-policy-folder": Bad(
        lambda ws, m: {"model": {"policy": str(ws / "no" / "such" / "model")}},
        base_model, OSError, ("model.policy", "no/such/model", "no such local folder"), BASE_OUT),
    "model-missing-guidance-folder": Bad(
        lambda ws, m: {"model": {"guidance": str(ws / "no" / "such" / "backbone")}},
        base_model, OSError, ("model.guidance", "no/such/backbone", "no such local folder"), BASE_OUT),
    "model-missing-round-0-lm": Bad(
        lambda ws, m: put_prepared(ws),
        sample, FileNotFoundError, ("data/rounds/0/lm", "no such model folder"), SAMPLE_OUT),
    "model-guidance-tokenizer-not-the-policys": Bad(
        lambda ws, m: {"model": {"guidance": str(m["small_vocab"])}},
        base_model, ValueError, ("model.guidance", "small_vocab", "different vocabulary from the policy 'tiny-llama'",
                                 "(512 vs "), BASE_OUT),
    "model-policy-tokenizer-larger-than-its-embeddings": Bad(
        lambda ws, m: {"model": {"policy": str(m["foreign_tokenizer"])}},
        base_model, ValueError, ("model.policy", "foreign_tokenizer", "but the model embeds only 512",
                                 "token ids >= 512"), BASE_OUT),
}


def _scores_renamed(ws: Path) -> dict[str, Any]:
    params = scores_file(ws, scores_with())
    (ws / "scores.csv").write_text((ws / "scores.csv").read_text().replace("id,text,score", "id,text,rating"))
    return params


def _rankings_of_other_k(ws: Path) -> dict[str, Any]:
    """Samples of K = 3 with a rankings table of K = 2 for input b (another rank@1 run's)."""
    put_samples(ws, {"a": 3, "b": 3})
    ranked = pd.DataFrame({"id": ["a", "a", "a", "b", "b"], "sample_idx": [0, 1, 2, 0, 1],
                           "score": [0.1, 0.2, 0.3, 0.1, 0.2], "rank": [3, 2, 1, 2, 1]})
    write_table(ranked, ws / "data" / "rounds" / "1" / "rankings.parquet", schemas.Rankings)
    return {}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny model folders: a guidance backbone whose 512-token tokenizer is not the tiny-llama policy's, and a
    policy folder with 512 embeddings holding the (larger) tiny-llama tokenizer."""
    from ptg.lm.base_models import build_tiny
    from ptg.lm.tiny_models import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("models")
    build_tiny_tokenizer("tiny-llama", vocab_size=512).save_pretrained(root / "tok512")
    build_tiny("tiny-llama", root / "small_vocab", tokenizer_dir=root / "tok512")
    build_tiny("tiny-llama", root / "policy")
    shutil.copytree(root / "small_vocab", root / "foreign_tokenizer")
    for f in (root / "policy").iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, root / "foreign_tokenizer" / f.name)
    return {"small_vocab": root / "small_vocab", "foreign_tokenizer": root / "foreign_tokenizer"}


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    """A scratch project folder (the quick profile's params) as the working directory, tracking off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PTG_TRACKING", "off")
    (tmp_path / "params.yaml").write_text(QUICK.read_text())
    return tmp_path


def set_params(ws: Path, overrides: dict[str, Any]) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for key, value in overrides.items():
        params[key] = params[key] | value if isinstance(value, dict) and key != "rounds" else value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def leftovers(ws: Path) -> list[str]:
    return sorted(str(p.relative_to(ws)) for pattern in (".*.tmp-*", ".*.old-*") for p in ws.rglob(pattern))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_naming_it_and_nothing_is_written(name, ws, models):
    case = CASES[name]
    set_params(ws, case.make(ws, models) or {})
    with pytest.raises(case.error) as info:
        case.run()
    message = str(info.value)
    missing = [s for s in case.says if s not in message]
    assert not missing, f"{missing} not in:\n{message}"
    assert len(message.splitlines()) <= 30  # one screen
    written = [out for out in case.outputs if (ws / out).exists()]
    assert not written, f"written before failing: {written}"
    assert not leftovers(ws)


# ---------------------------------------------------------------------------------------------------------------
# Not errors by design
# ---------------------------------------------------------------------------------------------------------------


def test_an_input_longer_than_every_limit_is_dropped_by_max_input_chars_or_else_cut_keeping_its_start(ws, caplog):
    """data.max_input_chars drops it (a warning counts the rows); with max_input_chars: 0 it is kept whole, and the
    prompt is cut to model.max_prompt_tokens keeping the template, the instruction and the start of the input (the
    model's context, 1024 positions for tiny-llama, is never reached); the reference is cut to max_target_tokens,
    ending with the turn-end token."""
    from ptg import pipeline
    from ptg.config import load as load_params
    from ptg.lm.base_models import build_tiny
    from ptg.lm.models import load_lm, load_tokenizer

    long_input = "def huge(x):\n" + "".join(f"    x = x + {i}  # step {i}\n" for i in range(3000))  # ~80k chars
    long_target = "Add " + " and ".join(str(i) for i in range(500)) + " to x."
    set_params(ws, data_folder(ws, train=jsonl([*good_rows("train"), {"id": "tr-long", "input": long_input,
                                                                       "target": long_target}])))
    with caplog.at_level(logging.WARNING):
        prepare()
    assert "tr-long" not in set(read_table("data/prepared/train.parquet", schemas.Examples)["id"])
    assert "dropped 1 of 10 rows with inputs over 1200 characters" in caplog.text

    set_params(ws, {"data": {"max_input_chars": 0}, "model": {"max_prompt_tokens": 64, "max_target_tokens": 16}})
    prepare()
    train = read_table("data/prepared/train.parquet", schemas.Examples).set_index("id")
    assert train.loc["tr-long", "input"] == long_input
    build_tiny("tiny-llama", ws / "lm")
    tok, model, mp = load_tokenizer(ws / "lm"), load_lm(ws / "lm"), load_params("params.yaml").model
    frame = train.loc[["tr-long"]].reset_index()
    prompt = pipeline.encode_prompts_of(tok, model, frame, mp)[0]
    assert len(prompt) <= 64 < len(tok(long_input)["input_ids"])
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>user\nSummarize what this Python function does in one sentence.\n\ndef huge(x)")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")  # the template stays whole
    target = pipeline.encode_targets_of(tok, model, frame, mp)[0]
    assert len(target) == 16 and target[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(target[:-1]).startswith("Add 0 and 1")


def test_preference_lists_of_different_k_load_and_one_candidate_lists_are_skipped_and_counted(ws):
    """The promise of ptg.guidance.preferences: any K >= 2 per list, K may differ between lists; a list with one
    candidate (or one score for all) ranks nothing and is skipped and counted in metrics/preferences.json."""
    rows = [*pref_rows({"two": 2, "four": 4, "three": 3}), *pref_rows({"alone": 1}),
            {"input": "def tied(): pass", "text": "t1", "score": 1.0},
            {"input": "def tied(): pass", "text": "t2", "score": 1.0}]
    set_params(ws, preferences_file(ws, jsonl(rows)))
    preferences()
    table = read_table("data/preferences.parquet", schemas.Preferences)
    assert table.groupby("input")["text"].size().to_dict() == {"def two(): pass": 2, "def four(): pass": 4,
                                                               "def three(): pass": 3}
    counts = read_json("metrics/preferences.json")
    assert counts["groups"] == 5 and counts["skipped_single_candidate"] == 1 and counts["skipped_equal_scores"] == 1
    assert counts["train_groups"] + counts["validation_groups"] == 3
