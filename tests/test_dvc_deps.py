"""dvc.yaml declares what each stage depends on: every ptg module the stage script imports (transitively), derived
here from the imports themselves, so an edit to the decoder re-runs every stage whose outputs it can change."""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Only records runs to MLflow: outputs never depend on it, so editing it must not re-run the pipeline.
NOT_A_DEP = {"ptg.tracking"}
LAUNCHED = {"fit_guidance", "train_lm", "baseline"}  # `${launcher} stages/<name>.py`: data-parallel under N processes


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations only, never run."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` but those under an ``if TYPE_CHECKING:`` block (function bodies included)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if _is_type_checking(node):
            todo += node.orelse  # type: ignore[attr-defined]
            continue
        todo += list(ast.iter_child_nodes(node))
    return out


def _ptg_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ptg":
            out |= {f"ptg.{a.name}" for a in node.names} if node.module == "ptg" else {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ptg"}
    return out


def import_closure(script: Path) -> set[str]:
    """Every ptg module ``script`` imports, directly or through other ptg modules (function-level imports too)."""
    seen: set[str] = set()
    todo = list(_ptg_imports(script))
    while todo:
        mod = todo.pop()
        if mod in seen or mod in NOT_A_DEP:
            continue
        seen.add(mod)
        path = ROOT / "src" / (mod.replace(".", "/") + ".py")
        if path.exists():
            todo += _ptg_imports(path)
    return {m for m in seen if (ROOT / "src" / (m.replace(".", "/") + ".py")).exists()}


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_are_exactly_the_imported_modules(name):
    """No module missing (an edit would not rerun the stage) and none extra (an edit would rerun it for nothing)."""
    spec = _stages()[name]
    script = re.match(r"(?:python|\$\{launcher\}) (stages/\S+\.py)", spec["cmd"]).group(1)
    deps = set(spec["deps"])
    assert script in deps and script == f"stages/{name}.py"
    needed = {"src/" + m.replace(".", "/") + ".py" for m in import_closure(ROOT / script)}
    assert needed, f"{script} imports no ptg module?"
    missing = sorted(needed - deps)
    assert not missing, f"dvc.yaml stage {name}: deps lack {missing} (imported by {script})"
    extra = sorted(d for d in deps - needed - {script} if d.endswith(".py"))
    assert not extra, f"dvc.yaml stage {name}: deps list {extra}, which {script} never imports"


def test_training_stages_start_with_the_launcher_and_the_others_with_python():
    """`launcher` (params.yaml) starts the stages ptg.distributed trains data-parallel; sampling, ranking and
    evaluation are not data-parallel and always run as one process."""
    for name, spec in _stages().items():
        launcher = "${launcher}" if name in LAUNCHED else "python"
        assert spec["cmd"].startswith(f"{launcher} stages/{name}.py"), (name, spec["cmd"])
        assert "launcher" not in spec["params"], f"{name}: DVC reruns a stage whose cmd changed already"


def test_closure_follows_imports_through_the_library():
    # evaluate.py imports ptg.evaluation, which imports ptg.sampling: the decoder is a dependency of evaluate.
    closure = import_closure(ROOT / "stages" / "evaluate.py")
    assert {"ptg.evaluation", "ptg.sampling", "ptg.models", "ptg.precision"} <= closure
    assert "ptg.tracking" not in closure


def test_a_stage_depends_on_no_code_it_does_not_run():
    """Editing the training loop, the classifier or the metrics re-runs no data preparation, sampling or report;
    imports for annotations only (``if TYPE_CHECKING:``) are no dependency."""
    for stage in ("prepare", "sample", "report"):
        closure = import_closure(ROOT / "stages" / f"{stage}.py")
        assert not {"ptg.train", "ptg.guidance", "ptg.classifier", "ptg.metrics", "ptg.evaluation"} & closure, stage
    assert "ptg.train" not in import_closure(ROOT / "src" / "ptg" / "scoring.py")  # its Example: annotations only


def test_stages_with_per_round_budgets_track_their_round_entry():
    for name, spec in _stages().items():
        if "round_budget" in (ROOT / f"stages/{name}.py").read_text():
            params = spec["params"]
            assert "rounds.${key}" in params or "rounds" in params, f"{name} reads rounds but does not track it"


def test_stages_that_read_a_tokenizer_depend_on_its_folder():
    for name, spec in _stages().items():
        if 'load_tokenizer(pipeline.round_dir(0) / "lm")' in (ROOT / f"stages/{name}.py").read_text():
            assert "data/rounds/0/lm" in spec["deps"], name


def _module_path(module: str) -> Path:
    return ROOT / "src" / (module.replace(".", "/") + ".py")


def test_no_module_imports_itself_through_others():
    """No import circle among ptg's modules (function-level imports included, TYPE_CHECKING ones not): a circle
    makes each module's DVC deps the other's, and an import order that works by accident."""
    circles = []
    for path in sorted((ROOT / "src" / "ptg").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        seen, todo = set(), [m for m in _ptg_imports(path) if m != module]
        while todo:
            mod = todo.pop()
            if mod in seen or not _module_path(mod).exists():
                continue
            seen.add(mod)
            todo += _ptg_imports(_module_path(mod))
        if module in seen:
            circles.append(module)
    assert not circles, f"modules that import themselves through others: {circles}"


@pytest.mark.parametrize("name", ["sample", "rank", "fit_guidance", "train_lm", "evaluate", "baseline"])
def test_editing_the_bootstrap_reruns_no_training_stage(name):
    """The bench's statistics (ptg.stats: bootstraps, CIs) are not a dependency of the stages that sample, rank,
    train or evaluate: editing them reruns none of those (dvc.yaml lists exactly the imported modules)."""
    assert "src/ptg/stats.py" not in _stages()[name]["deps"]
