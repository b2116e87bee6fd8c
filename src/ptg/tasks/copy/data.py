"""The copy task's data: generated examples (``prepare``); the inputs, their encoding and what train_lm trains on
are those of every task with references (``ptg.pipeline``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ptg import schemas
from ptg.config import DataConfig, Params
from ptg.corpus import EXAMPLE_COLUMNS, format_prompt
from ptg.pipeline import SPLITS, encode_inputs, inputs_of, round_inputs, stops, training_inputs

__all__ = ["build_examples", "encode_inputs", "init_policy", "inputs_of", "round_inputs", "stops",
           "training_inputs"]

WORDS = ("red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "sun", "moon", "star", "up", "down",
         "left", "right")
DEFAULT_ROWS = {"train": 256, "validation": 64, "test": 64}  # a split's rows where data.max_<split> is 0
MIN_WORDS, MAX_WORDS = 3, 6


def texts(n: int, seed: int) -> list[str]:
    """``n`` distinct texts of ``MIN_WORDS``..``MAX_WORDS`` words drawn from ``WORDS`` by ``seed``."""
    rng, out = np.random.default_rng(seed), dict[str, None]()
    while len(out) < n:
        out[" ".join(rng.choice(WORDS, size=int(rng.integers(MIN_WORDS, MAX_WORDS + 1))))] = None
    return list(out)


def examples(cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Train / validation / test frames (schema Examples): disjoint generated texts (``data.seed``), each its own
    target and only reference, ``data.max_<split>`` rows (``DEFAULT_ROWS`` where 0)."""
    sizes = {split: cfg.cap(split) or DEFAULT_ROWS[split] for split in SPLITS}
    drawn = texts(sum(sizes.values()), cfg.seed)
    frames, start = {}, 0
    for split in SPLITS:
        part = drawn[start:start + sizes[split]]
        start += sizes[split]
        frames[split] = pd.DataFrame({
            "id": [f"copy-{split}-{i}" for i in range(len(part))], "split": split, "input": part,
            "prompt": [format_prompt(cfg.prompt_template, x) for x in part], "target": part,
            "references": pd.Series([[x] for x in part], dtype=object)}, columns=list(EXAMPLE_COLUMNS))
    return frames


def build_examples(params: Params) -> tuple[dict[str, pd.DataFrame], Any, dict[str, Any]]:
    """(frames per split, their schema, what prepare.json records)."""
    frames = examples(params.data)
    return frames, schemas.Examples, {"source": "copy: generated", "rows": {s: len(f) for s, f in frames.items()}}


def init_policy(params: Params, lm_dir: Path, seed: int) -> None:
    """Nothing: the policy is the base LM."""
