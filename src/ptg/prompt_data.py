"""The prompt task's data and inputs, with no model code (so `prepare` and `sample` depend on nothing heavier):
the few-shot splits ``prepare`` writes (schema ClassificationExamples) and the policy's input groups, one start
token each, that ``sample@r`` draws K prompts for (``ptg.prompt_task`` scores and evaluates them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ptg import fewshot, schemas
from ptg.config import DataConfig
from ptg.data import source_kind
from ptg.io import read_table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ptg.config import TaskParams

WORDNET_SOURCE = "wordnet-topics"
FINE_FOODS_SOURCE = "fine-foods"
PREPARED = Path("data") / "prepared"


def build_examples(cfg: DataConfig, task: TaskParams) -> dict[str, pd.DataFrame]:
    """Train / validation / test frames (id, text, label, split) from ``data.source``: ``wordnet-topics`` (WordNet
    noun glosses by lexicographer file) or ``fine-foods`` (Amazon fine-food reviews, great/other, at most
    ``data.max_input_chars`` characters when that is > 0), ``task.shots`` per class for train and validation drawn
    by ``data.seed``, ``data.max_test`` test texts; or a local folder of train/dev/test files (``data.input_field``
    = text column, ``data.target_field`` = label column), used as given (test capped at ``data.max_test``). Checked
    against ``task.labels``: a label with no verbalizer, an empty text or a split without every label is an
    error."""
    if cfg.source == WORDNET_SOURCE:
        frames = fewshot.few_shot_splits(fewshot.wordnet_topics(classes=task.labels), task.shots, cfg.seed,
                                         cfg.max_test)
    elif cfg.source == FINE_FOODS_SOURCE:
        frames = fewshot.few_shot_splits(fewshot.fine_foods(max_chars=cfg.max_input_chars), task.shots, cfg.seed,
                                         cfg.max_test)
    elif source_kind(cfg.source) == "local":
        frames = fewshot.load_classification_folder(cfg.source, cfg.input_field, cfg.target_field)
        frames = {s: f.assign(split=s) for s, f in frames.items()}
        if cfg.max_test and len(frames["test"]) > cfg.max_test:
            frames["test"] = frames["test"].sample(n=cfg.max_test, random_state=cfg.seed).sort_index()
    else:
        raise ValueError(f"data.source {cfg.source!r}: the prompt task reads {WORDNET_SOURCE!r}, "
                         f"{FINE_FOODS_SOURCE!r} or a local folder of train/dev/test files with {cfg.input_field!r} "
                         f"and {cfg.target_field!r} columns")
    # Rows in a seeded random order: a source sorted by class (WordNet by lexicographer file) must not make the
    # first `evaluate.subset_items` test texts one class.
    frames = {s: f.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)[
        [*fewshot.CLASSIFICATION_COLUMNS, "split"]] for s, f in frames.items()}
    fewshot.check_classification(frames, task.labels, where=f"data.source {cfg.source}")
    return frames


def read_labelled(split: str) -> pd.DataFrame:
    return read_table(PREPARED / f"{split}.parquet", schemas.ClassificationExamples)


def groups(n_train: int, n_validation: int) -> pd.DataFrame:
    """The policy's inputs: ``n_train`` training and ``n_validation`` held-out groups (id, split), one start token
    each (the policy is input-free): a group is K prompts that rank@r orders."""
    ids = [f"train-{i:04d}" for i in range(n_train)] + [f"validation-{i:04d}" for i in range(n_validation)]
    return pd.DataFrame({"id": ids, "split": ["train"] * n_train + ["validation"] * n_validation})


def split_of_group(group_id: str) -> str:
    return group_id.split("-", 1)[0]


def start_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The one token a prompt is sampled after (the reference's ``<|endoftext|>``): BOS, else EOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the policy's tokenizer has neither a BOS nor an EOS token to start a prompt from")
    return [int(start)]
