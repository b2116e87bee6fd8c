"""The code's layout rules that a reviewer would otherwise check by hand: no module uses another module's private
names (a helper two modules need is public in the module that owns it)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "src" / "ptg").rglob("*.py"), *(ROOT / "stages").glob("*.py"),
                  *(ROOT / "flows").glob("*.py")])
PTG_MODULES = {p.stem for p in (ROOT / "src" / "ptg").glob("*.py")} | {
    p.parent.name for p in (ROOT / "src" / "ptg").glob("*/__init__.py")}  # modules and packages


def private_uses(source: str) -> list[str]:
    """``from ptg.x import _name`` and ``x._name`` for a ptg module ``x`` imported by name."""
    tree = ast.parse(source)
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "ptg"
                for a in n.names}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ptg":
            out += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and isinstance(node.value, ast.Name) and node.value.id in imported & PTG_MODULES):
            out.append(f"{node.value.id}.{node.attr}")
    return out


def test_no_module_uses_another_modules_private_names():
    found = {str(p.relative_to(ROOT)): uses for p in SOURCES if (uses := private_uses(p.read_text()))}
    assert not found, found


def test_the_check_finds_both_forms():
    assert private_uses("from ptg.models import _pad, collate\nfrom ptg import io\nio._short(1)\n") == [
        "from ptg.models import _pad", "io._short"]
