"""Atomic file IO shared by every pipeline stage: JSON, validated parquet tables and whole output folders.

Nothing a stage writes is ever seen half-written: ``atomic_path`` hands out a temporary path next to the
destination and moves it into place (``os.replace``) only when the block succeeds, so a crash, a failed
validation or Ctrl-C leaves the previous output (or nothing) behind, never a truncated file that DVC would cache.

Tables are validated against a ``ptg.schemas`` model before they are written and after they are read; a
validation failure is a ``TableError`` whose message names the file, the failing columns and checks, and a few
offending rows, in a form meant to be read in one screen.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pandera.errors
import pandera.pandas as pa

log = logging.getLogger(__name__)

Schema = type[pa.DataFrameModel] | pa.DataFrameSchema

MAX_ROWS_SHOWN = 5  # offending rows shown per failing check
MAX_CHECKS_SHOWN = 12  # failing (column, check) groups shown in a TableError message
_MAX_VALUE_CHARS = 60


# ---------------------------------------------------------------------------------------------------------------
# Atomic paths
# ---------------------------------------------------------------------------------------------------------------


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    """Delete a file, link or folder if it exists (no error when it does not)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move what was written there onto ``path``.

    The temporary path (``.<name>.tmp-<random>`` in the same folder, so the final move is a rename on one file
    system) does not exist yet: the block creates a file or a folder there. On success a file replaces ``path``
    with one atomic ``os.replace``; a folder replaces an existing ``path`` by moving the old one aside, moving the
    new one in and deleting the old one (restored if the move in fails). If the block raises, the temporary path
    is removed, ``path`` is untouched and the exception propagates. The parent folder is created if needed.
    A process killed inside the block (SIGKILL, power loss) cannot clean up: the temporaries it left beside
    ``path`` are removed by the next write of ``path`` (one writer per workspace: DVC's lock, ``workspace_lock``).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")):
        log.warning("removing %s, left by an interrupted write of %s", stale, final)
        _remove(stale)
    tmp = _sibling(final, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic write of {final}: the block wrote nothing at {tmp}")
        if tmp.is_dir() or final.is_dir():
            _replace_tree(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _replace_tree(new: Path, final: Path) -> None:
    if not final.exists() and not final.is_symlink():
        os.replace(new, final)
        return
    old = _sibling(final, "old")
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    _remove(old)


# ---------------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys, trailing newline), atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; ``FileNotFoundError`` naming the path when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSON file")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


class TableError(ValueError):
    """A table failed its schema. ``failure_cases`` holds pandera's full report (one row per failing value)."""

    def __init__(self, message: str, failure_cases: pd.DataFrame | None = None) -> None:
        super().__init__(message)
        self.failure_cases = failure_cases


def _schema_name(schema: Schema) -> str:
    return getattr(schema, "__name__", None) or getattr(schema, "name", None) or type(schema).__name__


def short(value: Any) -> str:
    """``repr(value)``, cut to a length an error message can show."""
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS - 3] + "..."


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and lists
        return False


def _index_label(value: Any) -> str:
    return "?" if _missing(value) else str(value)


def format_failures(failure_cases: pd.DataFrame, where: str, schema_name: str,
                    max_rows: int = MAX_ROWS_SHOWN, max_checks: int = MAX_CHECKS_SHOWN) -> str:
    """A human-readable summary of pandera's ``failure_cases``: one line per failing (column, check) group.

    Column checks list up to ``max_rows`` offending ``[index] value`` pairs; dataframe-level checks (which
    pandera reports once per cell) list up to ``max_rows`` offending rows as ``[index] col=value, ...``.
    """
    fc = failure_cases.reset_index(drop=True)
    lines: list[str] = []
    structural = fc[fc["index"].map(_missing) & (fc["schema_context"] == "DataFrameSchema")]
    for check, group in structural.groupby("check", sort=False):
        cols = ", ".join(repr(str(v)) for v in group["failure_case"])
        what = {"column_in_dataframe": "missing columns", "column_in_schema": "unexpected columns"}.get(
            str(check), f"{check} failed")
        lines.append(f"  {what}: {cols}")
    rest = fc.drop(index=structural.index)
    column_level = rest[rest["schema_context"] != "DataFrameSchema"]
    frame_level = rest[rest["schema_context"] == "DataFrameSchema"]
    for (column, check), group in column_level.groupby(["column", "check"], sort=False):
        if group["index"].map(_missing).all():  # a wrong dtype, or a check that could not run at all
            lines.append(f"  column {column!r}: check {check} failed: "
                         + "; ".join(short(v) for v in group["failure_case"][:max_rows]))
            continue
        n = len(group)
        pairs = zip(group["index"][:max_rows], group["failure_case"][:max_rows], strict=True)
        shown = "; ".join(f"[{_index_label(i)}] {short(v)}" for i, v in pairs)
        more = f" (+{n - max_rows} more)" if n > max_rows else ""
        rows = "value" if n == 1 else "values"
        lines.append(f"  column {column!r}: check {check} failed on {n} {rows}: {shown}{more}")
    for check, group in frame_level.groupby("check", sort=False):
        indices = list(dict.fromkeys(group["index"]))
        n = len(indices)
        shown_rows = []
        for i in indices[:max_rows]:
            cells = group[group["index"] == i]
            shown_rows.append(f"[{_index_label(i)}] " + ", ".join(
                f"{c}={short(v)}" for c, v in zip(cells["column"], cells["failure_case"], strict=True)))
        more = f"\n      (+{n - max_rows} more rows)" if n > max_rows else ""
        lines.append(f"  rows: check {check} failed on {n} row{'s' * (n != 1)}:\n      "
                     + "\n      ".join(shown_rows) + more)
    if len(lines) > max_checks:
        lines = [*lines[:max_checks], f"  ... and {len(lines) - max_checks} more failing checks"]
    return f"{where}: table does not match schema {schema_name}:\n" + "\n".join(lines)


def validate_table(df: pd.DataFrame, schema: Schema, where: str = "<table>") -> pd.DataFrame:
    """Validate ``df`` lazily against ``schema``; return the validated (coerced) frame or raise ``TableError``.

    ``where`` names the table in the message (a file path for ``read_table``/``write_table``).
    """
    try:
        return schema.validate(df, lazy=True)
    except pandera.errors.SchemaErrors as err:
        fc = err.failure_cases
        raise TableError(format_failures(fc, where, _schema_name(schema)), fc) from None
    except pandera.errors.SchemaError as err:  # raised by pandera outside lazy collection (rare)
        raise TableError(f"{where}: table does not match schema {_schema_name(schema)}: {err}",
                         getattr(err, "failure_cases", None)) from None


def write_table(df: pd.DataFrame, path: str | os.PathLike[str], schema: Schema) -> pd.DataFrame:
    """Validate ``df`` against ``schema`` and, only if it passes, write it to parquet at ``path`` atomically.

    The index is not written (tables are plain rows). Returns the validated frame that was written. A failure
    raises ``TableError`` and leaves ``path`` as it was.
    """
    path = Path(path)
    valid = validate_table(df, schema, str(path))
    with atomic_path(path) as tmp:
        valid.to_parquet(tmp, index=False)
    log.debug("wrote %s (%d rows, %s)", path, len(valid), _schema_name(schema))
    return valid


def write_records(df: pd.DataFrame, path: str | os.PathLike[str], schema: Schema) -> pd.DataFrame:
    """``write_table`` for the formats people open and edit too, by extension: .parquet, .csv (no index) or JSON
    lines (.jsonl; one object per row, missing values as null). Every one reads back with ``read_records``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return write_table(df, path, schema)
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: unsupported table format {suffix!r} (use .csv, .jsonl or .parquet)")
    valid = validate_table(df, schema, str(path))
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            valid.to_csv(tmp, index=False)
        else:
            rows = valid.astype(object).where(valid.notna(), None).to_dict("records")
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    log.debug("wrote %s (%d rows, %s)", path, len(valid), _schema_name(schema))
    return valid


def _utf8_text(path: Path) -> str:
    """The text of ``path`` as UTF-8 (a leading byte-order mark dropped); ``ValueError`` naming the file, the line
    and the bytes that are not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        start = data.rfind(b"\n", 0, err.start) + 1
        end = data.find(b"\n", err.start)
        context = data[start:end if end >= 0 else len(data)][:_MAX_VALUE_CHARS].decode("utf-8", "backslashreplace")
        raise ValueError(f"{path}:{line}: not UTF-8 text: byte(s) {data[err.start:err.end]!r} at byte offset "
                         f"{err.start} ({err.reason}) in {context!r}; save the file as UTF-8") from None


def read_records(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A table file as a frame, by extension: .parquet, .csv, or JSON lines (.jsonl / .json; a .json file may
    also hold one array of records). Text files must be UTF-8. A missing file is a ``FileNotFoundError`` naming
    the path; bytes that are not UTF-8 are a ``ValueError`` naming the file, the line and the bytes. An empty file
    is a frame without columns or rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table (has the stage that writes it run?)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{path}: not a readable parquet table, truncated or corrupt ({e}); if it is a pipeline "
                             "output, `dvc status` shows it as modified and `dvc checkout --force` (or `dvc repro`) "
                             "restores it") from None
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{path}: unsupported table format {suffix!r} (use .parquet, .csv, .jsonl or .json)")
    text = _utf8_text(path)
    if suffix == ".csv":
        if not text.strip():  # an empty file: no columns, no rows (as an empty JSON lines file)
            return pd.DataFrame()
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    if suffix == ".json" and text.lstrip().startswith("["):
        return pd.DataFrame.from_records(json.loads(text))
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({err.msg})") from None
    return pd.DataFrame.from_records(records)


def read_table(path: str | os.PathLike[str], schema: Schema) -> pd.DataFrame:
    """Read the table at ``path`` (see ``read_records``) validated against ``schema`` (``TableError`` if not)."""
    return validate_table(read_records(path), schema, str(path))


def import_extra(module: str, extra: str, needed_by: str) -> ModuleType:
    """``module``, which only some uses need and which comes with ``pip install 'ptg[<extra>]'``; a missing one is
    an error naming what needs it and the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise
        raise ModuleNotFoundError(f"{needed_by} needs {module}, which this environment lacks: "
                                  f"pip install 'ptg[{extra}]'", name=e.name) from e
