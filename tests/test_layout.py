"""The code's layout rules that a reviewer would otherwise check by hand: no module uses another module's private
names (a helper two modules need is public in the module that owns it)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "src" / "ptg").rglob("*.py"), *(ROOT / "stages").glob("*.py"),
                  *(ROOT / "flows").glob("*.py")])
PTG_MODULES = {p.stem for p in (ROOT / "src" / "ptg").rglob("*.py") if p.name != "__init__.py"} | {
    p.parent.name for p in (ROOT / "src" / "ptg").rglob("__init__.py")}  # modules and packages, at any depth


def private_uses(source: str) -> list[str]:
    """``from ptg.x import _name`` and ``x._name`` for a ptg module ``x`` imported by name (``from ptg.lm import
    models``)."""
    tree = ast.parse(source)
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                and n.module.split(".")[0] == "ptg" for a in n.names if a.name in PTG_MODULES}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ptg":
            out += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and isinstance(node.value, ast.Name) and node.value.id in imported):
            out.append(f"{node.value.id}.{node.attr}")
    return out


def test_no_module_uses_another_modules_private_names():
    found = {str(p.relative_to(ROOT)): uses for p in SOURCES if (uses := private_uses(p.read_text()))}
    assert not found, found


def test_the_check_finds_both_forms():
    assert private_uses("from ptg.lm.models import _pad, collate\nfrom ptg import io\nio._short(1)\n"
                        "from ptg.lm import models\nmodels._pad(2)\n") == [
        "from ptg.lm.models import _pad", "io._short", "models._pad"]


def command_line_uses(source: str) -> list[str]:
    """``import argparse`` / ``from argparse import ...`` and calls of ``print``: the command line's business."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [f"import {a.name}" for a in node.names if a.name == "argparse"]
        elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
            out.append("from argparse import")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            out.append(f"print() at line {node.lineno}")
    return out


def test_only_the_ptg_command_parses_arguments_and_prints():
    """One command line (`ptg`, typer, in ptg.cli) over library functions that log and return; no argparse."""
    library = [p for p in (ROOT / "src" / "ptg").rglob("*.py") if p.name != "cli.py" and "template" not in p.parts]
    found = {str(p.relative_to(ROOT)): uses for p in library if (uses := command_line_uses(p.read_text()))}
    assert not found, found
    assert command_line_uses("import argparse\nprint(1)\n") == ["import argparse", "print() at line 2"]
