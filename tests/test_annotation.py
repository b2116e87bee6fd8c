"""ptg.pipeline.annotation and `ptg annotate`: a round's samples out as a sheet people score, the scores back in as the
HumanScores table that `rank.metric: file` ranks with; a bad sheet stops the import with the file, the column and
the rows, and writes nothing."""

import csv
import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from ptg import schemas
from ptg.cli import app
from ptg.guidance.ranking import human_scores, rank_within_groups
from ptg.io import TableError, read_records, read_table, write_table
from ptg.pipeline import annotation

# Texts chosen to break a careless CSV/JSON round trip: a comma, quotes, a newline, leading space, empty, unicode.
TEXTS = {
    "q1": ["alpha", 'beta, "quoted"', "alpha", "gamma\nline two"],  # "alpha" sampled twice
    "q2": ["", " leading space", "ünïcode ✓", "delta"],
    "v1": ["e1", "e2", "e3", "e4"],
}
# The annotator's score of each distinct (id, text); q2's empty sample is the worst of its input.
SCORES = {("q1", "alpha"): 3.0, ("q1", 'beta, "quoted"'): 1.0, ("q1", "gamma\nline two"): 2.0,
          ("q2", ""): -1.0, ("q2", " leading space"): 0.5, ("q2", "ünïcode ✓"): 2.5, ("q2", "delta"): 0.0,
          ("v1", "e1"): 4.0, ("v1", "e2"): 1.0, ("v1", "e3"): 2.0, ("v1", "e4"): 3.0}


def make_samples(texts: dict[str, list[str]]) -> pd.DataFrame:
    rows = [{"id": i, "sample_idx": j, "text": t, "token_ids": [5] * (j + 1), "n_tokens": j + 1, "finished": True}
            for i, ts in texts.items() for j, t in enumerate(ts)]
    return schemas.Samples.validate(pd.DataFrame(rows))


def make_examples(ids: list[str], split: str) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "split": split, "input": [f"def {i}(): pass" for i in ids],
                         "prompt": [f"Summarize: def {i}(): pass" for i in ids], "target": ["Does it."] * len(ids),
                         "references": [["Does it."]] * len(ids)})


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A DVC project folder after `sample@1`: round 1's samples and the prepared train/validation examples."""
    write_table(make_samples(TEXTS), tmp_path / "data" / "rounds" / "1" / "samples.parquet", schemas.Samples)
    write_table(make_examples(["q1", "q2"], "train"), tmp_path / "data/prepared/train.parquet", schemas.Examples)
    write_table(make_examples(["v1"], "validation"), tmp_path / "data/prepared/validation.parquet", schemas.Examples)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fill(path, scores=SCORES) -> None:
    """Score every row of a written sheet as an annotator would: edit the file's score cells, nothing else."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row["score"] = str(scores[row["id"], row["candidate"]])
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        path.write_text("".join(json.dumps({**r, "score": scores[r["id"], r["candidate"]]}) + "\n" for r in rows),
                        encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def test_export_shuffles_each_inputs_candidates_with_its_seed():
    texts = {"b": [f"b{j}" for j in range(8)], "a": [f"a{j}" for j in range(8)]}
    samples, examples = make_samples(texts), make_examples(["a", "b"], "train")
    sheet = annotation.export_samples(samples, examples, seed=0)
    assert list(sheet.columns) == ["item", "id", "input", "candidate", "score"]
    assert sheet["id"].tolist() == ["a"] * 8 + ["b"] * 8  # ids sorted, whatever order they were sampled in
    assert sheet["item"].tolist() == [f"{i}#{k}" for i in "ab" for k in range(8)]
    assert (sheet["input"] == sheet["id"].map({"a": "def a(): pass", "b": "def b(): pass"})).all()
    assert sheet["score"].isna().all()
    for i in "ab":  # each input's candidates all there, not in sampling order
        shown = sheet.loc[sheet["id"] == i, "candidate"].tolist()
        assert sorted(shown) == sorted(texts[i]) and shown != texts[i]
    pd.testing.assert_frame_equal(sheet, annotation.export_samples(samples.iloc[::-1], examples, seed=0))
    assert not sheet.equals(annotation.export_samples(samples, examples, seed=1))
    # An input's order depends on the seed and its own candidates only: dropping input "b" leaves "a" as it was.
    alone = annotation.export_samples(samples[samples["id"] == "a"], examples, seed=0)
    pd.testing.assert_frame_equal(alone, sheet[sheet["id"] == "a"])


def test_export_lists_a_text_sampled_twice_once():
    sheet = annotation.export_samples(make_samples(TEXTS), make_examples(["q1", "q2", "v1"], "train"), seed=0)
    q1 = sheet.loc[sheet["id"] == "q1", "candidate"].tolist()
    assert sorted(q1) == sorted(["alpha", 'beta, "quoted"', "gamma\nline two"])
    assert len(sheet) == len(SCORES)


def test_export_names_samples_without_an_example():
    with pytest.raises(ValueError, match=r"1 id\(s\) have no prepared example.*'v1'"):
        annotation.export_samples(make_samples(TEXTS), make_examples(["q1", "q2"], "train"), seed=0)


def test_export_refuses_a_format_people_cannot_edit(project):
    with pytest.raises(ValueError, match=r"sheet\.parquet.*\.csv or \.jsonl"):
        annotation.export_round(1, "sheet.parquet")
    assert not (project / "sheet.parquet").exists()


# ---------------------------------------------------------------------------------------------------------------
# The round trip
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sheet_name", "scores_name"), [("sheet.csv", "human/scores.csv"),
                                                         ("sheet.jsonl", "human/scores.jsonl"),
                                                         ("sheet.csv", "human/scores.parquet")])
def test_round_trip_gives_every_sample_its_score_and_ranks_them(project, sheet_name, scores_name):
    annotation.export_round(1, sheet_name, seed=7)
    fill(project / sheet_name)
    annotation.import_round(sheet_name, 1, scores_name, score_range=(-1, 4))
    table = read_table(scores_name, schemas.HumanScores)  # what stages/rank.py reads
    assert len(table) == len(SCORES)
    samples = make_samples(TEXTS)
    got = human_scores(samples, table, scores_name)
    assert got == [SCORES[i, t] for i, t in zip(samples["id"], samples["text"], strict=True)]
    ranked = rank_within_groups(samples[["id", "sample_idx"]].assign(score=got))
    assert ranked["rank"].tolist() == [1, 4, 2, 3,  # q1: both "alpha" samples score 3.0; the tie goes to idx 0
                                       4, 2, 1, 3,
                                       1, 4, 3, 2]


def test_import_accepts_a_row_repeated_with_the_same_score_and_extra_columns(project):
    annotation.export_round(1, "sheet.csv")
    fill(project / "sheet.csv")
    sheet = read_records("sheet.csv")
    sheet = pd.concat([sheet, sheet.iloc[[0]]]).assign(note="fine")
    scores = annotation.import_scores(sheet, make_samples(TEXTS), "sheet.csv")
    assert dict(zip(zip(scores["id"], scores["text"], strict=True), scores["score"], strict=True)) == SCORES


# ---------------------------------------------------------------------------------------------------------------
# A bad sheet: one error naming the file, the column and the rows; nothing written
# ---------------------------------------------------------------------------------------------------------------


def _set_score(value):
    def edit(sheet: pd.DataFrame) -> pd.DataFrame:
        return sheet.assign(score=[value, *sheet["score"][1:]])
    return edit


EDIT = " (fixed typo)"


def _edit_candidate(sheet: pd.DataFrame) -> pd.DataFrame:
    return sheet.assign(candidate=[sheet["candidate"][0] + EDIT, *sheet["candidate"][1:]])


def _conflict(sheet: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([sheet, sheet.iloc[[0]].assign(score="1.5")], ignore_index=True)


# How the error names the sheet's first row (item q1#0: ids come sorted) and its candidate, FIRST.
ROW1 = "row 1 (item 'q1#0')"


@pytest.mark.parametrize(("edit", "line"), [
    (_set_score(""), ["column 'score'", "1 row(s) have no score", ROW1]),
    (_set_score("   "), ["column 'score'", "1 row(s) have no score", ROW1]),
    (_set_score("good"), ["column 'score'", "not a number", f"{ROW1} score='good'"]),
    (_set_score("nan"), ["column 'score'", "NaN or an infinite score", f"{ROW1} score='nan'"]),
    (_set_score("-inf"), ["column 'score'", "NaN or an infinite score", f"{ROW1} score='-inf'"]),
    (_set_score("4.5"), ["column 'score'", "outside [-1, 4]", f"{ROW1} score='4.5'"]),
    (_edit_candidate, ["columns 'id', 'candidate'", "1 row(s) are not among the round's samples",
                       f"{ROW1} id='q1', candidate=EDITED"]),
    (_edit_candidate, ["columns 'id', 'candidate'", "1 sampled candidate(s) have no row", "candidate=FIRST"]),
    (lambda s: s.iloc[1:], ["columns 'id', 'candidate'", "1 sampled candidate(s) have no row", "candidate=FIRST"]),
    (lambda s: s.assign(id=["q9", *s["id"][1:]]), ["columns 'id', 'candidate'", "not among", f"{ROW1} id='q9'"]),
    (_conflict, ["columns 'id', 'candidate', 'score'", "2 row(s) score the same (id, candidate) differently",
                 f"{ROW1} id='q1', candidate=FIRST", "row 12 (item 'q1#0')", "score='1.5'"]),
    (lambda s: s.drop(columns=["score"]), ["missing column(s) 'score'"]),
], ids=["blank", "spaces", "word", "nan", "inf", "above_max", "edited", "edited_leaves_one_unscored", "deleted",
        "edited_id", "conflict", "no_score_column"])
def test_bad_sheet_names_file_column_and_rows_and_writes_nothing(project, edit, line):
    annotation.export_round(1, "sheet.csv")
    fill(project / "sheet.csv")
    sheet = read_records("sheet.csv")
    edit(sheet).to_csv("bad.csv", index=False)
    with pytest.raises(TableError) as err:
        annotation.import_round("bad.csv", 1, "human/scores.csv", score_range=(-1, 4))
    message = str(err.value)
    assert message.startswith("bad.csv: "), message
    first = sheet["candidate"][0]
    line = [p.replace("FIRST", repr(first)).replace("EDITED", repr(first + EDIT)) for p in line]
    assert any(all(part in ln for part in line) for ln in message.splitlines()), message
    assert not (project / "human").exists()


def test_a_jsonl_null_score_is_blank_and_an_old_scores_file_survives(project):
    annotation.export_round(1, "sheet.jsonl")
    fill(project / "sheet.jsonl")
    annotation.import_round("sheet.jsonl", 1, "scores.csv")
    before = (project / "scores.csv").read_bytes()
    rows = (project / "sheet.jsonl").read_text(encoding="utf-8").splitlines()
    rows[2] = json.dumps({**json.loads(rows[2]), "score": None})
    (project / "sheet.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    blank = r"sheet\.jsonl: 1 problem.*\n  column 'score': 1 row\(s\) have no score.*row 3"
    with pytest.raises(TableError, match=blank):
        annotation.import_round("sheet.jsonl", 1, "scores.csv")
    assert (project / "scores.csv").read_bytes() == before


def test_import_rejects_an_empty_score_range():
    with pytest.raises(ValueError, match="min 2 is above max 1"):
        annotation.import_scores(pd.DataFrame(columns=["id", "candidate", "score"]), make_samples(TEXTS), "s.csv",
                                 (2, 1))


# ---------------------------------------------------------------------------------------------------------------
# ptg annotate
# ---------------------------------------------------------------------------------------------------------------


def test_cli_round_trip_in_a_project_folder(project):
    runner = CliRunner()
    out = runner.invoke(app, ["annotate", "export", "--round", "1", "--out", "sheets/r1.csv", "--seed", "3"])
    assert out.exit_code == 0, out.output
    assert "wrote 11 candidates of 3 inputs to sheets/r1.csv" in out.output
    examples = pd.concat([make_examples(["q1", "q2"], "train"), make_examples(["v1"], "validation")])
    expected = annotation.export_samples(make_samples(TEXTS), examples, seed=3)
    written = read_records(project / "sheets/r1.csv")
    assert written[["item", "id", "input", "candidate"]].values.tolist() == expected.iloc[:, :4].values.tolist()
    fill(project / "sheets/r1.csv")
    args = ["annotate", "import", "sheets/r1.csv", "--round", "1", "--out", "human/r1.csv", "--min", "-1"]
    out = runner.invoke(app, [*args, "--max", "3"])  # v1's 4.0 is out of range
    assert out.exit_code != 0 and isinstance(out.exception, TableError)
    assert "outside [-1, 3]" in str(out.exception) and not (project / "human").exists()
    out = runner.invoke(app, args)  # --min alone: no upper bound
    assert out.exit_code == 0, out.output
    assert "rank.metric: file" in out.output and "rank.scores_file: human/r1.csv" in out.output
    assert "dvc repro rank@1" in out.output
    table = read_table(project / "human/r1.csv", schemas.HumanScores)
    samples = make_samples(TEXTS)
    expected = [SCORES[k] for k in zip(samples["id"], samples["text"], strict=True)]
    assert human_scores(samples, table, "human/r1.csv") == expected


@pytest.mark.parametrize("stale", ["older_round", "regenerated"])
def test_a_stale_sheet_is_refused_and_writes_nothing(project, stale):
    """A filled sheet of round 1 imported for round 2, or after sample@1 ran again with other texts: every row
    names a candidate the round does not have, and every sample has no score."""
    annotation.export_round(1, "sheet.csv")
    fill(project / "sheet.csv")
    other = {i: [f"{t} (again)" for t in ts] for i, ts in TEXTS.items()}  # the same ids, other samples
    r = 2 if stale == "older_round" else 1
    write_table(make_samples(other), project / "data" / "rounds" / str(r) / "samples.parquet", schemas.Samples)
    with pytest.raises(TableError) as err:
        annotation.import_round("sheet.csv", r, "human/scores.csv")
    message = str(err.value)
    rows = len(read_records("sheet.csv"))
    assert f"{rows} row(s) are not among the round's samples (a stale sheet" in message, message
    assert f"{sum(len(set(ts)) for ts in other.values())} sampled candidate(s) have no row" in message, message
    assert not (project / "human").exists()
