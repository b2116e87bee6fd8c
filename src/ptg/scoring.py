"""How a sample is scored, for both tasks (``ptg.tasks`` says which): rank@r's sequence-level preference, the
sequence-level credit of the policy-gradient terms (``train_lm.pg_credit: sequence``), and what checkpoint selection
maximises on the validation split.

- summarisation: ``rank.metric`` against the references (or human scores, or a reward model); greedy ROUGE-L;
- prompt: the frozen classifier's mean gap reward on the training or validation texts (``ptg.prompt_task``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ptg import pipeline, prompt_data, prompt_task, schemas
from ptg.config import ParamsError, RankParams, SamplingConfig, load_group
from ptg.io import read_table
from ptg.tasks import is_prompt, task_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.train import Example, SampleScorer


def score_samples(samples: pd.DataFrame, ctx: pipeline.Context) -> tuple[list[float], dict[str, Any]]:
    """Every sample's sequence-level preference (rank@r) and what the summary adds: the prompt task's mean gap
    reward on its group's texts (train texts for training groups, validation texts for held-out ones) with the
    classifier calls spent; else ``rank.metric`` against the references, human scores or a reward model."""
    rp: RankParams = load_group("rank", ctx.params)
    if is_prompt(ctx.params):
        task = task_of(ctx.params)
        clf = prompt_task.load_task_classifier(task, ctx)
        scores = pd.Series(0.0, index=samples.index)
        split = samples["id"].map(prompt_data.split_of_group)
        extra: dict[str, Any] = {"metric": "classifier gap reward"}
        for name in ("train", "validation"):
            rows, before = samples[split == name], clf.scored
            if not rows.empty:
                scores[rows.index] = prompt_task.score_prompts(clf, rows["text"].tolist(),
                                                               prompt_data.read_labelled(name), task).reward
            extra[f"classifier_pairs_{name}"] = clf.scored - before
        return scores.tolist(), extra | {"classifier_pairs": clf.scored}
    if rp.metric == "file":
        from ptg.ranking import human_scores

        return human_scores(samples, read_table(Path(rp.scores_file), schemas.HumanScores), rp.scores_file), {}
    if rp.metric == "reward_model":
        return _reward_model_scores(rp, samples, ctx), {}
    from ptg import metrics

    refs = pipeline.read_examples("train", "validation").set_index("id")["references"]
    return metrics.score(rp.metric, samples["text"].tolist(), [list(refs[i]) for i in samples["id"]]), {}


def _reward_model_scores(rp: RankParams, samples: pd.DataFrame, ctx: pipeline.Context) -> list[float]:
    """metric reward_model: each sample's text scored by the reward model, after its prompt unless reward_input is
    response."""
    from ptg.reward_model import load_reward_model, reward_scores  # torch and transformers: only this metric

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


def needs_torch_to_rank(params: str | Path) -> bool:
    return is_prompt(params) or load_group("rank", params).metric == "reward_model"


def sample_scorer(tokenizer: PreTrainedTokenizerBase, ctx: pipeline.Context) -> SampleScorer:
    """Sequence-level scores of sampled token ids (the credit of ``pg_credit: sequence``): the rank stage's
    preference, so it is the same preference the guidance was fitted to. Prompt task: the mean gap reward on the
    training texts, the calls counted in ``scorer.calls``."""
    from ptg import metrics

    if is_prompt(ctx.params):
        task = task_of(ctx.params)
        return prompt_task.PromptScorer(prompt_task.load_task_classifier(task, ctx), tokenizer,
                                        prompt_data.read_labelled("train"), task)
    metric = load_group("rank", ctx.params).metric
    if metric not in metrics.METRICS:  # the reference metrics: not human scores or a reward model
        raise ValueError(f"train_lm.pg_credit: sequence scores samples with rank.metric against the references; "
                         f"rank.metric {metric!r} is not one of {', '.join(metrics.METRICS)}")

    def score(examples: Sequence[Example], samples: list[list[list[int]]]) -> list[list[float]]:
        texts = [tokenizer.decode(s, skip_special_tokens=True).strip() for group in samples for s in group]
        refs = [list(e.references) for e, group in zip(examples, samples, strict=True) for _ in group]
        flat = metrics.score(metric, texts, refs)
        k = len(samples[0])
        return [flat[i:i + k] for i in range(0, len(flat), k)]

    return score


def validation_scorer(tokenizer: PreTrainedTokenizerBase, items: int, ctx: pipeline.Context
                      ) -> Callable[[PreTrainedModel], float]:
    """What checkpoint selection maximises, never on the test split: ROUGE-L (x100) of greedy predictions
    decoded as the evaluate stage decodes (``evaluate.max_new_tokens``, batches of ``evaluate.batch_size``: in bf16
    the batch's shape moves the last bits of the logits, and greedy decoding of 64 validation inputs in batches of
    16 and 64 gave different text for 24 of them) on the first ``items`` validation inputs; prompt task: the greedy
    prompt's gap reward on the validation texts."""
    from ptg import metrics

    sp = load_group("sample", ctx.params)
    if is_prompt(ctx.params):
        task = task_of(ctx.params)
        clf = prompt_task.load_task_classifier(task, ctx)
        dev = prompt_data.read_labelled("validation")
        greedy_prompt = SamplingConfig(1, sp.max_new_tokens, 0.0)

        def validate_prompt(model: PreTrainedModel) -> float:
            from ptg.sampling import sample

            ids = sample(model, [prompt_data.start_ids(tokenizer)], greedy_prompt, (), tokenizer.pad_token_id,
                         ctx.device, ctx.dtype, progress=False)[0]
            return prompt_task.score_prompts(clf, prompt_task.prompt_texts(tokenizer, ids), dev, task).reward[0]

        return validate_prompt
    mp, ep = load_group("model", ctx.params), load_group("evaluate", ctx.params)
    val = pipeline.read_examples("validation").head(items)
    refs = [list(r) for r in val["references"]]
    greedy = SamplingConfig(num_samples=1, max_new_tokens=ep.max_new_tokens, temperature=0.0)

    def validate(model: PreTrainedModel) -> float:
        table, _ = pipeline.sample_table(model, tokenizer, val, mp, greedy, ep.batch_size, ctx, generator=None)
        return 100.0 * sum(metrics.score("rouge", table["text"].tolist(), refs)) / len(refs)

    return validate
