"""The prompt task's data: few-shot text classification splits (what ``prepare`` writes), and the policy's inputs
(``sample@r``, ``fit_guidance@r``, ``train_lm@r``): groups of one start token each.

Three sources give frames with columns ``id``, ``text`` and ``label`` (a string):

* ``wordnet-topics`` (``wordnet_topics``): offline, from the WordNet 3.0 database that ``make setup`` installs
  (``scripts/install_wordnet.sh``): every noun synset of a chosen lexicographer file (``noun.animal``, ...) is
  one example, ``"<first lemma>: <definition>"`` labelled with the file's class.
* ``fine-foods`` (``fine_foods``): offline, Amazon fine-food reviews labelled great/other from R's modeldata package
  (MIT), whose lazy-load database ``make setup`` installs (``scripts/install_modeldata.sh``) and ``rdata`` reads.
* ``load_classification_folder``: a local folder with train/dev/test files (the LM-BFF 16-shot layout among them).

``few_shot_splits`` draws K shots per class for train and for validation from one pool, the rest is test;
``check_classification`` fails fast, naming the source, the split and the values, on a blank text, a label without
a verbalizer or a split that lacks a label. No model code: ``prepare`` and ``sample`` import nothing heavier.
"""

from __future__ import annotations

import bz2
import csv
import html
import logging
import lzma
import os
import re
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ptg import schemas
from ptg.config import DataConfig, Params, TaskParams, TrainLMParams
from ptg.corpus import SPLIT_ALIASES, source_kind
from ptg.io import read_records
from ptg.schemas import SPLITS
from ptg.tasks.prompt import groups, split_of_group, start_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.pipeline import Context

log = logging.getLogger(__name__)

WORDNET_SOURCE = "wordnet-topics"
FINE_FOODS_SOURCE = "fine-foods"
CLASSIFICATION_COLUMNS: tuple[str, ...] = ("id", "text", "label")
CLASSIFICATION_EXTENSIONS: tuple[str, ...] = (".jsonl", ".csv", ".tsv")
WORDNET_CLASSES: tuple[str, ...] = ("animal", "plant", "food", "artifact")
SENTENCE_FIELD = "sentence"  # the text column of the LM-BFF k-shot files (`sentence\tlabel`)
MAX_SHOWN = 5  # offending ids or values named per error


def _listed(values: Sequence[object], shown: int = MAX_SHOWN) -> str:
    """The first ``shown`` values as reprs, with a count of the rest."""
    more = f" ... ({len(values) - shown} more)" if len(values) > shown else ""
    return ", ".join(map(repr, values[:shown])) + more


# ---------------------------------------------------------------------------------------------------------------
# WordNet topics
# ---------------------------------------------------------------------------------------------------------------


def default_wordnet_root() -> Path:
    """Where ``scripts/install_wordnet.sh`` puts WordNet and nltk finds it: ``<venv>/nltk_data/corpora/wordnet``."""
    return Path(sys.prefix) / "nltk_data" / "corpora" / "wordnet"


def _installed_file(root: Path, name: str, what: str, default: Path, script: str) -> Path:
    """``root / name``, or a FileNotFoundError saying which set-up script installs ``what`` where."""
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} {name}; `make setup` installs it under {default} "
                                f"(scripts/{script})")
    return path


def _wordnet_file(root: Path, name: str) -> Path:
    return _installed_file(root, name, "WordNet 3.0", default_wordnet_root(), "install_wordnet.sh")


def _lexfile_numbers(root: Path, classes: Sequence[str]) -> dict[str, str]:
    """Two-digit lexicographer file number (as in ``data.noun``) -> class, for the ``noun.<class>`` files."""
    path = _wordnet_file(root, "lexnames")
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            names[fields[1]] = fields[0].zfill(2)
    unknown = [c for c in classes if f"noun.{c}" not in names]
    if unknown:
        nouns = sorted(n.removeprefix("noun.") for n in names if n.startswith("noun."))
        raise ValueError(f"{path}: no lexicographer file for class(es) {_listed(unknown, len(unknown))}; "
                         f"noun classes: {', '.join(nouns)}")
    return {names[f"noun.{c}"]: c for c in classes}


def definition(gloss: str) -> str:
    """The definition part of a WordNet gloss: before the first ``; "`` example sentence (empty if none)."""
    text = gloss.split('; "', 1)[0].strip().rstrip(";").rstrip()
    return "" if text.startswith('"') else text


def parse_data_line(line: str) -> tuple[str, str, str, str] | None:
    """``(offset, lex_filenum, first lemma, definition)`` of one ``data.*`` line; None for a licence line."""
    if line.startswith(" ") or not line.strip():
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    # offset lex_filenum ss_type w_cnt word lex_id ...: the first lemma is the fifth field.
    return fields[0], fields[1], fields[4].replace("_", " "), definition(gloss)


def wordnet_topics(root: str | os.PathLike[str] | None = None,
                   classes: Sequence[str] = WORDNET_CLASSES) -> pd.DataFrame:
    """One example per noun synset of the ``noun.<class>`` lexicographer files, in synset offset order.

    ``text`` is the synset's first lemma (underscores as spaces), ``": "`` and its definition; ``label`` the class;
    ``id`` ``"wn-<offset>"``. Synsets without a definition are skipped. ``root`` defaults to
    ``default_wordnet_root()``; ``data.noun`` and ``lexnames`` are read directly (no nltk).
    """
    root = Path(root) if root is not None else default_wordnet_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no WordNet folder; `make setup` installs WordNet 3.0 there "
                                "(scripts/install_wordnet.sh)")
    wanted = _lexfile_numbers(root, classes)
    rows = []
    with _wordnet_file(root, "data.noun").open(encoding="utf-8") as f:
        for line in f:
            parsed = parse_data_line(line)
            if parsed is None or parsed[1] not in wanted or not parsed[3]:
                continue
            offset, lexfile, lemma, text = parsed
            rows.append((f"wn-{offset}", f"{lemma}: {text}", wanted[lexfile], int(offset)))
    df = pd.DataFrame(rows, columns=[*CLASSIFICATION_COLUMNS, "offset"])
    df = df.sort_values("offset", kind="stable").drop(columns="offset").reset_index(drop=True)
    log.info("WordNet topics from %s: %s", root, df["label"].value_counts().to_dict())
    return df


# ---------------------------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------------------------


def _classification_file(folder: Path, split: str) -> Path:
    """The one ``<name><ext>`` file of ``split`` in ``folder`` (names from ``SPLIT_ALIASES``)."""
    tried = [folder / f"{stem}{ext}" for stem in SPLIT_ALIASES[split] for ext in CLASSIFICATION_EXTENSIONS]
    found = [p for p in tried if p.is_file()]
    if not found:
        raise FileNotFoundError(f"{folder}: no {split} file; tried {', '.join(p.name for p in tried)}")
    if len(found) > 1:
        raise ValueError(f"{folder}: several {split} files, keep one: {', '.join(p.name for p in found)}")
    return found[0]


def _read_split(path: Path) -> pd.DataFrame:
    """A split file as strings: ``.tsv`` unquoted (sentences hold quotes), else ``ptg.io.read_records``."""
    if path.suffix != ".tsv":
        return read_records(path)
    if not path.read_text(encoding="utf-8").strip():  # no header: no columns, as read_records reads an empty csv
        return pd.DataFrame()
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE, encoding="utf-8")


def _classification_frame(raw: pd.DataFrame, split: str, text_field: str, label_field: str,
                          where: Path) -> pd.DataFrame:
    """Raw rows -> columns id, text, label (strings); ``sentence`` stands in for a missing ``text_field``."""
    if text_field not in raw.columns and SENTENCE_FIELD in raw.columns:
        log.info("%s: no field %r, using %r", where, text_field, SENTENCE_FIELD)
        text_field = SENTENCE_FIELD
    for name in (text_field, label_field):
        if name not in raw.columns:
            raise ValueError(f"{where}: no field {name!r}; columns present: {', '.join(map(str, raw.columns))}")
    ids = raw["id"].map(str) if "id" in raw.columns else [f"{split}-{i}" for i in range(len(raw))]
    for name in (text_field, label_field):
        missing = raw[name].isna().to_numpy()
        if missing.any():  # a null would become the text "nan"
            rows = [int(i) for i in missing.nonzero()[0][:MAX_SHOWN]]
            raise ValueError(f"{where}: field {name!r} is empty (null) in {int(missing.sum())} row(s), e.g. rows "
                             f"{rows} (ids {[list(ids)[i] for i in rows]})")
    return pd.DataFrame({"id": list(ids), "text": raw[text_field].map(str).to_list(),
                         "label": raw[label_field].map(str).to_list()})


def load_classification_folder(folder: str | os.PathLike[str], text_field: str = "text",
                               label_field: str = "label") -> dict[str, pd.DataFrame]:
    """The train, validation and test frames (columns id, text, label as strings) of a local folder.

    Each split is one ``<split>.jsonl``, ``.csv`` or ``.tsv`` file; ``dev`` is accepted for ``validation``. When
    ``text_field`` is missing but a ``sentence`` column is present (the LM-BFF k-shot layout, ``train.tsv`` with
    the header ``sentence\\tlabel``), ``sentence`` is the text. ``id`` is the file's ``id`` column when it has one,
    else ``<split>-<row>``. A missing split file names the folder and the file names tried; a missing field names
    the file, the field and the columns present.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder")
    frames = {}
    for split in SPLITS:
        path = _classification_file(folder, split)
        frames[split] = _classification_frame(_read_split(path), split, text_field, label_field, path)
    return frames


# ---------------------------------------------------------------------------------------------------------------
# Splits and checks
# ---------------------------------------------------------------------------------------------------------------


def few_shot_splits(df: pd.DataFrame, shots: int, data_seed: int, max_test: int) -> dict[str, pd.DataFrame]:
    """``shots`` examples per class for train, another ``shots`` per class for validation, the rest for test.

    The draws are stratified per class and seeded by ``data_seed`` alone (a ``numpy`` Generator). Test is a
    uniform random draw (not stratified) of at most ``max_test`` of the remaining rows (0 keeps all). Each split
    keeps the pool's row order and gets a ``split`` column. A class with fewer than ``2 * shots + 1`` examples
    (at least one left for test) is a ``ValueError`` naming the class and the counts.
    """
    if shots < 1 or max_test < 0:
        raise ValueError(f"few_shot_splits: shots must be >= 1 and max_test >= 0, got shots={shots}, "
                         f"max_test={max_test}")
    missing = [c for c in CLASSIFICATION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"few_shot_splits: no column(s) {', '.join(missing)}; columns present: "
                         f"{', '.join(map(str, df.columns))}")
    counts = df["label"].value_counts()
    small = {str(c): int(n) for c, n in counts.items() if n < 2 * shots + 1}
    if small:
        raise ValueError(f"few_shot_splits: {shots} shots need {2 * shots + 1} examples per class (train, "
                         f"validation and one for test); too few in: {small}")
    rng = np.random.default_rng(data_seed)
    positions = {"train": [], "validation": [], "test": []}
    for label in sorted(counts.index):
        drawn = rng.permutation(np.flatnonzero((df["label"] == label).to_numpy()))
        positions["train"].extend(drawn[:shots])
        positions["validation"].extend(drawn[shots:2 * shots])
        positions["test"].extend(drawn[2 * shots:])
    if max_test and len(positions["test"]) > max_test:
        positions["test"] = rng.choice(positions["test"], size=max_test, replace=False).tolist()
    return {split: df.iloc[sorted(positions[split])].assign(split=split).reset_index(drop=True)
            for split in SPLITS}


def check_classification(frames: Mapping[str, pd.DataFrame], labels: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming ``where``, the split, the field and the values on the first problem found.

    Problems: a blank ``text`` (the first ids named), a ``label`` outside ``labels`` (the verbalizer's classes,
    in order: such a label has no verbalizer) and a split without some of ``labels``.
    """
    known = set(labels)
    for split, df in frames.items():
        missing = [c for c in CLASSIFICATION_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{where}: {split} has no column(s) {', '.join(missing)}; columns present: "
                             f"{', '.join(map(str, df.columns))}")
        blank = df.loc[~df["text"].map(lambda t: isinstance(t, str) and t.strip() != ""), "id"].astype(str)
        if not blank.empty:
            raise ValueError(f"{where}: {split}: field 'text' is empty in {len(blank)} row(s), ids "
                             f"{_listed(blank.tolist())}")
        present = set(df["label"].astype(str))
        unknown = sorted(present - known)
        if unknown:
            raise ValueError(f"{where}: {split}: field 'label' has value(s) without a verbalizer: "
                             f"{_listed(unknown)}; labels: {', '.join(labels)}")
        absent = [label for label in labels if label not in present]
        if absent:
            raise ValueError(f"{where}: {split}: field 'label' lacks label(s) {_listed(absent, len(absent))}")


# ---------------------------------------------------------------------------------------------------------------
# Fine-food reviews (R's modeldata)
# ---------------------------------------------------------------------------------------------------------------

FINE_FOODS_CLASSES: tuple[str, ...] = ("great", "other")
FINE_FOODS_TABLES = {"train": "training_data", "test": "testing_data"}  # id prefix -> modeldata's table
LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def default_modeldata_root() -> Path:
    """Where ``scripts/install_modeldata.sh`` puts R's modeldata database: ``<venv>/share/modeldata``."""
    return Path(sys.prefix) / "share" / "modeldata"


def _modeldata_file(root: Path, name: str) -> Path:
    return _installed_file(root, name, "R modeldata", default_modeldata_root(), "install_modeldata.sh")


def rdb_entry(blob: bytes, compression: int, where: str) -> bytes:
    """One object of an R lazy-load database, decompressed as R's ``lazyLoadDBfetch`` does. ``compression`` is
    the index's code: 0 stores the serialised object as it is; otherwise the entry is its 4-byte big-endian length,
    then (codes 2 and 3) one type byte, then the data: ``Z`` xz (a raw LZMA2 stream), ``2`` bzip2, ``1`` zlib,
    ``0`` stored; code 1 has no type byte: zlib. ``where`` names the entry in errors."""
    if compression == 0:
        return blob
    size = int.from_bytes(blob[:4], "big")
    kind, body = ("1", blob[4:]) if compression == 1 else (chr(blob[4]), blob[5:])
    try:
        if kind == "Z":
            data = lzma.decompress(body, format=lzma.FORMAT_RAW,
                                   filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        elif kind == "2":
            data = bz2.decompress(body)
        elif kind == "1":
            data = zlib.decompress(body)
        elif kind == "0":
            data = body
        else:
            raise ValueError(f"{where}: unknown compression type {kind!r} (R writes 'Z' xz, '2' bzip2, '1' zlib, "
                             "'0' none)")
    except (lzma.LZMAError, OSError, zlib.error) as e:
        raise ValueError(f"{where}: cannot decompress ({kind!r}): {e}") from e
    if len(data) != size:
        raise ValueError(f"{where}: decompressed to {len(data)} bytes, the entry says {size}")
    return data


def read_rdb_table(root: str | os.PathLike[str], name: str) -> pd.DataFrame:
    """The data frame ``name`` of the R lazy-load database ``root/Rdata.rdb`` (``Rdata.rdx`` is its index: name ->
    offset and length, and the compression), parsed by ``rdata``; factors become pandas categoricals."""
    import rdata  # imported here: only this source needs it (and xarray, which it imports)

    root = Path(root)
    index_path, db_path = _modeldata_file(root, "Rdata.rdx"), _modeldata_file(root, "Rdata.rdb")
    # The index and the entries are RDS streams (serialised R objects): saying so spares rdata's warnings about the
    # extension.
    index = rdata.conversion.convert(rdata.parser.parse_file(index_path, extension=".rds"))
    entries = {str(k): v for k, v in index["variables"].items()}
    if name not in entries:
        raise ValueError(f"{index_path}: no table {name!r}; tables: {', '.join(sorted(entries))}")
    offset, length = (int(x) for x in entries[name])
    with db_path.open("rb") as f:
        f.seek(offset)
        blob = f.read(length)
    if len(blob) != length:
        raise ValueError(f"{db_path}: table {name!r} is truncated ({len(blob)} of {length} bytes at {offset})")
    data = rdb_entry(blob, int(index["compressed"][0]), f"{db_path}: table {name!r}")
    # modeldata's tables are tibbles: data frames to pandas (rdata would fall back to that, warning).
    constructors = {**rdata.conversion.DEFAULT_CLASS_MAP, "tbl_df": rdata.conversion.DEFAULT_CLASS_MAP["data.frame"]}
    table = rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"), constructors)
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{db_path}: {name!r} is a {type(table).__name__}, not a data frame")
    return table


def review_text(review: str) -> str:
    """A review as plain text: HTML line breaks as spaces, HTML entities decoded, whitespace runs as one space."""
    return " ".join(html.unescape(LINE_BREAK.sub(" ", review)).split())


def fine_foods(root: str | os.PathLike[str] | None = None, max_chars: int = 0) -> pd.DataFrame:
    """Amazon fine-food reviews labelled ``great`` or ``other`` (modeldata's ``small_fine_foods``, MIT): its
    ``training_data`` and ``testing_data`` pooled (``few_shot_splits`` draws the splits), in that order.

    ``id`` is ``ff-train-<row>`` / ``ff-test-<row>`` (0-based row of the table), ``text`` the review
    (``review_text``), ``label`` the score. ``max_chars`` > 0 drops the reviews longer than that (after cleaning).
    ``root`` defaults to ``default_modeldata_root()``.
    """
    root = Path(root) if root is not None else default_modeldata_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no modeldata folder; `make setup` installs R's modeldata database there "
                                "(scripts/install_modeldata.sh)")
    frames = []
    for prefix, table_name in FINE_FOODS_TABLES.items():
        table = read_rdb_table(root, table_name)
        missing = table["review"].isna().to_numpy() | table["score"].isna().to_numpy()
        if missing.any():  # str() would make a null the text "<NA>"
            raise ValueError(f"{root / 'Rdata.rdb'}: {table_name}: review or score is null in {int(missing.sum())} "
                             f"row(s), e.g. rows {[int(i) for i in missing.nonzero()[0][:MAX_SHOWN]]}")
        frames.append(pd.DataFrame({"id": [f"ff-{prefix}-{i}" for i in range(len(table))],
                                    "text": [review_text(str(r)) for r in table["review"]],
                                    "label": table["score"].astype(str).to_list()}))
    df = pd.concat(frames, ignore_index=True)
    if max_chars > 0:
        long = df["text"].str.len() > max_chars
        log.info("fine foods: dropped %d of %d reviews longer than %d characters", int(long.sum()), len(df),
                 max_chars)
        df = df[~long].reset_index(drop=True)
    log.info("fine foods from %s: %s", root, df["label"].value_counts().to_dict())
    return df


# ---------------------------------------------------------------------------------------------------------------
# The task's data concern (ptg.tasks.TaskData)
# ---------------------------------------------------------------------------------------------------------------


def labelled_splits(cfg: DataConfig, task: TaskParams) -> dict[str, pd.DataFrame]:
    """Train / validation / test frames (id, text, label, split) from ``data.source``: ``wordnet-topics`` (WordNet
    noun glosses by lexicographer file) or ``fine-foods`` (Amazon fine-food reviews, great/other, at most
    ``data.max_input_chars`` characters when that is > 0), ``task.shots`` per class for train and validation drawn
    by ``data.seed``, ``data.max_test`` test texts; or a local folder of train/dev/test files (``data.input_field``
    = text column, ``data.target_field`` = label column), used as given (test capped at ``data.max_test``). Checked
    against ``task.labels``: a label with no verbalizer, an empty text or a split without every label is an
    error."""
    if cfg.source == WORDNET_SOURCE:
        frames = few_shot_splits(wordnet_topics(classes=task.labels), task.shots, cfg.seed, cfg.max_test)
    elif cfg.source == FINE_FOODS_SOURCE:
        frames = few_shot_splits(fine_foods(max_chars=cfg.max_input_chars), task.shots, cfg.seed, cfg.max_test)
    elif source_kind(cfg.source) == "local":
        frames = load_classification_folder(cfg.source, cfg.input_field, cfg.target_field)
        frames = {s: f.assign(split=s) for s, f in frames.items()}
        if cfg.max_test and len(frames["test"]) > cfg.max_test:
            frames["test"] = frames["test"].sample(n=cfg.max_test, random_state=cfg.seed).sort_index()
    else:
        raise ValueError(f"data.source {cfg.source!r}: the prompt task reads {WORDNET_SOURCE!r}, "
                         f"{FINE_FOODS_SOURCE!r} or a local folder of train/dev/test files with {cfg.input_field!r} "
                         f"and {cfg.target_field!r} columns")
    # Rows in a seeded random order: a source sorted by class (WordNet by lexicographer file) must not make the
    # first `evaluate.subset_items` test texts one class.
    frames = {s: f.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)[
        [*CLASSIFICATION_COLUMNS, "split"]] for s, f in frames.items()}
    check_classification(frames, task.labels, where=f"data.source {cfg.source}")
    return frames


def build_examples(params: Params) -> tuple[dict[str, pd.DataFrame], Any, dict[str, Any]]:
    """(frames per split, their schema, the source info for prepare.json)."""
    cfg = params.data
    frames = labelled_splits(cfg, params.task)
    info = {"source": cfg.source, "rows": {s: len(f) for s, f in frames.items()},
            "labels": {s: f["label"].value_counts().sort_index().to_dict() for s, f in frames.items()}}
    return frames, schemas.ClassificationExamples, info


def init_policy(params: Params, lm_dir: Path, seed: int) -> None:
    """The round-0 policy with ``task.head_hidden`` > 0: a fresh MLP head beside the frozen LM
    (``models.PROMPT_HEAD_FILE``); nothing otherwise."""
    task = params.task
    if not task.head_hidden:
        return
    from ptg.lm.models import add_prompt_head, load_lm, prompt_head, save_prompt_head

    model = add_prompt_head(load_lm(lm_dir), task.head_hidden, seed)
    head = prompt_head(model)
    assert head is not None
    save_prompt_head(head, lm_dir)


def round_inputs(ctx: Context, r: int) -> pd.DataFrame:
    """The groups sample@r draws K prompts for: ``sample.train_inputs`` training and ``sample.validation_inputs``
    held-out ones (the same every round: the policy is input-free)."""
    sp = ctx.params.sample
    return groups(sp.train_inputs, sp.validation_inputs)


def inputs_of(ids: Sequence[str], params: Params) -> pd.DataFrame:
    """The groups with these ids (id, split), for fit_guidance."""
    return pd.DataFrame({"id": sorted(set(ids))}).assign(split=lambda f: f["id"].map(split_of_group))


def encode_inputs(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                  params: Params) -> list[list[int]]:
    """Every group's input: the start token."""
    return [start_ids(tokenizer)] * len(frame)


def stops(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: Params) -> list[int]:
    """None: every prompt has the same length (``sample.max_new_tokens``)."""
    return []


def training_inputs(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, cfg: TrainLMParams,
                    params: Params) -> list[tuple[list[int], list[int], tuple[str, ...]]]:
    """What train_lm trains on: ``batch_size`` start tokens, each sampled into one prompt per micro-batch (no
    response, no references)."""
    return [(start_ids(tokenizer), [], ())] * cfg.batch_size
