"""Tests of the prompt task's data (ptg.tasks.prompt.data): WordNet topics (real and a tiny fake database), local
folders, few-shot splits, checks."""

from __future__ import annotations

import bz2
import json
import lzma
import zlib
from pathlib import Path

import pandas as pd
import pytest

from ptg.io import validate_table
from ptg.schemas import ClassificationExamples
from ptg.tasks.prompt.data import (
    FINE_FOODS_CLASSES,
    check_classification,
    default_modeldata_root,
    default_wordnet_root,
    few_shot_splits,
    fine_foods,
    load_classification_folder,
    rdb_entry,
    review_text,
    wordnet_topics,
)

LEXNAMES = "03\tnoun.Tops\t1\n05\tnoun.animal\t1\n13\tnoun.food\t1\n20\tnoun.plant\t1\n"
DATA_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "00015388 05 n 01 animal 0 002 @ 00004475 n 0000 ~ 01317541 n 0000 | a living organism; "
    '"animals are multicellular"  \n'
    "00001740 03 n 01 entity 0 000 | that which is perceived  \n"
    "07555863 13 n 02 comfort_food 0 soul_food 0 000 | food that is simple  \n"
    "09999999 20 n 01 odd_plant 0 000 | \"only an example\"  \n"
    "00017222 20 n 02 plant 0 flora 0 000 | (botany) a living organism lacking locomotion; roots; "
    '"plants grow"; "it is a plant"  \n'
)


def fake_wordnet(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "lexnames").write_text(LEXNAMES)
    (root / "data.noun").write_text(DATA_NOUN)
    return root


def pool(per_class: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{label}-{i}", f"text {label} {i}", label) for label, n in per_class.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["id", "text", "label"])


# ---------------------------------------------------------------------------------------------------------------
# WordNet
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (default_wordnet_root() / "data.noun").is_file(), reason="WordNet not installed")
def test_wordnet_topics_real_database():
    df = wordnet_topics()
    counts = df["label"].value_counts()
    assert set(counts.index) == {"animal", "plant", "food", "artifact"}
    assert (counts > 100).all()
    assert df["id"].is_unique and df["text"].str.strip().astype(bool).all()
    aardvark = df[df["text"].str.startswith("aardvark: ")]
    assert aardvark["label"].tolist() == ["animal"] and aardvark["id"].tolist() == ["wn-02082791"]
    offsets = df["id"].str.removeprefix("wn-").astype(int)
    assert offsets.is_monotonic_increasing


def test_wordnet_topics_parses_fake_database(tmp_path):
    df = wordnet_topics(fake_wordnet(tmp_path / "wordnet"), classes=("animal", "plant", "food"))
    assert df.to_dict("records") == [
        {"id": "wn-00015388", "text": "animal: a living organism", "label": "animal"},
        {"id": "wn-00017222", "text": "plant: (botany) a living organism lacking locomotion; roots",
         "label": "plant"},
        {"id": "wn-07555863", "text": "comfort food: food that is simple", "label": "food"},
    ]


def test_wordnet_topics_missing_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*make setup.*install_wordnet\.sh"):
        wordnet_topics(tmp_path / "nowhere")
    (tmp_path / "wn").mkdir()
    (tmp_path / "wn" / "lexnames").write_text(LEXNAMES)
    with pytest.raises(FileNotFoundError, match=r"data\.noun.*make setup"):
        wordnet_topics(tmp_path / "wn", classes=("animal",))


def test_wordnet_topics_unknown_class(tmp_path):
    with pytest.raises(ValueError, match=r"'artifact'.*noun classes: Tops, animal, food, plant"):
        wordnet_topics(fake_wordnet(tmp_path / "wordnet"))


# ---------------------------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------------------------


def test_load_classification_folder_jsonl_csv_tsv(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"id": f"t{i}", "text": f"x {i}", "label": i % 2})
                                                    for i in range(3)) + "\n")
    pd.DataFrame({"text": ["a", "b"], "label": ["pos", "neg"]}).to_csv(tmp_path / "dev.csv", index=False)
    (tmp_path / "test.tsv").write_text('text\tlabel\nsaid "no" twice\tneg\nfine\tpos\n')
    frames = load_classification_folder(tmp_path)
    assert list(frames) == ["train", "validation", "test"]
    assert frames["train"].to_dict("list") == {"id": ["t0", "t1", "t2"], "text": ["x 0", "x 1", "x 2"],
                                               "label": ["0", "1", "0"]}
    assert frames["validation"]["id"].tolist() == ["validation-0", "validation-1"]
    assert frames["test"]["text"].tolist() == ['said "no" twice', "fine"]


def test_load_classification_folder_lm_bff_sentence_alias(tmp_path):
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\na great film\t1\na dull film\t0\n")
    frames = load_classification_folder(tmp_path)
    assert frames["validation"].to_dict("list") == {"id": ["validation-0", "validation-1"],
                                                    "text": ["a great film", "a dull film"], "label": ["1", "0"]}


def test_load_classification_folder_missing_split(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,b\n")
    with pytest.raises(FileNotFoundError, match=r"no validation file; tried validation\.jsonl.*dev\.tsv"):
        load_classification_folder(tmp_path)


def test_load_classification_folder_missing_field(tmp_path):
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.csv").write_text("review,label\na,b\n")
    with pytest.raises(ValueError, match=r"train\.csv: no field 'text'; columns present: review, label"):
        load_classification_folder(tmp_path)
    with pytest.raises(ValueError, match=r"train\.csv: no field 'stars'; columns present: review, label"):
        load_classification_folder(tmp_path, text_field="review", label_field="stars")


# ---------------------------------------------------------------------------------------------------------------
# Few-shot splits
# ---------------------------------------------------------------------------------------------------------------


def test_few_shot_splits_exact_disjoint_and_valid():
    df = pool({"a": 20, "b": 9, "c": 30})
    splits = few_shot_splits(df, shots=4, data_seed=1, max_test=0)
    assert list(splits) == ["train", "validation", "test"]
    for name in ("train", "validation"):
        assert splits[name]["label"].value_counts().to_dict() == {"a": 4, "b": 4, "c": 4}
    assert len(splits["test"]) == 59 - 24
    ids = [set(s["id"]) for s in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == set(df["id"])
    for name, frame in splits.items():
        assert (frame["split"] == name).all()
        validate_table(frame, ClassificationExamples, name)


def test_few_shot_splits_deterministic_per_seed():
    df = pool({"a": 40, "b": 40})
    first = few_shot_splits(df, shots=8, data_seed=3, max_test=10)
    again = few_shot_splits(df, shots=8, data_seed=3, max_test=10)
    other = few_shot_splits(df, shots=8, data_seed=4, max_test=10)
    for name in first:
        pd.testing.assert_frame_equal(first[name], again[name])
    assert len(first["test"]) == 10
    assert not first["train"]["id"].equals(other["train"]["id"])


def test_few_shot_splits_too_few_examples():
    with pytest.raises(ValueError, match=r"9 examples per class.*\{'b': 8\}"):
        few_shot_splits(pool({"a": 9, "b": 8}), shots=4, data_seed=0, max_test=0)


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def frames_of(**labels: list[str]) -> dict[str, pd.DataFrame]:
    return {split: pd.DataFrame({"id": [f"{split}-{i}" for i in range(len(ls))],
                                 "text": [f"t{i}" for i in range(len(ls))], "label": ls})
            for split, ls in labels.items()}


def test_check_classification_passes():
    check_classification(frames_of(train=["pos", "neg"], test=["neg", "pos", "pos"]), ["neg", "pos"], "src")


def test_check_classification_blank_text():
    frames = frames_of(train=["pos", "neg"] * 4)
    frames["train"]["text"] = ["", " ", "\t", "ok", "", "", "", "ok"]
    with pytest.raises(ValueError, match=r"src.csv: train: field 'text' is empty in 6 row\(s\), ids 'train-0', "
                                         r"'train-1', 'train-2', 'train-4', 'train-5' \.\.\. \(1 more\)"):
        check_classification(frames, ["neg", "pos"], "src.csv")


def test_check_classification_label_without_verbalizer():
    frames = frames_of(train=["pos", "neg"], validation=["pos", "neg", "meh", "4"])
    with pytest.raises(ValueError, match=r"src: validation: field 'label' has value\(s\) without a verbalizer: "
                                         r"'4', 'meh'; labels: neg, pos"):
        check_classification(frames, ["neg", "pos"], "src")


def test_check_classification_split_lacks_label():
    frames = frames_of(train=["pos", "neg"], test=["pos", "pos"])
    with pytest.raises(ValueError, match=r"src: test: field 'label' lacks label\(s\) 'neg'"):
        check_classification(frames, ["neg", "pos"], "src")


# ---------------------------------------------------------------------------------------------------------------
# Fine-food reviews
# ---------------------------------------------------------------------------------------------------------------

needs_modeldata = pytest.mark.skipif(not (default_modeldata_root() / "Rdata.rdb").is_file(),
                                     reason="modeldata not installed (scripts/install_modeldata.sh)")


@pytest.fixture(scope="module")
def foods() -> pd.DataFrame:
    return fine_foods()


@needs_modeldata
def test_fine_foods_real_database(foods):
    assert len(foods) == 5000 and list(foods.columns) == ["id", "text", "label"]
    assert foods["label"].value_counts().to_dict() == {"great": 3258, "other": 1742}
    assert set(foods["label"]) == set(FINE_FOODS_CLASSES)
    assert foods["id"].is_unique
    assert foods["id"].str.startswith("ff-train-").sum() == 4000 and foods["id"].iloc[4000] == "ff-test-0"
    assert not foods["text"].str.contains("<br", case=False).any()
    assert (foods["text"] == foods["text"].str.split().str.join(" ")).all()  # whitespace normalised
    assert foods["text"].str.len().gt(0).all()
    assert foods.iloc[0].to_dict() == {"id": "ff-train-0", "label": "other",
                                       "text": "this stuff is not stuffing its not good at all save your money"}
    pd.testing.assert_frame_equal(fine_foods(), foods)


@needs_modeldata
def test_fine_foods_max_chars_drops_long_reviews(foods):
    short = fine_foods(max_chars=400)
    kept = foods[foods["text"].str.len() <= 400].reset_index(drop=True)
    pd.testing.assert_frame_equal(short, kept)
    assert 0 < len(short) < len(foods)
    splits = few_shot_splits(short, shots=16, data_seed=0, max_test=400)
    assert splits["train"]["label"].value_counts().to_dict() == {"great": 16, "other": 16}
    assert len(splits["test"]) == 400


def test_fine_foods_missing_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*make setup.*install_modeldata\.sh"):
        fine_foods(tmp_path / "nowhere")
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "Rdata.rdb").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"md/Rdata\.rdx.*make setup.*install_modeldata\.sh"):
        fine_foods(tmp_path / "md")


def test_review_text_line_breaks_entities_and_spaces():
    assert review_text("Great!<br /><br />Buy it &quot;now&quot;.<BR>  Yes<br/>\tno ") == 'Great! Buy it "now". Yes no'


def test_rdb_entry_compression_types():
    data = b"X\n" + bytes(range(256)) * 4
    head = len(data).to_bytes(4, "big")
    xz = lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])
    assert rdb_entry(head + b"Z" + xz, 3, "e") == data
    assert rdb_entry(head + b"2" + bz2.compress(data), 3, "e") == data
    assert rdb_entry(head + b"1" + zlib.compress(data), 2, "e") == data
    assert rdb_entry(head + b"0" + data, 3, "e") == data
    assert rdb_entry(head + zlib.compress(data), 1, "e") == data
    assert rdb_entry(data, 0, "e") == data
    with pytest.raises(ValueError, match=r"db: table 't': unknown compression type 'Q'"):
        rdb_entry(head + b"Q" + data, 3, "db: table 't'")
    with pytest.raises(ValueError, match=r"e: cannot decompress \('2'\)"):
        rdb_entry(head + b"2" + data, 3, "e")
    with pytest.raises(ValueError, match=r"e: decompressed to 1024 bytes, the entry says 2"):
        rdb_entry((2).to_bytes(4, "big") + b"0" + data[2:], 3, "e")
