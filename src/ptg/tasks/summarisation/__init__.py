"""Summarisation, the pipeline's default task: references exist; samples are continuations of the examples'
prompts, ranked by ``rank.metric`` against the references (or human scores, or a reward model); LMs train by
guidance-weighted MLE on the references (``train_lm.objective: wmle``) and are evaluated by ROUGE / METEOR of greedy
predictions on the test split. The examples come from ``data.source`` (``ptg.corpus``: the built-in docstring corpus,
a local folder or a hub dataset).
"""

from __future__ import annotations

from ptg.config import TaskParams


def check(task: TaskParams) -> None:
    """Nothing beyond the params' own checks."""
