"""ptg.ops.workspace.workspace_lock: one run per workspace, a second one fails at once naming the holder, and a
holder killed with SIGKILL frees the workspace."""

import os
import signal

import pytest
from conftest import hold_workspace

from ptg.ops.workspace import LOCK_FILE, WorkspaceBusy, workspace_lock


def test_a_second_run_fails_fast_naming_the_holder_and_kill_9_frees_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    holder = hold_workspace(ws)
    try:
        with pytest.raises(WorkspaceBusy, match=rf"another run holds this workspace \(pid {holder.pid} since"), \
                workspace_lock(ws):
            pass
        # It failed while the holder still held the lock (for 120 s): it never waited for it. No wall-clock bound,
        # which a loaded machine could break.
        assert holder.poll() is None
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with workspace_lock(ws) as locked:  # the kernel released the dead holder's lock
        assert locked == ws.resolve() and (ws / LOCK_FILE).is_file()


def test_the_lock_is_reentrant_across_sequential_runs(tmp_path):
    for _ in range(2):
        with workspace_lock(tmp_path / "ws"):
            pass


def test_a_project_gets_the_packaged_pipeline_and_the_checkout_itself_is_refused(tmp_path):
    from conftest import REPO

    from ptg.ops.workspace import PACKAGE, make_workspace

    ws = make_workspace(None, tmp_path / "p")
    assert (ws / "dvc.yaml").read_bytes() == (REPO / "dvc.yaml").read_bytes() and not (ws / "stages").is_symlink()
    assert (ws / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
    assert (ws / "src" / "ptg").resolve() == PACKAGE and (ws / ".dvc").is_dir()
    (ws / "params.yaml").write_text("seed: 1\n")
    make_workspace(None, ws)  # a refresh keeps the project's own params
    assert (ws / "params.yaml").read_text() == "seed: 1\n"
    before = sorted(p.name for p in (REPO / "stages").iterdir())
    with pytest.raises(ValueError, match="is the checkout ptg runs from"):
        make_workspace(None, REPO)
    assert sorted(p.name for p in (REPO / "stages").iterdir()) == before



def test_ptg_init_commits_the_pipeline_and_never_the_users_own_changes(tmp_path):
    import subprocess

    from ptg.ops.workspace import make_workspace

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, text=True).stdout

    ws = make_workspace(None, tmp_path / "p", git=True)
    assert len(git("log", "--oneline").splitlines()) == 1 and git("status", "--short") == ""
    assert "src/ptg" in git("ls-files")  # the code link travels with `dvc exp run --temp` copies
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text() + "# mine\n")
    (ws / "notes.txt").write_text("mine\n")
    git("add", "notes.txt")
    make_workspace(None, ws, git=True)  # a refresh with nothing new from ptg: no commit, the edits stay the user's
    assert len(git("log", "--oneline").splitlines()) == 1
    assert sorted(git("status", "--short").splitlines()) == [" M params.yaml", "A  notes.txt"]
