"""How the copy task scores a sample: its similarity to the input (``difflib``'s ratio of matching characters, 1 =
an exact copy), for rank@r, the sequence-level credit of the policy-gradient terms and checkpoint selection."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from ptg import pipeline
from ptg.config import Params, SamplingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.config import TrainConfig
    from ptg.lm.train import SampleScorer, Validator


def similarity(text: str, target: str) -> float:
    return difflib.SequenceMatcher(None, text, target).ratio()


def needs_torch_to_rank(params: Params) -> bool:
    return False


def score_samples(samples: pd.DataFrame, ctx: pipeline.Context) -> tuple[list[float], dict[str, Any]]:
    """Every sample's similarity to its input."""
    target = pipeline.read_examples("train", "validation").set_index("id")["target"]
    return [similarity(t, target[i]) for t, i in zip(samples["text"], samples["id"], strict=True)], {}


def sample_scorer(tokenizer: PreTrainedTokenizerBase, ctx: pipeline.Context) -> SampleScorer:
    """Each sampled response's similarity to its input (the first reference)."""

    def score(references: Sequence[Sequence[str]], samples: list[list[list[int]]]) -> list[list[float]]:
        return [[similarity(tokenizer.decode(s, skip_special_tokens=True).strip(), refs[0]) for s in group]
                for refs, group in zip(references, samples, strict=True)]

    return score


def validation_scorer(tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, ctx: pipeline.Context) -> Validator:
    """The mean similarity of greedy outputs on the first ``cfg.eval_items`` validation inputs (``val_score``)."""
    mp, ep = ctx.params.model, ctx.params.evaluate
    val = pipeline.read_examples("validation").head(cfg.eval_items)
    greedy = SamplingConfig(num_samples=1, max_new_tokens=ep.max_new_tokens, temperature=0.0)

    def validate(model: PreTrainedModel) -> dict[str, float]:
        table, _ = pipeline.sample_table(model, tokenizer, val, mp, greedy, ep.batch_size, ctx, generator=None)
        scores = [similarity(t, x) for t, x in zip(table["text"], val["target"], strict=True)]
        return {"val_score": sum(scores) / len(scores)}

    return validate


def scorer_summary(score: SampleScorer | None) -> dict[str, Any]:
    return {}
