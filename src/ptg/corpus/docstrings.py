"""The default data source, ``python-docstrings``, offline: every documented function and method of the running
interpreter's standard library as a code-summarisation example, its input the function's code with the docstring
removed and its target the docstring's first paragraph. ``ptg.corpus`` splits it (``split_of``) and caps it like any
other source; the corpus depends on the Python version, which ``python_version`` records.
"""

from __future__ import annotations

import ast
import functools
import logging
import os
import re
import sys
import sysconfig
import textwrap
import time
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

MIN_TARGET_WORDS = 3
MAX_TARGET_WORDS = 40
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_SIGNATURE_RE = re.compile(r"^[\w.]+\s*\(.*?\)\s*(->|-->|=>)")
_BLANK_LINE_RE = re.compile(r"\n\s*\n")


def python_version() -> str:
    """``sys.version`` of the running interpreter, whose standard library the docstrings corpus comes from."""
    return sys.version


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(root: Path) -> Iterator[Path]:
    """Every .py file under ``root`` in sorted order, skipping test folders, test files and third-party code."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(folder) / name


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def docstring_summary(doc: str) -> str:
    """First paragraph of a (cleaned) docstring, whitespace-normalised to one line."""
    return " ".join(_BLANK_LINE_RE.split(doc.strip(), maxsplit=1)[0].split())


def restates_signature(summary: str, name: str) -> bool:
    """Whether a summary only restates a signature: ``name(...`` or ``anything(args) -> ...``."""
    return summary.startswith(f"{name}(") or _SIGNATURE_RE.match(summary) is not None


def _byte_col_text(line: str, start: int | None = None, end: int | None = None) -> str:
    """Slice a source line by UTF-8 byte columns (what ``ast`` column offsets count)."""
    return line.encode("utf-8")[start:end].decode("utf-8", errors="replace")


def _strip_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source (dedented, from the ``def`` line) without its docstring statement, or None.

    None when the docstring shares a line with other code (``def f(): "doc"``) or is the whole body.
    """
    doc = node.body[0]
    if len(node.body) == 1 or doc.end_lineno is None or node.end_lineno is None:
        return None
    if _byte_col_text(lines[doc.lineno - 1], end=doc.col_offset).strip():
        return None
    after = _byte_col_text(lines[doc.end_lineno - 1], start=doc.end_col_offset).strip()
    if after and not after.startswith("#"):
        return None
    kept = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    return textwrap.dedent("".join(kept)).rstrip() + "\n"


def _child_statements(node: ast.AST) -> Iterator[ast.stmt]:
    """The statements directly inside ``node``'s blocks (expressions are never walked: functions are statements)."""
    for attr in ("body", "orelse", "finalbody"):
        block = getattr(node, attr, None)
        if isinstance(block, list):
            yield from (stmt for stmt in block if isinstance(stmt, ast.stmt))
    for clause in (*getattr(node, "handlers", ()), *getattr(node, "cases", ())):
        yield from clause.body


def _functions(tree: ast.Module, module: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method, nested ones included, in source order (depth first).

    Functions defined under ``if``/``try``/``with``/... blocks keep the enclosing name as their prefix.
    """
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for stmt in _child_statements(node):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}.{stmt.name}", stmt
                yield from walk(stmt, f"{prefix}.{stmt.name}")
            elif isinstance(stmt, ast.ClassDef):
                yield from walk(stmt, f"{prefix}.{stmt.name}")
            else:
                yield from walk(stmt, prefix)

    return walk(tree, module)


def _file_examples(path: Path, module: str, max_input_chars: int) -> Iterator[tuple[str, str, str]]:
    try:
        with tokenize.open(path) as fh:  # honours the file's coding cookie
            source = fh.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. in old modules
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError) as err:
        log.debug("skipping %s: %s", path, err)
        return
    lines = source.splitlines(keepends=True)
    for qualname, node in _functions(tree, module):
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        target = docstring_summary(doc)
        if not MIN_TARGET_WORDS <= len(target.split()) <= MAX_TARGET_WORDS or restates_signature(target, node.name):
            continue
        code = _strip_docstring(lines, node)
        if code is None or (max_input_chars and len(code) > max_input_chars):
            continue
        yield qualname, code, target


@functools.lru_cache(maxsize=4)
def _docstring_corpus(root: str, max_input_chars: int) -> tuple[tuple[str, str, str], ...]:
    start = time.perf_counter()
    rows: dict[str, tuple[str, str, str]] = {}
    base = Path(root)
    n_files = 0
    for path in _python_files(base):
        n_files += 1
        for row in _file_examples(path, _module_name(path, base), max_input_chars):
            rows.setdefault(row[0], row)  # the first definition of a qualified name wins
    log.info("python-docstrings: %d examples from %d files under %s in %.1f s", len(rows), n_files, root,
             time.perf_counter() - start)
    return tuple(rows.values())


def python_docstrings(max_input_chars: int = 0, root: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Code-summarisation examples (columns id, input, target) from the standard library's documented functions.

    ``root`` defaults to the running interpreter's standard library (``sysconfig``; site-packages, test folders
    and ``test_*.py`` files excluded). For each function or method with a docstring whose first paragraph has
    3-40 words and is not a restated signature: ``id`` is ``module.Class.func``, ``target`` that paragraph on
    one line, ``input`` the function's source with the docstring statement removed (dedented, decorators left
    out). Inputs longer than ``max_input_chars`` are skipped (0 = no limit). The result is cached per argument.
    """
    root_path = Path(root) if root is not None else stdlib_root()
    rows = _docstring_corpus(str(root_path.resolve()), int(max_input_chars))
    return pd.DataFrame(list(rows), columns=["id", "input", "target"])
