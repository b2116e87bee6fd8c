"""The prompt task's facts: what the registry's "best" alias maximises, the report's columns and the baseline
(RLPrompt's sequence-level REINFORCE)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ptg.config import Params, TrainLMParams, reference_baseline

MAIN_METRIC = "accuracy"  # what the registry's "best" alias maximises
# The report's columns (evaluation.evaluate_prompts): test accuracy of the prompt chosen on validation, ...
EVAL_KEYS = ("accuracy", "accuracy_top3", "validation_reward", "validation_accuracy")


def report_row(ptg: dict[str, Any], mle: dict[str, Any]) -> dict[str, Any]:
    """What the report shows beside EVAL_KEYS: each arm's chosen prompt."""
    return {"ptg_prompt": ptg["prompt"], "mle_prompt": mle["prompt"]}


def baseline_config(cfg: TrainLMParams, params: Params) -> TrainLMParams:
    """The baseline's training: the same preference without the guidance. Policy-gradient objectives (pg, grpo):
    ``pg`` with sequence-level credit (RLOO), everything else as PTG's; otherwise REINFORCE with sequence-level
    credit (RLPrompt's), everything else as PTG's; with ``task.baseline_budget: calls``, only as many updates as the
    training texts' classifier calls of PTG's rank@r pay for (each of its ``sample.train_inputs`` x K prompts scored
    once, where the baseline scores ``batch_size`` prompts an update)."""
    if cfg.objective in ("pg", "grpo"):
        return reference_baseline(cfg, params)
    cfg = dataclasses.replace(cfg, pg_credit="sequence")
    if params.task.baseline_budget == "calls":
        sp = params.sample
        cfg = dataclasses.replace(cfg, max_updates=max(1, sp.train_inputs * sp.num_samples // cfg.batch_size))
    return cfg
