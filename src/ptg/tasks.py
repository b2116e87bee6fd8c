"""The one seam between the two tasks (params ``task.name``): what is prepared, what is sampled from what, how a
sample is scored, what an LM trains on and how it is evaluated. The stage scripts call these functions and never
branch on the task themselves.

- ``summarisation`` (default): references exist; samples are continuations of the examples' prompts, scored by
  ``rank.metric``; LMs train by guidance-weighted MLE on the references (``train_lm.objective: wmle``) and are
  evaluated by ROUGE / METEOR of greedy predictions (``ptg.evaluation``).
- ``prompt``: no references; samples are ``sample.max_new_tokens``-token prompts of an input-free policy, scored by
  a frozen classifier's gap reward on few-shot texts; LMs train by REINFORCE on their own prompts (objective
  ``reinforce``) and are evaluated by the test accuracy of the prompt chosen on validation (``ptg.prompt_task``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ptg import pipeline, prompt_task, schemas
from ptg.config import ParamsError, RankParams, SamplingConfig, TaskParams, TrainLMParams, load_group
from ptg.io import atomic_path, read_table, write_json, write_table

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.guidance import Guidance
    from ptg.train import Example, SampleScorer

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
        frames = prompt_task.build_examples(cfg, task)
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
# sample, rank, fit_guidance: the inputs the policy samples from, and how samples are scored
# ---------------------------------------------------------------------------------------------------------------


def round_inputs(ctx: pipeline.Context, r: int) -> pd.DataFrame:
    """The inputs sample@r samples K continuations of (columns id and split at least): ``sample.train_inputs``
    training inputs (a fresh seeded draw each round) and the first ``sample.validation_inputs`` validation ones;
    the prompt task's are groups (``prompt_task.groups``)."""
    sp = load_group("sample", ctx.params)
    if is_prompt(ctx.params):
        return prompt_task.groups(sp.train_inputs, sp.validation_inputs)
    train, val = pipeline.read_examples("train"), pipeline.read_examples("validation")
    train = train.sample(n=min(sp.train_inputs, len(train)), random_state=ctx.seed("sample", r))
    return pd.concat([train, val.head(sp.validation_inputs)], ignore_index=True)


def inputs_of(ids: Sequence[str], params: str | Path) -> pd.DataFrame:
    """The inputs with these ids (id, split and what ``encode_inputs`` reads), for fit_guidance."""
    if is_prompt(params):
        return pd.DataFrame({"id": sorted(set(ids))}).assign(split=lambda f: f["id"].map(prompt_task.split_of_group))
    examples = pipeline.read_examples("train", "validation")
    return examples[examples["id"].isin(set(ids))]


def encode_inputs(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                  params: str | Path) -> list[list[int]]:
    """Input token ids of ``frame``'s rows: the encoded prompts, or the prompt policy's start token."""
    if is_prompt(params):
        return [prompt_task.start_ids(tokenizer)] * len(frame)
    return pipeline.encode_prompts_of(tokenizer, model, frame, load_group("model", params))


def stops(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: str | Path) -> list[int]:
    """The ids that end a sample: the EOS ids; none for the prompt task (every prompt has the same length)."""
    from ptg.models import eos_ids

    return [] if is_prompt(params) else eos_ids(model, tokenizer)


def score_samples(samples: pd.DataFrame, ctx: pipeline.Context) -> tuple[list[float], dict[str, Any]]:
    """Every sample's sequence-level preference (rank@r) and what the summary adds: the prompt task's mean gap
    reward on its group's texts (train texts for training groups, validation texts for held-out ones) with the
    classifier calls spent; else ``rank.metric`` against the references, human scores or a reward model."""
    rp: RankParams = load_group("rank", ctx.params)
    if is_prompt(ctx.params):
        task = task_of(ctx.params)
        clf = prompt_task.load_task_classifier(task, ctx)
        scores = pd.Series(0.0, index=samples.index)
        split = samples["id"].map(prompt_task.split_of_group)
        extra: dict[str, Any] = {"metric": "classifier gap reward"}
        for name in ("train", "validation"):
            rows, before = samples[split == name], clf.scored
            if not rows.empty:
                scores[rows.index] = prompt_task.score_prompts(clf, rows["text"].tolist(),
                                                               prompt_task.read_labelled(name), task).reward
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


# ---------------------------------------------------------------------------------------------------------------
# train_lm, baseline
# ---------------------------------------------------------------------------------------------------------------


def lm_examples(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, cfg: TrainLMParams,
                params: str | Path) -> list[Example]:
    """What train_lm trains on: the training split's prompts and references, or (prompt task) ``batch_size``
    start tokens, each sampled into one prompt per micro-batch."""
    from ptg.train import Example

    if is_prompt(params):
        return [Example(prompt_task.start_ids(tokenizer))] * cfg.batch_size
    mp = load_group("model", params)
    train = pipeline.read_examples("train")
    prompts = pipeline.encode_prompts_of(tokenizer, model, train, mp)
    targets = pipeline.encode_targets_of(tokenizer, model, train, mp)
    return [Example(p, t, tuple(refs)) for p, t, refs in zip(prompts, targets, train["references"], strict=True)]


def sample_scorer(tokenizer: PreTrainedTokenizerBase, ctx: pipeline.Context) -> SampleScorer:
    """Sequence-level scores of sampled token ids (the credit of ``pg_credit: sequence``): the rank stage's
    preference, so it is the same preference the guidance was fitted to. Prompt task: the mean gap reward on the
    training texts, the calls counted in ``scorer.calls``."""
    from ptg import metrics

    if is_prompt(ctx.params):
        task = task_of(ctx.params)
        return prompt_task.PromptScorer(prompt_task.load_task_classifier(task, ctx), tokenizer,
                                        prompt_task.read_labelled("train"), task)
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
    (``evaluate.max_new_tokens``, batches of ``sample.batch_size``, so that evaluate's batch size, which changes no
    result, reruns no training) on the first ``items`` validation inputs; prompt task: the greedy prompt's gap
    reward on the validation texts."""
    from ptg import metrics

    sp = load_group("sample", ctx.params)
    if is_prompt(ctx.params):
        task = task_of(ctx.params)
        clf = prompt_task.load_task_classifier(task, ctx)
        dev = prompt_task.read_labelled("validation")
        greedy_prompt = SamplingConfig(1, sp.max_new_tokens, 0.0)

        def validate_prompt(model: PreTrainedModel) -> float:
            from ptg.sampling import sample

            ids = sample(model, [prompt_task.start_ids(tokenizer)], greedy_prompt, (), tokenizer.pad_token_id,
                         ctx.device, ctx.dtype, progress=False)[0]
            return prompt_task.score_prompts(clf, prompt_task.prompt_texts(tokenizer, ids), dev, task).reward[0]

        return validate_prompt
    mp, ep = load_group("model", ctx.params), load_group("evaluate", ctx.params)
    val = pipeline.read_examples("validation").head(items)
    refs = [list(r) for r in val["references"]]
    greedy = SamplingConfig(num_samples=1, max_new_tokens=ep.max_new_tokens, temperature=0.0)

    def validate(model: PreTrainedModel) -> float:
        table, _ = pipeline.sample_table(model, tokenizer, val, mp, greedy, sp.batch_size, ctx, generator=None)
        return 100.0 * sum(metrics.score("rouge", table["text"].tolist(), refs)) / len(refs)

    return validate


def baseline_config(cfg: TrainLMParams, params: str | Path) -> TrainLMParams:
    """The baseline's training: summarisation, uniform MLE (no guidance weights, no policy-gradient term); prompt
    task, REINFORCE with sequence-level credit (RLPrompt's), everything else as PTG's; with ``task.baseline_budget:
    calls``, only as many updates as the training texts' classifier calls of PTG's rank@r pay for (each of its
    ``sample.train_inputs`` x K prompts scored once, where the baseline scores ``batch_size`` prompts an update)."""
    if not is_prompt(params):
        return dataclasses.replace(cfg, contrast=None, pg_coeff=0.0)
    cfg = dataclasses.replace(cfg, pg_credit="sequence")
    if task_of(params).baseline_budget == "calls":
        sp = load_group("sample", params)
        cfg = dataclasses.replace(cfg, max_updates=max(1, sp.train_inputs * sp.num_samples // cfg.batch_size))
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# evaluate, baseline
# ---------------------------------------------------------------------------------------------------------------


def main_metric(params: str | Path) -> str:
    return MAIN_METRIC[task_of(params).name]


def evaluate_and_save(lm_dir: Path, guidance: Guidance | None, predictions_path: Path, metrics_path: Path,
                      ctx: pipeline.Context, last_round: bool, seed: int) -> tuple[dict[str, Any], list[Path]]:
    """Evaluate the LM at ``lm_dir`` as evaluate@r and the baseline do; write the predictions table, the per-item
    results (evaluate_items.csv beside the metrics JSON), the metrics JSON and, with a guidance, the token-reward
    heatmaps. Returns the metrics and the files written."""
    from ptg import evaluation

    if not is_prompt(ctx.params):
        return evaluation.evaluate_and_save(lm_dir, guidance, predictions_path, metrics_path, ctx, last_round)
    from ptg.guidance import token_rewards
    from ptg.models import load_lm, load_tokenizer

    task, sp, ep = task_of(ctx.params), load_group("sample", ctx.params), load_group("evaluate", ctx.params)
    model, tok = load_lm(lm_dir, ctx.device), load_tokenizer(lm_dir)
    clf = prompt_task.load_task_classifier(task, ctx)
    import torch

    settings = (task, ep.split, sp.max_new_tokens, sp.top_k, ctx)
    table, items, summary = prompt_task.evaluate_prompts(model, tok, clf, *settings,
                                                         torch.Generator().manual_seed(seed),
                                                         subset_items=0 if last_round else ep.subset_items)
    if last_round and guidance is not None:  # PTG's last evaluation also scores the untrained baselines, once
        untrained = load_lm(pipeline.round_dir(0) / "lm", ctx.device)
        accuracy, correct = prompt_task.untrained_baselines(untrained, tok, clf, *settings,
                                                            torch.Generator().manual_seed(seed))
        summary |= accuracy
        items = items.assign(**correct)
    files = [predictions_path]
    if guidance is not None:
        start = prompt_task.start_ids(tok)
        ids = [list(map(int, t)) for t in table["token_ids"]]
        rewards = token_rewards(guidance, [start] * len(ids), ids, tok.pad_token_id, ctx.device, ctx.dtype)
        table["guidance_score"] = [sum(r) for r in rewards]
        shown = table.assign(id=[f"rank {k}" for k in table["rank"]], prediction=table["prompt"]).sort_values("rank")
        order = shown.index.tolist()
        files += evaluation.save_heatmaps(tok, shown, [ids[i] for i in order], [rewards[i] for i in order],
                                          predictions_path.with_name("heatmap"))
    else:
        table["guidance_score"] = float("nan")
    write_table(table, predictions_path, schemas.PromptCandidates)
    with atomic_path(metrics_path.with_name("evaluate_items.csv")) as tmp:
        items.to_csv(tmp, index=False)
    write_json(metrics_path, summary)
    return summary, files
