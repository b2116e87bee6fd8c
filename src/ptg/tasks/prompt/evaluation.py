"""How the prompt task evaluates a policy (evaluate@r, the baseline): its candidate prompts chosen on validation by
gap reward, the best's test accuracy and the top 3's mean (the reference's figure), and, once, the baselines that
need no training (best-of-N of the untrained policy, the empty and the manual prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ptg import schemas
from ptg.config import SamplingConfig, TaskParams
from ptg.guidance.model import Guidance, token_rewards
from ptg.io import atomic_path, write_json, write_table
from ptg.lm.models import load_lm, load_tokenizer
from ptg.lm.sampling import sample
from ptg.pipeline import Context, round_dir
from ptg.pipeline.evaluation import save_heatmaps
from ptg.tasks.prompt import read_labelled, start_ids
from ptg.tasks.prompt.scoring import Classifier, load_task_classifier, prompt_texts, score_prompts

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TOP = 3  # the reference reports the mean test accuracy of the top-3 prompts (chosen on validation)


def candidate_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, length: int,
                      top_k: int, ctx: Context, generator: torch.Generator) -> list[list[int]]:
    """The greedy prompt of ``model`` and ``n`` sampled ones (top-k, temperature 1), distinct, greedy first."""
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


def evaluate(lm_dir: Path, guidance: Guidance | None, predictions_path: Path, metrics_path: Path, ctx: Context,
             last_round: bool, seed: int) -> tuple[dict[str, Any], list[Path]]:
    """The policy's candidates chosen on validation, the best's accuracy on ``evaluate.split`` (its first
    ``evaluate.subset_items`` texts unless ``last_round``; ``seed``: the candidates' draw); the last evaluation with
    a guidance (PTG's) also scores the untrained baselines; writes the candidates table (schema PromptCandidates)
    with the guidance's token rewards and their heatmap, the per-text results (evaluate_items.csv beside the
    metrics JSON) and the metrics JSON. Returns the metrics and the files written."""
    task, sp, ep = ctx.params.task, ctx.params.sample, ctx.params.evaluate
    model, tok = load_lm(lm_dir, ctx.device, ctx.dtype), load_tokenizer(lm_dir)
    clf = load_task_classifier(task, ctx)
    settings = (task, ep.split, sp.max_new_tokens, sp.top_k, ctx)
    table, items, summary = evaluate_prompts(model, tok, clf, *settings, torch.Generator().manual_seed(seed),
                                             subset_items=0 if last_round else ep.subset_items)
    if last_round and guidance is not None:  # PTG's last evaluation also scores the untrained baselines, once
        untrained = load_lm(round_dir(0) / "lm", ctx.device, ctx.dtype)
        accuracy, correct = untrained_baselines(untrained, tok, clf, *settings, torch.Generator().manual_seed(seed))
        summary |= accuracy
        items = items.assign(**correct)
    files = [predictions_path]
    if guidance is not None:
        start = start_ids(tok)
        ids = [list(map(int, t)) for t in table["token_ids"]]
        rewards = token_rewards(guidance, [start] * len(ids), ids, tok.pad_token_id, ctx.device, ctx.dtype)
        table["guidance_score"] = [sum(r) for r in rewards]
        shown = table.assign(id=[f"rank {k}" for k in table["rank"]], prediction=table["prompt"]).sort_values("rank")
        order = shown.index.tolist()
        files += save_heatmaps(tok, shown, [ids[i] for i in order], [rewards[i] for i in order],
                               predictions_path.with_name("heatmap"))
    else:
        table["guidance_score"] = float("nan")
    write_table(table, predictions_path, schemas.PromptCandidates)
    with atomic_path(metrics_path.with_name("evaluate_items.csv")) as tmp:
        items.to_csv(tmp, index=False)
    write_json(metrics_path, summary | {"precision": ctx.precision})
    return summary, files
