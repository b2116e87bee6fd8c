"""The params are read once: a stage (or a command) loads its params file into one frozen ``config.Params`` at its
start and passes it down; no library function reads a params file or takes a params path."""

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from ptg import config

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ptg"
READERS = {"load", "read_params", "load_group"}  # ptg.config's readers of a params file
# Where a params file may be read: what a user starts (a command, a stage's command line) and what makes or edits a
# project's params file; each with why.
ENTRY_POINTS = {
    "config.py": "the reader itself",
    "cli.py": "the ptg command: reads the params file a user names",
    "pipeline/__init__.py:cli": "a stage's command line (--params)",
    "ops": "makes projects and checks the overrides it writes into their params files; ptg perf times on the "
           "params ptg ships and writes those of the round it times",
    "bench": "runs DVC experiments: writes and reads each experiment's params file",
    "tracking": "records any DVC project's params as DVC sees them (`ptg track -- CMD` tracks non-ptg projects)",
}


def _allowed(relative: str, function: str | None) -> bool:
    return any(relative == key or relative.startswith(f"{key}/") or f"{relative}:{function}" == key
               for key in ENTRY_POINTS)


def params_reads(path: Path, relative: str) -> list[str]:
    """Where a library module reads a params file: a call to one of config's readers, the literal "params.yaml",
    or a function parameter ``params`` that is a path (``str`` / ``Path``): ``function: code``."""
    tree = ast.parse(path.read_text())
    readers = {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module == "ptg.config"
               for alias in node.names if alias.name in READERS}
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = function or node.name
            for arg in (*node.args.args, *node.args.kwonlyargs):
                if arg.arg == "params" and arg.annotation is not None and \
                        {"str", "Path"} & {n.id for n in ast.walk(arg.annotation) if isinstance(n, ast.Name)}:
                    found.append((function, f"params: {ast.unparse(arg.annotation)}"))
        call = isinstance(node, ast.Call) and (
            isinstance(node.func, ast.Name) and node.func.id in readers
            or isinstance(node.func, ast.Attribute) and node.func.attr in READERS
            and ast.unparse(node.func.value).endswith("config"))
        if call or isinstance(node, ast.Constant) and node.value == "params.yaml":
            found.append((function, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return [f"{function}: {code}" for function, code in found if not _allowed(relative, function)]


def test_no_library_function_reads_a_params_file():
    """Outside the entry points, nothing reads a params file or takes its path: the stages' code (and every other
    library module) gets ``config.Params``, or the groups it uses, from its caller."""
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if found := params_reads(path, relative):
            offenders[relative] = found
    assert not offenders, f"library code that reads params itself: {offenders}"


def test_the_finder_finds_a_read(tmp_path):
    """The test above fails on the code it was written against: ``load_group("model", params)`` in a library function
    taking a params path, and a default of "params.yaml"."""
    planted = tmp_path / "planted.py"
    planted.write_text('from ptg.config import load_group\nfrom ptg.guidance.preferences import load\n'
                       'def f(x, params: str | Path = "params.yaml"):\n    return load_group("model", params)\n'
                       'def g(ctx):\n    return config.load(ctx.path), load(ctx.params.preferences)\n')
    assert params_reads(planted, "planted.py") == [
        "f: params: str | Path", "f: 'params.yaml'", "f: load_group('model', params)", "g: config.load(ctx.path)"]
    assert params_reads(planted, "ops/workspace.py") == []  # an entry point may


def test_params_load_every_group_once_into_one_frozen_object(tmp_path):
    """``config.load`` checks every group up front (a bad group fails at a stage's start, naming file, group, key and
    value, whichever group the stage uses), fills the preferences' prompt template and the round budgets."""
    values = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    params = config.load(ROOT / "configs" / "quick.yaml")
    assert params.preferences.prompt_template == values["data"]["prompt_template"]
    assert params.last_round == len(values["rounds"]) and params.budget("train_lm", 1) == params.train_lm
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1  # type: ignore[misc]
    values["evaluate"]["batch_size"] = 0
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(config.ParamsError, match="p.yaml: evaluate: batch_size must be >= 1; got 0"):
        config.load(tmp_path / "p.yaml")
