"""The paper's second task, discrete prompt generation: a policy LM writes a short prompt, a frozen classifier
classifies few-shot texts with it, and the classifier's gap reward (spec §3c) is the sequence-level preference.
What differs from summarisation, concern by concern:

- ``data``: the examples are labelled texts (schema ``ClassificationExamples``): ``task.shots`` per class for train
  and validation, a large test split (WordNet topics, Amazon fine-food reviews or a local folder); the policy's
  inputs are *groups*, one start token each: ``sample@r`` draws K prompts per group;
- ``scoring``: ``rank@r`` scores each prompt by its mean gap reward on the train texts (training groups) or the
  validation texts (held-out groups), and ``fit_guidance@r`` fits the guidance to those lists as in
  summarisation; ``train_lm@r`` is REINFORCE on fresh prompts (``train_lm.objective: reinforce``) with the
  guidance's token rewards (``pg_credit: token``, PTG) or each prompt's gap reward standardised across the step's
  prompts on every token (``pg_credit: sequence``: RLPrompt's credit, what the ``baseline`` stage trains);
- ``evaluation``: ``evaluate@r`` samples ``task.candidates`` prompts and the greedy one from LM_r, chooses on
  validation (gap reward) and reports the test accuracy of the best (and the mean of the top 3, the reference's
  figure), with the classifier calls every stage spent.

This module holds what the concerns share: the groups, the start token, the prepared splits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from ptg import schemas
from ptg.config import TaskParams
from ptg.io import read_table
from ptg.pipeline import PREPARED

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

def check(task: TaskParams) -> None:
    if not task.labels:
        raise ValueError("task.labels: the prompt task needs the class names (at least 2) and task.verbalizers, "
                         "one single-token word per label; got none")


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
