"""dvc.yaml declares what each stage depends on: every ptg module the stage script imports (transitively), derived
here from the imports themselves, so an edit to the decoder re-runs every stage whose outputs it can change."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from ptg.config import task_names
from ptg.tasks import CONCERNS

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


def module_path(module: str) -> Path | None:
    """The file of ptg module ``module`` (a module or a package's ``__init__.py``), None if it is no ptg module."""
    base = ROOT / "src" / module.replace(".", "/")
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _ptg_imports(path: Path, parents: bool = True) -> set[str]:
    """The ptg modules ``path`` runs on import: each imported module (``from ptg.x import y`` imports ``ptg.x.y``
    when that is a module) and, with ``parents``, the packages above it (their ``__init__`` runs first; ``ptg``
    itself left out)."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ptg":
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names
                                   if module_path(f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ptg"}
    above = {".".join(m.split(".")[:i]) for m in out for i in range(2, m.count(".") + 1)} if parents else set()
    return {m for m in out | above if m != "ptg"}


def import_closure(script: Path) -> set[str]:
    """Every ptg module ``script`` imports, directly or through other ptg modules (function-level imports too)."""
    seen: set[str] = set()
    todo = list(_ptg_imports(script))
    while todo:
        mod = todo.pop()
        if mod in seen or any(mod == m or mod.startswith(f"{m}.") for m in NOT_A_DEP):
            continue
        seen.add(mod)
        path = module_path(mod)
        if path:
            todo += _ptg_imports(path)
    return {m for m in seen if module_path(m)}


def task_concerns(path: Path) -> set[str]:
    """The task modules ``path`` asks ``ptg.tasks`` for: ``tasks.data(params)`` -> "data"."""
    calls = {node.func.attr for node in _runtime_nodes(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "tasks"}
    return calls & set(CONCERNS)


def stage_modules(script: Path, task: str) -> set[str]:
    """The ptg modules a stage runs with ``task.name: task``: its import closure, and the closure of each module of
    the task's folder it asks ``ptg.tasks`` for."""
    closure = import_closure(script)
    concerns = set().union(*(task_concerns(module_path(m)) for m in closure), task_concerns(script))
    if concerns:  # the task's package runs first (and ``tasks._module`` calls its check)
        package = f"ptg.tasks.{task}"
        closure |= {package} | import_closure(module_path(package))
    for concern in concerns:
        module = f"ptg.tasks.{task}.{concern}"
        closure |= {module} | import_closure(module_path(module))
    return closure


def dep_path(module: str, task: str) -> str:
    """A module as dvc.yaml names it: its file, a module of the task's folder templated by ``${task.name}``."""
    path = module_path(module).relative_to(ROOT).as_posix()
    return path.replace(f"src/ptg/tasks/{task}/", "src/ptg/tasks/${task.name}/")


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_are_exactly_the_imported_modules(name):
    """No module missing (an edit would not rerun the stage) and none extra (an edit would rerun it for nothing),
    for every task: the task's own modules are named by ``${task.name}``, so a task's folder is a dependency only
    of its own pipeline (the generic modules a task imports are listed for every task)."""
    spec = _stages()[name]
    script = re.match(r"(?:python|\$\{launcher\}) (stages/\S+\.py)", spec["cmd"]).group(1)
    deps = set(spec["deps"])
    assert script in deps and script == f"stages/{name}.py"
    needed = {task: {dep_path(m, task) for m in stage_modules(ROOT / script, task)} for task in task_names()}
    assert all(needed.values()), f"{script} imports no ptg module?"
    for task, modules in needed.items():
        missing = sorted(modules - deps)
        assert not missing, f"dvc.yaml stage {name}: deps lack {missing} (imported by {script}, task {task})"
    extra = sorted(d for d in deps - set().union(*needed.values()) - {script} if d.endswith(".py"))
    assert not extra, f"dvc.yaml stage {name}: deps list {extra}, which {script} never imports"


def test_a_task_imports_no_other_task():
    """A task's modules import ptg's generic modules and their own folder's: editing one task's code can rerun
    nothing of another's pipeline."""
    for task in task_names():
        for path in sorted((ROOT / "src" / "ptg" / "tasks" / task).glob("*.py")):
            others = {m for m in import_closure(path) if m.startswith("ptg.tasks.")
                      and not m.startswith(f"ptg.tasks.{task}")}
            assert not others, f"{path.relative_to(ROOT)} imports {sorted(others)}"


def test_every_task_has_every_concern():
    """dvc.yaml names ``src/ptg/tasks/${task.name}/<concern>.py``: a task folder lacking one would fail `dvc repro`
    with a missing dependency."""
    assert {"summarisation", "prompt"} <= set(task_names())
    for task in task_names():
        folder = ROOT / "src" / "ptg" / "tasks" / task
        assert {f"{c}.py" for c in CONCERNS} | {"__init__.py"} <= {p.name for p in folder.glob("*.py")}, task


def test_training_stages_start_with_the_launcher_and_the_others_with_python():
    """`launcher` (params.yaml) starts the stages ptg.lm.distributed trains data-parallel; sampling, ranking and
    evaluation are not data-parallel and always run as one process."""
    for name, spec in _stages().items():
        launcher = "${launcher}" if name in LAUNCHED else "python"
        assert spec["cmd"].startswith(f"{launcher} stages/{name}.py"), (name, spec["cmd"])
        assert "launcher" not in spec["params"], f"{name}: DVC reruns a stage whose cmd changed already"


def test_closure_follows_imports_through_the_library_and_the_task():
    # evaluate.py asks for the task's evaluation, which imports ptg.pipeline.evaluation, which imports
    # ptg.lm.sampling: the decoder is a dependency of evaluate.
    closure = stage_modules(ROOT / "stages" / "evaluate.py", "summarisation")
    assert {"ptg.tasks.summarisation.evaluation", "ptg.pipeline.evaluation", "ptg.lm.sampling", "ptg.lm.models",
            "ptg.lm.precision"} <= closure
    assert "ptg.tracking" not in closure
    assert "ptg.tasks.prompt.scoring" in stage_modules(ROOT / "stages" / "evaluate.py", "prompt")


def test_a_stage_depends_on_no_code_it_does_not_run():
    """Editing the training loop, the classifier or the metrics re-runs no data preparation, sampling or report;
    imports for annotations only (``if TYPE_CHECKING:``) are no dependency."""
    heavy = {"ptg.lm.train", "ptg.guidance.model", "ptg.tasks.prompt.scoring", "ptg.metrics", "ptg.pipeline.evaluation"}
    for task in task_names():
        for stage in ("prepare", "sample", "report"):
            closure = stage_modules(ROOT / "stages" / f"{stage}.py", task)
            assert not heavy & closure, (task, stage, heavy & closure)
        # its SampleScorer and Validator: annotations only
        assert "ptg.lm.train" not in import_closure(ROOT / "src" / "ptg" / "tasks" / task / "scoring.py")


def test_stages_with_per_round_budgets_track_their_round_entry():
    for name, spec in _stages().items():
        if "round_budget" in (ROOT / f"stages/{name}.py").read_text():
            params = spec["params"]
            assert "rounds.${key}" in params or "rounds" in params, f"{name} reads rounds but does not track it"


def test_stages_that_read_a_tokenizer_depend_on_its_folder():
    for name, spec in _stages().items():
        if 'load_tokenizer(pipeline.round_dir(0) / "lm")' in (ROOT / f"stages/{name}.py").read_text():
            assert "data/rounds/0/lm" in spec["deps"], name


def test_no_module_imports_itself_through_others():
    """No import circle among ptg's modules (function-level imports included, TYPE_CHECKING ones not): a circle
    makes each module's DVC deps the other's, and an import order that works by accident."""
    circles = []
    for path in sorted((ROOT / "src" / "ptg").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        # A package running its submodules is no circle: only the imports themselves are edges, not the packages
        # above each imported module.
        seen, todo = set(), [m for m in _ptg_imports(path, parents=False) if m != module]
        while todo:
            mod = todo.pop()
            if mod in seen or not module_path(mod):
                continue
            seen.add(mod)
            todo += _ptg_imports(module_path(mod), parents=False)
        if module in seen:
            circles.append(module)
    assert not circles, f"modules that import themselves through others: {circles}"


@pytest.mark.parametrize("name", ["sample", "rank", "fit_guidance", "train_lm", "evaluate", "baseline"])
def test_editing_the_bootstrap_reruns_no_training_stage(name):
    """The bench's statistics (ptg.stats: bootstraps, CIs) are not a dependency of the stages that sample, rank,
    train or evaluate: editing them reruns none of those (dvc.yaml lists exactly the imported modules)."""
    assert "src/ptg/stats.py" not in _stages()[name]["deps"]
