"""How the summarisation task scores a sample: rank@r's sequence-level preference (``rank.metric`` against the
references, or human scores, or a reward model), the sequence-level credit of the policy-gradient terms
(``train_lm.pg_credit: sequence``: the same preference), and what checkpoint selection maximises on the validation
split (greedy ROUGE-L; the held-out reward's learning curve for objectives pg and grpo).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ptg import pipeline, schemas
from ptg.config import Params, ParamsError, RankParams, SamplingConfig
from ptg.io import read_table

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.config import TrainConfig
    from ptg.lm.train import SampleScorer, Validator


def score_samples(samples: pd.DataFrame, ctx: pipeline.Context) -> tuple[list[float], dict[str, Any]]:
    """Every sample's sequence-level preference (rank@r) and what the summary adds (nothing): ``rank.metric``
    against the references, human scores or a reward model."""
    rp: RankParams = ctx.params.rank
    if rp.metric == "file":
        from ptg.guidance.ranking import human_scores

        return human_scores(samples, read_table(Path(rp.scores_file), schemas.HumanScores), rp.scores_file), {}
    if rp.metric == "reward_model":
        return _reward_model_scores(rp, samples, ctx), {}
    from ptg import metrics

    refs = pipeline.read_examples("train", "validation").set_index("id")["references"]
    return metrics.score(rp.metric, samples["text"].tolist(), [list(refs[i]) for i in samples["id"]]), {}


def _reward_model_scores(rp: RankParams, samples: pd.DataFrame, ctx: pipeline.Context) -> list[float]:
    """metric reward_model: each sample's text scored by the reward model, after its prompt unless reward_input is
    response."""
    from ptg.lm.reward_model import load_reward_model, reward_scores  # torch and transformers: only this metric

    try:
        model, tokenizer = load_reward_model(rp.reward_model, ctx.device)
    except (OSError, ValueError) as e:
        raise ParamsError(f"rank.reward_model: {e}") from e
    prompts = None
    if rp.reward_input == "prompt+response":
        by_id = pipeline.read_examples("train", "validation").set_index("id")["prompt"]
        prompts = [by_id[i] for i in samples["id"]]
    return reward_scores(model, tokenizer, prompts, samples["text"].tolist(), rp.reward_batch_size, rp.reward_label,
                         rp.reward_direction, ctx.device, ctx.dtype, ctx.progress)


def needs_torch_to_rank(params: Params) -> bool:
    return params.rank.metric == "reward_model"


def sample_scorer(tokenizer: PreTrainedTokenizerBase, ctx: pipeline.Context) -> SampleScorer:
    """Sequence-level scores of sampled token ids (the credit of ``pg_credit: sequence``): the rank stage's
    preference, so it is the same preference the guidance was fitted to."""
    from ptg import metrics

    metric = ctx.params.rank.metric
    if metric not in metrics.METRICS:  # the reference metrics: not human scores or a reward model
        raise ValueError(f"train_lm.pg_credit: sequence scores samples with rank.metric against the references; "
                         f"rank.metric {metric!r} is not one of {', '.join(metrics.METRICS)}")

    def score(references: Sequence[Sequence[str]], samples: list[list[list[int]]]) -> list[list[float]]:
        texts = [tokenizer.decode(s, skip_special_tokens=True).strip() for group in samples for s in group]
        refs = [list(r) for r, group in zip(references, samples, strict=True) for _ in group]
        flat = metrics.score(metric, texts, refs)
        k = len(samples[0])
        return [flat[i:i + k] for i in range(0, len(flat), k)]

    return score


def validation_scorer(tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, ctx: pipeline.Context) -> Validator:
    """What checkpoint selection maximises and the learning curve records, never on the test split, on the first
    ``cfg.eval_items`` validation inputs:

    - objectives wmle and reinforce (``val_score``): ROUGE-L (x100) of greedy predictions decoded as the evaluate
      stage decodes (``evaluate.max_new_tokens``, batches of ``evaluate.batch_size``: in bf16 the batch's shape
      moves the last bits of the logits, and greedy decoding of 64 validation inputs in batches of 16 and 64 gave
      different text for 24 of them);
    - objectives pg and grpo, the held-out reward (the training reward: ``rank.metric``) of the greedy outputs
      (``val_reward_greedy``, also ``val_score``) and of ``cfg.eval_samples`` sampled outputs per input with the
      sampling settings (``val_reward_sampled``, from a generator seeded the same at every checkpoint of every
      arm), and the greedy ROUGE-L (``val_rougeL``)."""
    from ptg import metrics

    sp = ctx.params.sample
    curve = cfg.objective in ("pg", "grpo")
    sampled = SamplingConfig(cfg.eval_samples, sp.max_new_tokens, sp.temperature, sp.top_k, sp.top_p)
    mp, ep = ctx.params.model, ctx.params.evaluate
    metric = ctx.params.rank.metric
    if curve and metric not in metrics.METRICS:
        raise ValueError(f"objective {cfg.objective}'s held-out reward is rank.metric against the references; "
                         f"rank.metric {metric!r} is not one of {', '.join(metrics.METRICS)}")
    val = pipeline.read_examples("validation").head(cfg.eval_items)
    refs = [list(r) for r in val["references"]]
    greedy = SamplingConfig(num_samples=1, max_new_tokens=ep.max_new_tokens, temperature=0.0)

    def validate(model: PreTrainedModel) -> dict[str, float]:
        table, _ = pipeline.sample_table(model, tokenizer, val, mp, greedy, ep.batch_size, ctx, generator=None)
        return {"val_score": 100.0 * _mean(metrics.score("rouge", table["text"].tolist(), refs))}

    if not curve:
        return validate
    return HeldOutReward(tokenizer, val, mp, greedy, sampled, ep.batch_size, metric, cfg.seed + 7, ctx)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class HeldOutReward:
    """The learning curve of the summarisation task's policy-gradient objectives (a ``train.Validator``): at each
    call, the held-out reward (``metric`` against the references) of the greedy outputs and of ``sampled``'s
    outputs (a generator seeded ``seed`` at every call, so every checkpoint of every arm draws with the same
    stream) of the ``val`` inputs, and their greedy ROUGE-L; ``items`` keeps each call's per-input rewards (id,
    reward_greedy, reward_sampled: the mean over its samples), the unit of the bench's paired statistics."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, val: pd.DataFrame, mp: Any, greedy: SamplingConfig,
                 sampled: SamplingConfig, batch_size: int, metric: str, seed: int, ctx: pipeline.Context) -> None:
        self.tokenizer, self.val, self.mp, self.ctx = tokenizer, val, mp, ctx
        self.greedy, self.sampled, self.batch_size, self.metric, self.seed = greedy, sampled, batch_size, metric, seed
        self.refs = dict(zip(val["id"], [list(r) for r in val["references"]], strict=True))
        self.items: list[pd.DataFrame] = []

    def _rewards(self, model: PreTrainedModel, how: SamplingConfig, generator: Any) -> tuple[pd.Series, list[str]]:
        from ptg import metrics

        table, _ = pipeline.sample_table(model, self.tokenizer, self.val, self.mp, how, self.batch_size, self.ctx,
                                         generator=generator)
        texts = table["text"].tolist()
        scores = metrics.score(self.metric, texts, [self.refs[i] for i in table["id"]])
        return pd.Series(scores, index=table["id"]).groupby(level=0, sort=False).mean(), texts

    def __call__(self, model: PreTrainedModel) -> dict[str, float]:
        import torch

        from ptg import metrics

        greedy, texts = self._rewards(model, self.greedy, None)
        sampled, _ = self._rewards(model, self.sampled, torch.Generator().manual_seed(self.seed))
        rouge_l = 100.0 * _mean(metrics.score("rouge", texts, [self.refs[i] for i in self.val["id"]]))
        self.items.append(pd.DataFrame({"id": self.val["id"].to_numpy(),
                                        "reward_greedy": greedy.loc[self.val["id"]].to_numpy(),
                                        "reward_sampled": sampled.loc[self.val["id"]].to_numpy()}))
        return {"val_score": float(greedy.mean()), "val_reward_greedy": float(greedy.mean()),
                "val_reward_sampled": float(sampled.mean()), "val_rougeL": rouge_l}


def scorer_summary(score: SampleScorer | None) -> dict[str, Any]:
    """Nothing: a metric costs no budget worth counting."""
    return {}
