"""Test-only fault injection (tests/test_crash_resume.py puts this folder on PYTHONPATH): in the one process
whose command line contains ``PTG_PAUSE_STAGE``, the first call of ``PTG_PAUSE_AT`` (``module:function``) pauses:
it writes the process id to ``PTG_PAUSE_FILE`` and sleeps until killed. ``module:function:exit`` wraps a context
manager and pauses when its block has finished, before the manager's own exit (``ptg.io:atomic_path:exit``: the
output written to its temporary path, not yet moved into place). So a test's ``kill -9`` lands at a chosen point of
a stage's own progress, never by a timer. ``module:function:raise`` makes that call fail instead (a stage that
fails for a reason no params check sees, tests/test_flows.py). Every other process (DVC, the other stages) is
untouched."""

import contextlib
import functools
import importlib.abc
import importlib.util
import os
import sys
import time

STAGE, AT, MARKER = (os.environ.get(k) for k in ("PTG_PAUSE_STAGE", "PTG_PAUSE_AT", "PTG_PAUSE_FILE"))


def _pause() -> None:
    with open(MARKER + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(MARKER + ".tmp", MARKER)
    while True:
        time.sleep(60)


def _wrap(module) -> None:
    _, name, *when = AT.split(":")
    original = getattr(module, name)
    if when == ["raise"]:
        @functools.wraps(original)
        def failing(*args, **kwargs):
            raise RuntimeError(f"PTG_PAUSE_AT={AT}: a failure injected by tests/pause_hook")
        setattr(module, name, failing)
    elif when == ["exit"]:
        @contextlib.contextmanager
        def paused_cm(*args, **kwargs):
            with original(*args, **kwargs) as value:
                yield value
                _pause()
        setattr(module, name, paused_cm)
    else:
        @functools.wraps(original)
        def paused(*args, **kwargs):
            _pause()
            return original(*args, **kwargs)
        setattr(module, name, paused)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != AT.split(":", 1)[0]:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap(module)
        loader.exec_module = exec_and_wrap
        return spec


if STAGE and AT and MARKER and STAGE in " ".join(sys.argv):
    sys.meta_path.insert(0, _Finder())
