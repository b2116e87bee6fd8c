"""The summarisation task's data: the examples ``prepare`` builds from ``data.source`` (``ptg.corpus``); the inputs
``sample@r`` continues, those ``fit_guidance@r`` encodes and what ``train_lm@r`` trains on are those of every task
with references (``ptg.pipeline``: a fresh seeded draw of training inputs each round, a fixed head of the validation
split; the training split's prompts and references)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ptg import corpus, schemas
from ptg.config import Params
from ptg.pipeline import encode_inputs, inputs_of, round_inputs, stops, training_inputs

__all__ = ["build_examples", "encode_inputs", "init_policy", "inputs_of", "round_inputs", "stops",
           "training_inputs"]


def build_examples(params: Params) -> tuple[dict[str, pd.DataFrame], Any, dict[str, Any]]:
    """(frames per split, their schema, the source info for prepare.json)."""
    cfg = params.data
    frames = corpus.build_examples(cfg)
    return frames, schemas.Examples, corpus.source_info(cfg, frames)


def init_policy(params: Params, lm_dir: Path, seed: int) -> None:
    """Nothing: the policy is the base LM."""
