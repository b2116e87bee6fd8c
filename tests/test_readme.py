"""Every command in README.md's ```bash blocks exists as written and is run somewhere: each ptg command and make
target is checked here (`ptg ... --help` exits 0, the target is in the Makefile), and every command line is mapped to
the test or CI step that runs it. A command added to the README without a place that runs it fails here."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = (REPO / "README.md").read_text()
PTG = str(Path(sys.executable).parent / "ptg")

# README command (by prefix) -> where it runs as written (or why it cannot run here).
EXERCISED = {
    "make setup": "CI: .ci/run runs make test, which runs make setup first",
    "make run": "by hand; its figures and dvc.lock are committed (docs/performance.md)",
    "make test": "CI: .ci/run",
    "python3 -m venv .venv": "the CUDA set-up: by hand on a CUDA machine (no GPU in CI)",
    ".venv/bin/pip install uv": "the CUDA set-up: by hand on a CUDA machine (make setup runs the same)",
    ".venv/bin/uv pip install": "the CUDA set-up: by hand on a CUDA machine (scripts/install.sh runs the CPU one)",
    "ptg init": "tests/test_install.py (a project made by ptg init), tests/test_recipes.py (make_workspace)",
    "ptg run": "tests/test_install.py (ptg run prepare in a ptg init project), tests/test_cli.py",
    "dvc exp run": "tests/test_install.py (dvc exp run --temp in a ptg init project), tests/test_bench.py",
    "dvc metrics show": "tests/test_pipeline.py (dvc metrics of the quick pipeline)",
    "ptg report": "tests/test_cli.py::test_report_prints_the_table_of_a_finished_run",
}


def bash_lines() -> list[str]:
    """The command lines of README.md's ```bash blocks, comments and `cd` steps stripped, `&&` split."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                part = part.strip()
                if part and not part.startswith("cd "):
                    out.append(part)
    return out


def test_every_readme_command_is_run_somewhere():
    missing = [line for line in bash_lines() if not any(line.startswith(p) for p in EXERCISED)]
    assert not missing, f"README commands with no place that runs them (add to EXERCISED): {missing}"


@pytest.mark.parametrize("target", sorted({m for line in bash_lines() for m in re.findall(r"^make ([\w-]+)", line)}))
def test_readme_make_targets_exist(target):
    assert re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), re.M), target


def test_every_ptg_command_the_readme_names_exists():
    """`ptg X [Y]` anywhere in the README (code blocks and tables): `ptg X [Y] --help` exits 0."""
    named = set(re.findall(r"`ptg ([a-z-]+(?: (?:fetch|materialize|tiny|fit|eval|score|export|import))?)", README))
    named |= {m for line in bash_lines() for m in re.findall(r"^ptg ([a-z-]+)", line)}
    assert {"init", "run", "quick", "report"} <= named
    for command in sorted(named):
        done = subprocess.run([PTG, *command.split(), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"ptg {command} --help: {done.stderr[-2000:]}"


def test_files_the_readme_names_exist():
    named = re.findall(r"\b((?:configs|docs|flows|scripts|tests)/[\w./-]+\.(?:yaml|md|py|sh))", README)
    for path in sorted(set(named)):
        assert (REPO / path).is_file(), path


def test_the_readme_is_a_guide_not_a_notebook():
    assert len(README.splitlines()) <= 400
    assert not re.search(r"pitfall|spec §|§\d|issue #\d|previous session", README, re.I)


def test_docs_cite_no_spec_that_is_not_in_the_repository():
    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text()
        assert not re.search(r"pitfall \d|spec §|§\s?\d|issue #\d|previous session", text, re.I), page.name
        for link in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", text):
            assert (page.parent / link).is_file(), f"{page.name} links to {link}"
