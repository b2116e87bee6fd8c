"""The paper's second task: a policy LM writes a short discrete prompt, a frozen classifier classifies few-shot
texts with it, and the classifier's gap reward (spec §3c) is the sequence-level preference. This module scores and
evaluates prompts; ``ptg.prompt_data`` holds the task's data and inputs.

The pipeline's stages run it unchanged (``ptg.tasks``, ``ptg.scoring`` and ``ptg.evaluation`` dispatch on
``task.name``). What differs from summarisation:

- the examples are labelled texts (schema ``ClassificationExamples``): ``shots`` per class for train and
  validation, a large test split (``ptg.fewshot``, ``ptg.prompt_data``);
- the policy's inputs are *groups*, one start token each: ``sample@r`` draws K prompts per group, ``rank@r``
  scores each by its mean gap reward on the train texts (training groups) or the validation texts (held-out
  groups), and ``fit_guidance@r`` fits the guidance to those lists as in summarisation;
- ``train_lm@r`` is REINFORCE on fresh prompts (``train_lm.objective: reinforce``) with the guidance's token
  rewards (``pg_credit: token``, PTG) or each prompt's gap reward standardised across the step's prompts on every
  token (``pg_credit: sequence``: RLPrompt's credit, what the ``baseline`` stage trains);
- ``evaluate@r`` samples ``task.candidates`` prompts and the greedy one from LM_r, chooses on validation (gap
  reward) and reports the test accuracy of the best (and the mean of the top 3, the reference's figure), with the
  classifier calls every stage spent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ptg.prompt_data import read_labelled, start_ids

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.classifier import Classifier
    from ptg.config import TaskParams
    from ptg.pipeline import Context

log = logging.getLogger(__name__)

TOP = 3  # the reference reports the mean test accuracy of the top-3 prompts (chosen on validation)


# ---------------------------------------------------------------------------------------------------------------
# The classifier's reward
# ---------------------------------------------------------------------------------------------------------------


def load_task_classifier(task: TaskParams, ctx: Context) -> Classifier:
    """The frozen classifier: ``task.classifier``, or the materialised policy (data/rounds/0/lm) when null. It is
    the task's measure (its rewards rank prompts, its accuracy is the result), so it computes in fp32 whatever
    ``precision`` the learner uses: in bf16 SmolLM2's verbalizer probabilities moved by up to 0.12."""
    import torch

    from ptg.classifier import load_classifier

    path = task.classifier or str(Path("data") / "rounds" / "0" / "lm")
    return load_classifier(path, None, template=task.template, verbalizers=task.verbalizers, device=ctx.device,
                           dtype=torch.float32, kind=task.classifier_kind)


def label_ids(frame: pd.DataFrame, task: TaskParams) -> torch.Tensor:
    import torch

    index = {name: i for i, name in enumerate(task.labels)}
    return torch.tensor([index[label] for label in frame["label"]])


@dataclass(frozen=True)
class PromptScores:
    reward: list[float]  # mean gap reward per prompt
    accuracy: list[float]  # share of texts classified right per prompt
    correct: Any  # (P, N) bool tensor


def score_prompts(clf: Classifier, prompts: Sequence[str], frame: pd.DataFrame, task: TaskParams,
                  calibrate: bool | None = None) -> PromptScores:
    """Each prompt's gap reward and accuracy on the texts of ``frame`` (spec §3c)."""
    from ptg.classifier import gap_rewards

    probs = clf.probs(frame["text"].tolist(), list(prompts), batch_size=task.batch_size,
                      calibrate=task.calibrate if calibrate is None else calibrate)
    labels = label_ids(frame, task)
    reward, accuracy = gap_rewards(probs, labels, task.correct_coeff, task.incorrect_coeff)
    correct = probs.argmax(-1) == labels[None, :]
    return PromptScores(reward.tolist(), accuracy.tolist(), correct)


def prompt_texts(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[Sequence[int]]) -> list[str]:
    """Prompts as the classifier reads them: decoded without special tokens, stripped."""
    return [tokenizer.decode(list(ids), skip_special_tokens=True).strip() for ids in token_ids]


@dataclass(frozen=True)
class PromptScorer:
    """A ``train.SampleScorer``: each sampled prompt's mean gap reward on ``frame``'s texts; ``classifier.scored``
    counts the (prompt, text) pairs it spent."""

    classifier: Classifier
    tokenizer: PreTrainedTokenizerBase
    frame: pd.DataFrame
    task: TaskParams

    def __call__(self, references: Sequence[Sequence[str]], samples: list[list[list[int]]]) -> list[list[float]]:
        texts = prompt_texts(self.tokenizer, [s for group in samples for s in group])
        flat = score_prompts(self.classifier, texts, self.frame, self.task).reward
        k = len(samples[0])
        return [flat[i:i + k] for i in range(0, len(flat), k)]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def candidate_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, length: int,
                      top_k: int, ctx: Context, generator: torch.Generator) -> list[list[int]]:
    """The greedy prompt of ``model`` and ``n`` sampled ones (top-k, temperature 1), distinct, greedy first."""
    from ptg.config import SamplingConfig
    from ptg.sampling import sample

    start = [start_ids(tokenizer)]
    greedy = sample(model, start, SamplingConfig(1, length, 0.0), (), tokenizer.pad_token_id, ctx.device,
                    ctx.dtype, progress=False)[0]
    drawn = sample(model, start, SamplingConfig(n, length, 1.0, top_k), (), tokenizer.pad_token_id, ctx.device,
                   ctx.dtype, generator=generator, progress=False)[0]
    out: list[list[int]] = []
    for ids in greedy + drawn:
        if ids not in out:
            out.append(ids)
    return out


def evaluate_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, clf: Classifier,
                     task: TaskParams, split: str, length: int, top_k: int, ctx: Context,
                     generator: torch.Generator, subset_items: int = 0
                     ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Candidates from ``model``, chosen on validation by gap reward; the top 3 scored on ``split`` (its first
    ``subset_items`` texts; 0 = all). Returns the candidate table (schema PromptCandidates), the per-text results
    of the best prompt (id, label, correct) and the summary: accuracy (best), accuracy_top3, its validation
    figures, the majority-class rate, and the classifier pairs the evaluation scored."""
    dev, test = read_labelled("validation"), read_labelled(split)
    if subset_items:
        test = test.head(subset_items)
    ids = candidate_prompts(model, tokenizer, task.candidates, length, top_k, ctx, generator)
    texts = prompt_texts(tokenizer, ids)
    calls0 = clf.scored
    on_dev = score_prompts(clf, texts, dev, task)
    order = sorted(range(len(texts)), key=lambda i: (-on_dev.reward[i], i))
    top = order[:TOP]
    on_test = score_prompts(clf, [texts[i] for i in top], test, task)
    test_acc = dict(zip(top, on_test.accuracy, strict=True))
    table = pd.DataFrame({
        "prompt": texts, "token_ids": ids, "greedy": [i == 0 for i in range(len(texts))],
        "validation_reward": on_dev.reward, "validation_accuracy": on_dev.accuracy,
        "rank": [order.index(i) + 1 for i in range(len(texts))],
        "accuracy": [test_acc.get(i, float("nan")) for i in range(len(texts))]})
    items = pd.DataFrame({"id": test["id"], "label": test["label"], "correct": on_test.correct[0].numpy()})
    best = top[0]
    summary: dict[str, Any] = {
        "accuracy": on_test.accuracy[0], f"accuracy_top{TOP}": sum(on_test.accuracy) / len(top),
        "prompt": texts[best], "validation_reward": on_dev.reward[best],
        "validation_accuracy": on_dev.accuracy[best], "candidates": len(texts),
        "majority_rate": float(test["label"].value_counts(normalize=True).iloc[0]),
        "classifier_pairs": clf.scored - calls0, "items": len(test), "split": split}
    return table, items, summary


def untrained_baselines(untrained: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, clf: Classifier,
                        task: TaskParams, split: str, length: int, top_k: int, ctx: Context,
                        generator: torch.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """The baselines that need no training, on the whole ``split``: best-of-N (the untrained policy's greedy and
    ``task.candidates`` sampled prompts, chosen on validation, its validation calls its budget), the empty and the
    manual prompt, raw and contextually calibrated. Returns (summary keys, per-text ``<name>_correct`` columns)."""
    _, items, best = evaluate_prompts(untrained, tokenizer, clf, task, split, length, top_k, ctx, generator)
    accuracy = {"best_of_n_accuracy": best["accuracy"], "best_of_n_prompt": best["prompt"],
                "best_of_n_calls": len(read_labelled("validation")) * best["candidates"]}
    correct = {"best_of_n_correct": items["correct"].to_numpy()}
    accuracy_fixed, correct_fixed = fixed_prompts(clf, task, read_labelled(split))
    return accuracy | accuracy_fixed, correct | correct_fixed


def fixed_prompts(clf: Classifier, task: TaskParams, test: pd.DataFrame) -> tuple[dict[str, float], dict[str, Any]]:
    """The empty and the manual prompt's accuracy on ``test``, raw and contextually calibrated (the baselines that
    need no training), and their per-text correctness (``<name>_correct`` columns)."""
    accuracy, correct = {}, {}
    for calibrate in (False, True):
        scores = score_prompts(clf, ["", task.manual_prompt], test, task, calibrate=calibrate)
        tag = "_calibrated" if calibrate else ""
        for i, name in enumerate(("empty", "manual")):
            accuracy[f"{name}_accuracy{tag}"] = scores.accuracy[i]
            correct[f"{name}{tag}_correct"] = scores.correct[i].numpy()
    return accuracy, correct
