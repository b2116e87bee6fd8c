"""ptg.workspace.workspace_lock: one run per workspace, a second one fails at once naming the holder, and a
holder killed with SIGKILL frees the workspace."""

import os
import signal
import time

import pytest
from conftest import hold_workspace

from ptg.workspace import LOCK_FILE, WorkspaceBusy, workspace_lock


def test_a_second_run_fails_fast_naming_the_holder_and_kill_9_frees_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    holder = hold_workspace(ws)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkspaceBusy, match=rf"another run holds this workspace \(pid {holder.pid} since"), \
                workspace_lock(ws):
            pass
        assert time.monotonic() - t0 < 2  # fails at once, never waits
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with workspace_lock(ws) as locked:  # the kernel released the dead holder's lock
        assert locked == ws.resolve() and (ws / LOCK_FILE).is_file()


def test_the_lock_is_reentrant_across_sequential_runs(tmp_path):
    for _ in range(2):
        with workspace_lock(tmp_path / "ws"):
            pass
