"""Train/validation/test examples for the ``prepare`` stage: from the Python standard library, a folder or the Hub.

Three sources, chosen by ``ptg.config.DataConfig.source``:

* ``"python-docstrings"`` (default, offline): the standard library's documented functions (``ptg.corpus.docstrings``),
  split by a stable hash of the qualified name (``split_of``), so the splits never change between runs.
* a local folder with ``train``, ``validation`` (or ``dev``) and ``test`` files (jsonl, json lines, csv, parquet);
  with ``data.config`` set, a local copy of a hub data set read by ``datasets.load_dataset`` (its README's
  ``configs`` name the files of each configuration).
* a Hugging Face dataset id (``datasets.load_dataset`` with ``data.config`` and ``data.revision``; needs the network
  or a warm cache).

``build_examples`` turns any of them into one frame per split with the ``ptg.schemas.Examples`` columns: long
inputs dropped, splits capped by a seeded sample, the prompt formatted, ``references`` a list of strings whose
first element is the training ``target``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ptg.config import DOCSTRINGS_SOURCE, template_fields
from ptg.corpus import docstrings
from ptg.io import import_extra, read_records
from ptg.schemas import SPLITS, check_disjoint_splits

if TYPE_CHECKING:
    from ptg.config import DataConfig

log = logging.getLogger(__name__)

EXAMPLE_COLUMNS: tuple[str, ...] = ("id", "split", "input", "prompt", "target", "references")
LOCAL_EXTENSIONS: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {"train": ("train",), "validation": ("validation", "dev"),
                                             "test": ("test",)}



# ---------------------------------------------------------------------------------------------------------------
# Splits and prompts
# ---------------------------------------------------------------------------------------------------------------


def split_of(example_id: str) -> str:
    """Stable split of an id: 80 % train, 10 % validation, 10 % test, from the SHA-1 of the id (not ``hash``)."""
    bucket = int.from_bytes(hashlib.sha1(example_id.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def format_prompt(template: str, text: str) -> str:
    """``template`` with ``{input}`` replaced by ``text`` (braces inside ``text`` are kept as they are)."""
    return template.format(input=text)


# ---------------------------------------------------------------------------------------------------------------
# Local folders and the Hub
# ---------------------------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """An input cell as one string: lists (e.g. pre-tokenised text) are joined with spaces; None is ''."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(_text(v) for v in value)
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return str(value)


def _references(value: Any) -> list[str]:
    """A target cell as the list of its non-blank references (a list value means several references)."""
    items = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    refs = [_text(v) for v in items]
    return [r for r in refs if r.strip()]


def _not_text(value: Any) -> bool:
    """A cell that is neither a scalar nor a list of them: a mapping, or a list that holds one."""
    if isinstance(value, Mapping):
        return True
    return isinstance(value, (list, tuple, np.ndarray)) and any(_not_text(v) for v in value)


def _rows(index: Any, ids: Any, values: Any = None, shown: int = 5) -> str:
    """``row i (id 'x')`` for the first ``shown`` rows, each with its value when ``values`` is given."""
    values = [None] * len(index) if values is None else list(values)
    return ", ".join(f"row {i} (id {ex_id!r})" + ("" if v is None else f": {str(v)[:60]!r}")
                     for i, ex_id, v in list(zip(index, ids, values, strict=True))[:shown])


def normalize_fields(df: pd.DataFrame, split: str, input_field: str, target_field: str, where: str,
                     strict: bool = True) -> pd.DataFrame:
    """Raw rows -> columns id, split, input, references.

    A row with an empty input or no non-empty reference is an error naming the file, the field and the rows
    (``strict``, for the user's own files), or is dropped with a warning (hub datasets, which have a few).

    ``id`` is the ``id`` column as strings when there is one, else ``<split>-<row>``. ``where`` names the source
    in errors: a missing field is a ``ValueError`` naming it, the field and the available columns; so are an id
    given twice and a field value that is not text or a list of texts (a JSON object, say), with their rows.
    """
    for name in (input_field, target_field):
        if name not in df.columns:
            raise ValueError(f"{where}: no field {name!r}; available columns: {', '.join(map(str, df.columns))}")
    ids = df["id"].map(str) if "id" in df.columns else pd.Series([f"{split}-{i}" for i in range(len(df))])
    ids.index = range(len(df))
    for name in (input_field, target_field):
        odd = [i for i, v in enumerate(df[name]) if _not_text(v)]
        if odd:
            raise ValueError(f"{where}: field {name!r} must hold text or a list of texts; {len(odd)} row(s) hold "
                             f"something else: {_rows(odd, ids[odd], df[name].iloc[odd])}")
    dup = ids[ids.duplicated(keep=False)]
    if not dup.empty:
        groups = dup.groupby(dup, sort=False).groups
        shown = "; ".join(f"{v!r} (rows {', '.join(map(str, rows))})" for v, rows in list(groups.items())[:5])
        raise ValueError(f"{where}: field 'id' must be unique; {len(groups)} id(s) occur more than once: {shown}")
    out = pd.DataFrame({
        "id": ids.to_numpy(dtype=object),
        "split": split,
        "input": [_text(v) for v in df[input_field]],
        "references": [_references(v) for v in df[target_field]],
    })
    keep = out["input"].str.strip().astype(bool) & out["references"].map(bool)
    if strict and not keep.all():
        bad = out[~keep]
        fields = [f for f, ok in ((input_field, bad["input"].str.strip().astype(bool).all()),
                                  (target_field, bad["references"].map(bool).all())) if not ok]
        rows = _rows(bad.index, bad["id"])
        raise ValueError(f"{where}: empty {' / '.join(map(repr, fields))} in {len(bad)} row(s): {rows}")
    if not keep.all():
        log.warning("%s: dropped %d of %d rows with an empty %r or %r", where, int((~keep).sum()), len(out),
                    input_field, target_field)
    return out[keep].reset_index(drop=True)


def _split_file(folder: Path, split: str) -> Path:
    found = [folder / f"{stem}{ext}" for stem in SPLIT_ALIASES[split] for ext in LOCAL_EXTENSIONS
             if (folder / f"{stem}{ext}").is_file()]
    if not found:
        names = ", ".join(f"{stem}{{{','.join(LOCAL_EXTENSIONS)}}}" for stem in SPLIT_ALIASES[split])
        raise FileNotFoundError(f"{folder}: no {split} file (looked for {names})")
    if len(found) > 1:
        raise ValueError(f"{folder}: several {split} files, keep one: {', '.join(p.name for p in found)}")
    return found[0]


def load_local(folder: str | os.PathLike[str], input_field: str = "input",
               target_field: str = "target") -> pd.DataFrame:
    """All splits of a local dataset folder as one frame with columns id, split, input, references.

    The folder holds ``train``, ``validation`` (or ``dev``) and ``test`` files, each ``.jsonl``, ``.json`` (JSON
    lines, or one JSON array), ``.csv`` or ``.parquet``. A list-valued input is joined with spaces; a list-valued
    target is a list of references (the first one trains, all of them evaluate).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder")
    frames = []
    for split in SPLITS:
        path = _split_file(folder, split)
        raw = read_records(path)
        if raw.empty:
            raise ValueError(f"{path}: the {split} file has no rows")
        frames.append(normalize_fields(raw, split, input_field, target_field, str(path)))
    return pd.concat(frames, ignore_index=True)


def load_hf(dataset_id: str, input_field: str = "input", target_field: str = "target",
            name: str | None = None, revision: str | None = None) -> pd.DataFrame:
    """All splits of a Hugging Face dataset (``train``, ``validation`` or ``dev``, ``test``) as ``load_local`` does.

    ``datasets`` is imported here, not at module import, and downloads only when this is called (or reads its
    cache when offline). ``name`` is the dataset configuration (``data.config``), if it has several; ``revision``
    a branch, tag or commit (``data.revision``).
    """
    datasets = import_extra("datasets", "hub", f"data.source {dataset_id!r} (a Hugging Face dataset id)")
    dd = datasets.load_dataset(dataset_id, name, revision=revision)
    frames = []
    for split in SPLITS:
        hub_split = next((s for s in SPLIT_ALIASES[split] if s in dd), None)
        if hub_split is None:
            raise ValueError(f"{dataset_id}: no {split} split; available: {', '.join(dd)}")
        frames.append(normalize_fields(dd[hub_split].to_pandas(), split, input_field, target_field,
                                       f"{dataset_id}[{hub_split}]", strict=False))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------------


def source_kind(source: str) -> str:
    """``"python-docstrings"``, ``"local"`` (an existing folder) or ``"huggingface"``."""
    if source == DOCSTRINGS_SOURCE:
        return DOCSTRINGS_SOURCE
    return "local" if Path(source).is_dir() else "huggingface"


def load_source(cfg: DataConfig) -> pd.DataFrame:
    """Every usable row of ``cfg.source`` (columns id, split, input, references), before caps, in source order."""
    kind = source_kind(cfg.source)
    if kind == DOCSTRINGS_SOURCE:
        df = docstrings.python_docstrings(cfg.max_input_chars)
        return pd.DataFrame({"id": df["id"], "split": df["id"].map(split_of), "input": df["input"],
                             "references": [[t] for t in df["target"]]})
    if kind == "local" and cfg.revision is not None:
        raise ValueError(f"data.revision {cfg.revision!r} applies to a Hugging Face data set id; data.source "
                         f"{cfg.source!r} is a local folder (set data.revision: null)")
    if kind == "local" and cfg.config is None:
        df = load_local(cfg.source, cfg.input_field, cfg.target_field)
    elif kind == "local":  # a local copy of a hub data set (its README's configs name the files): datasets reads it
        df = load_hf(cfg.source, cfg.input_field, cfg.target_field, cfg.config)
    else:
        log.info("%s is not a local folder: loading it as a Hugging Face dataset", cfg.source)
        df = load_hf(cfg.source, cfg.input_field, cfg.target_field, cfg.config, cfg.revision)
    if cfg.max_input_chars:
        long = df["input"].str.len() > cfg.max_input_chars
        if long.any():
            log.warning("%s: dropped %d of %d rows with inputs over %d characters", cfg.source, int(long.sum()),
                        len(df), cfg.max_input_chars)
        df = df[~long].reset_index(drop=True)
    return df


def cap_rows(df: pd.DataFrame, cap: int, seed: int, salt: int = 0) -> pd.DataFrame:
    """At most ``cap`` rows (0 = all): a seeded sample without replacement, in the original row order."""
    if not cap or len(df) <= cap:
        return df
    idx = np.random.default_rng([seed, salt]).choice(len(df), size=cap, replace=False)
    return df.iloc[np.sort(idx)]


def build_examples(cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """One ``Examples`` frame per split (train, validation, test) from ``cfg``: capped, prompted, disjoint."""
    template_fields(cfg.prompt_template)
    rows = load_source(cfg)
    frames: dict[str, pd.DataFrame] = {}
    for salt, split in enumerate(SPLITS):
        part = cap_rows(rows[rows["split"] == split], cfg.cap(split), cfg.seed, salt).reset_index(drop=True)
        if part.empty:
            raise ValueError(f"{cfg.source}: the {split} split is empty")
        references = [[str(r) for r in refs] for refs in part["references"]]
        frames[split] = pd.DataFrame({
            "id": part["id"].astype(str),
            "split": split,
            "input": part["input"],
            "prompt": [format_prompt(cfg.prompt_template, x) for x in part["input"]],
            "target": [refs[0] for refs in references],
            "references": pd.Series(references, dtype=object),
        }, columns=list(EXAMPLE_COLUMNS))
    check_disjoint_splits(frames, where=cfg.source)
    return frames


def source_info(cfg: DataConfig, frames: Mapping[str, pd.DataFrame] | None = None) -> dict[str, Any]:
    """What the examples came from, for a metrics JSON: source, kind, rows per split (and Python version).

    ``frames`` are the ``build_examples(cfg)`` output; built again when not given.
    """
    frames = build_examples(cfg) if frames is None else frames
    kind = source_kind(cfg.source)
    info: dict[str, Any] = {"source": cfg.source, "kind": kind,
                            "rows": {split: len(df) for split, df in frames.items()}}
    if kind == DOCSTRINGS_SOURCE:
        info["python_version"] = docstrings.python_version()
        info["corpus_size"] = len(docstrings.python_docstrings(cfg.max_input_chars))
    return info
