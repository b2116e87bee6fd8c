"""Tasks: what the pipeline learns (params ``task.name``), one folder each, ``ptg/tasks/<name>/``.

The stages are the same for every task; what differs is asked of the task's folder, which holds the same modules,
one per concern, so that a stage imports (and DVC makes it depend on) only the concerns it runs:

- ``__init__.py``: what the concerns share, and ``check`` (the task's own params checks, run on first use);
- ``info.py`` (evaluate, baseline, report): ``MAIN_METRIC`` (what the registry's "best" alias maximises),
  ``EVAL_KEYS`` and ``report_row`` (the report's columns), ``baseline_config`` (what the baseline trains);
- ``data.py`` (prepare, base_model, sample, fit_guidance, train_lm): ``build_examples``, ``init_policy``,
  ``round_inputs``, ``inputs_of``, ``encode_inputs``, ``stops``, ``training_inputs``;
- ``scoring.py`` (rank, fit_guidance, train_lm, baseline): ``needs_torch_to_rank``, ``score_samples``,
  ``sample_scorer``, ``validation_scorer``, ``scorer_summary``;
- ``evaluation.py`` (evaluate, baseline): ``evaluate``.

The protocols below state each module's functions and types. A stage asks ``info(params)``, ``data(params)``,
``scoring(params)`` or ``evaluation(params)`` for the chosen task's module; dvc.yaml names those modules as
``src/ptg/tasks/${task.name}/<concern>.py`` (and the folder's ``__init__.py``), so editing one task's code reruns
nothing of another task's pipeline (``tests/test_dvc_deps.py`` derives every stage's deps from its imports and these
calls). A task module imports ptg's generic modules, its own folder's, and never another task's.

Tasks: ``summarisation`` (the default: references, weighted MLE, ROUGE / METEOR), ``prompt`` (discrete prompts for
a frozen few-shot classifier, REINFORCE, test accuracy) and ``copy`` (a toy: learn to copy generated word sequences;
the example to start a new task from). A new task is a new folder with these five modules (``task.name`` accepts any
folder of ``ptg/tasks`` that has an ``__init__.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from ptg.config import Params, TaskParams, TrainLMParams, task_names

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.config import TrainConfig
    from ptg.guidance.model import Guidance
    from ptg.lm.train import SampleScorer, Validator
    from ptg.pipeline import Context

CONCERNS = ("info", "data", "scoring", "evaluation")  # the modules of a task folder beside its __init__


class TaskInfo(Protocol):
    MAIN_METRIC: str
    EVAL_KEYS: tuple[str, ...]

    def baseline_config(self, cfg: TrainLMParams, params: Params) -> TrainLMParams: ...

    def report_row(self, ptg: dict[str, Any], mle: dict[str, Any]) -> dict[str, Any]: ...


class TaskData(Protocol):
    def build_examples(self, params: Params) -> tuple[dict[str, pd.DataFrame], Any, dict[str, Any]]: ...

    def init_policy(self, params: Params, lm_dir: Path, seed: int) -> None: ...

    def round_inputs(self, ctx: Context, r: int) -> pd.DataFrame: ...

    def inputs_of(self, ids: Sequence[str], params: Params) -> pd.DataFrame: ...

    def encode_inputs(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                      params: Params) -> list[list[int]]: ...

    def stops(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: Params) -> list[int]: ...

    def training_inputs(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, cfg: TrainLMParams,
                        params: Params) -> list[tuple[list[int], list[int], tuple[str, ...]]]: ...


class TaskScoring(Protocol):
    def needs_torch_to_rank(self, params: Params) -> bool: ...

    def score_samples(self, samples: pd.DataFrame, ctx: Context) -> tuple[list[float], dict[str, Any]]: ...

    def sample_scorer(self, tokenizer: PreTrainedTokenizerBase, ctx: Context) -> SampleScorer: ...

    def validation_scorer(self, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, ctx: Context) -> Validator: ...

    def scorer_summary(self, score: SampleScorer | None) -> dict[str, Any]: ...


class TaskEvaluation(Protocol):
    def evaluate(self, lm_dir: Path, guidance: Guidance | None, predictions_path: Path, metrics_path: Path,
                 ctx: Context, last_round: bool, seed: int) -> tuple[dict[str, Any], list[Path]]: ...


def _module(params: Params, concern: str) -> Any:
    """``ptg.tasks.<task.name>.<concern>``; the task's own params checks (its package's ``check``) run first."""
    task: TaskParams = params.task
    package = importlib.import_module(f"{__name__}.{task.name}")
    package.check(task)
    return importlib.import_module(f"{package.__name__}.{concern}")


def info(params: Params) -> TaskInfo:
    return cast(TaskInfo, _module(params, "info"))


def data(params: Params) -> TaskData:
    return cast(TaskData, _module(params, "data"))


def scoring(params: Params) -> TaskScoring:
    return cast(TaskScoring, _module(params, "scoring"))


def evaluation(params: Params) -> TaskEvaluation:
    return cast(TaskEvaluation, _module(params, "evaluation"))


__all__ = ["CONCERNS", "TaskData", "TaskEvaluation", "TaskInfo", "TaskScoring", "data", "evaluation", "info",
           "scoring", "task_names"]
