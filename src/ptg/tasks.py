"""Which task the pipeline runs (params ``task.name``), and what differs between the two in preparing data and
choosing inputs: what is prepared, what is sampled from what, what the baseline trains. How a sample is scored is
``ptg.scoring``'s, how an LM is evaluated ``ptg.evaluation``'s, what an LM trains on ``ptg.train_stage``'s; each
dispatches on the task in one place, so the stage scripts never branch on it, and each stage depends only on the
modules it runs (``tests/test_dvc_deps.py``).

- ``summarisation`` (default): references exist; samples are continuations of the examples' prompts, scored by
  ``rank.metric``; LMs train by guidance-weighted MLE on the references (``train_lm.objective: wmle``) and are
  evaluated by ROUGE / METEOR of greedy predictions (``ptg.evaluation``).
- ``prompt``: no references; samples are ``sample.max_new_tokens``-token prompts of an input-free policy, scored by
  a frozen classifier's gap reward on few-shot texts; LMs train by REINFORCE on their own prompts (objective
  ``reinforce``) and are evaluated by the test accuracy of the prompt chosen on validation (``ptg.prompt_task``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ptg import pipeline, prompt_data, schemas
from ptg.config import TaskParams, TrainLMParams, load_group

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAIN_METRIC = {"summarisation": "rougeL", "prompt": "accuracy"}  # what the registry's "best" alias maximises


def task_of(params: str | Path) -> TaskParams:
    return load_group("task", params)


def is_prompt(params: str | Path) -> bool:
    return task_of(params).name == "prompt"


# ---------------------------------------------------------------------------------------------------------------
# prepare, base_model
# ---------------------------------------------------------------------------------------------------------------


def build_examples(params: str | Path) -> tuple[dict[str, pd.DataFrame], Any, dict[str, Any]]:
    """(frames per split, their schema, the source info for prepare.json)."""
    from ptg.data import build_examples as build_summaries
    from ptg.data import source_info

    cfg, task = load_group("data", params), task_of(params)
    if task.name == "prompt":
        frames = prompt_data.build_examples(cfg, task)
        info = {"source": cfg.source, "rows": {s: len(f) for s, f in frames.items()},
                "labels": {s: f["label"].value_counts().sort_index().to_dict() for s, f in frames.items()}}
        return frames, schemas.ClassificationExamples, info
    frames = build_summaries(cfg)
    return frames, schemas.Examples, source_info(cfg, frames)


def init_policy(params: str | Path, lm_dir: Path, seed: int) -> None:
    """The prompt task's round-0 policy with ``task.head_hidden`` > 0: a fresh MLP head beside the frozen LM
    (``models.PROMPT_HEAD_FILE``); nothing otherwise."""
    task = task_of(params)
    if task.name != "prompt" or not task.head_hidden:
        return
    from ptg.models import add_prompt_head, load_lm, prompt_head, save_prompt_head

    model = add_prompt_head(load_lm(lm_dir), task.head_hidden, seed)
    head = prompt_head(model)
    assert head is not None
    save_prompt_head(head, lm_dir)


# ---------------------------------------------------------------------------------------------------------------
# sample, fit_guidance: the inputs the policy samples from
# ---------------------------------------------------------------------------------------------------------------


def round_inputs(ctx: pipeline.Context, r: int) -> pd.DataFrame:
    """The inputs sample@r samples K continuations of (columns id and split at least): ``sample.train_inputs``
    training inputs (a fresh seeded draw each round) and the first ``sample.validation_inputs`` validation ones;
    the prompt task's are groups (``prompt_data.groups``)."""
    sp = load_group("sample", ctx.params)
    if is_prompt(ctx.params):
        return prompt_data.groups(sp.train_inputs, sp.validation_inputs)
    train, val = pipeline.read_examples("train"), pipeline.read_examples("validation")
    train = train.sample(n=min(sp.train_inputs, len(train)), random_state=ctx.seed("sample", r))
    return pd.concat([train, val.head(sp.validation_inputs)], ignore_index=True)


def inputs_of(ids: Sequence[str], params: str | Path) -> pd.DataFrame:
    """The inputs with these ids (id, split and what ``encode_inputs`` reads), for fit_guidance."""
    if is_prompt(params):
        return pd.DataFrame({"id": sorted(set(ids))}).assign(split=lambda f: f["id"].map(prompt_data.split_of_group))
    examples = pipeline.read_examples("train", "validation")
    return examples[examples["id"].isin(set(ids))]


def encode_inputs(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                  params: str | Path) -> list[list[int]]:
    """Input token ids of ``frame``'s rows: the encoded prompts, or the prompt policy's start token."""
    if is_prompt(params):
        return [prompt_data.start_ids(tokenizer)] * len(frame)
    return pipeline.encode_prompts_of(tokenizer, model, frame, load_group("model", params))


def stops(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: str | Path) -> list[int]:
    """The ids that end a sample: the EOS ids; none for the prompt task (every prompt has the same length)."""
    from ptg.encoding import eos_ids

    return [] if is_prompt(params) else eos_ids(model, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# baseline, evaluate
# ---------------------------------------------------------------------------------------------------------------


def baseline_config(cfg: TrainLMParams, params: str | Path) -> TrainLMParams:
    """The baseline's training: the same preference without the guidance. Policy-gradient objectives (pg, grpo),
    either task: ``pg`` with sequence-level credit (RLOO), everything else as PTG's. Otherwise, summarisation:
    uniform MLE (no guidance weights, no policy-gradient term); prompt task: REINFORCE with sequence-level credit
    (RLPrompt's), everything else as PTG's; with ``task.baseline_budget: calls``, only as many updates as the
    training texts' classifier calls of PTG's rank@r pay for (each of its ``sample.train_inputs`` x K prompts scored
    once, where the baseline scores ``batch_size`` prompts an update)."""
    if cfg.objective in ("pg", "grpo"):
        return dataclasses.replace(cfg, objective="pg", pg_credit="sequence")
    if not is_prompt(params):
        return dataclasses.replace(cfg, contrast=None, pg_coeff=0.0)
    cfg = dataclasses.replace(cfg, pg_credit="sequence")
    if task_of(params).baseline_budget == "calls":
        sp = load_group("sample", params)
        cfg = dataclasses.replace(cfg, max_updates=max(1, sp.train_inputs * sp.num_samples // cfg.batch_size))
    return cfg


def main_metric(params: str | Path) -> str:
    return MAIN_METRIC[task_of(params).name]
