"""A toy task, and the example to start a new task from: the LM learns to copy its input.

The examples are generated (no data to fetch; ``data.source`` is not read): short sequences of words, the input
and its one reference the same text, prompted by ``data.prompt_template`` (e.g. ``"Copy: {input}"``). A sample is
ranked by its similarity to the input (``difflib``'s ratio, 1 = an exact copy); the LM trains by guidance-weighted
MLE on the references and is evaluated as summarisation is (ROUGE / METEOR of greedy predictions).

What a task is made of, module by module (``ptg.tasks`` states each module's functions): this ``__init__`` (what
the others share, and ``check``), ``info`` (facts: the main metric, the report's columns, the baseline), ``data``
(the examples, the inputs), ``scoring`` (how a sample is scored) and ``evaluation``. Nothing outside this folder
names the task: ``task.name: copy`` finds it, and dvc.yaml's ``src/ptg/tasks/${task.name}/...`` deps track it.
"""

from __future__ import annotations

from ptg.config import TaskParams


def check(task: TaskParams) -> None:
    """Nothing beyond the params' own checks."""
