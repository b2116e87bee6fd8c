"""Training an LM from one folder into another, as `train_lm@r` (with round r's guidance) and the `baseline`
(uniform weights) do: load, encode the training split, weigh the references with the frozen guidance once, train
(``ptg.train.train_lm``), keep the checkpoint that scores best on the validation split (``train_lm.eval_every``),
save atomically, and write the summary JSON and the per-update history CSV the stage logs.

The summary says how far from uniform the round trained: the spread of the guidance's raw rewards and of the
token weights made of them on the training references the run draws (``ptg.stats.spread``: median
within-reference CV, median p90 / p10 ratio, the share of clipped weights).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptg import distributed, metrics, stats
from ptg.config import EvaluateParams, ModelParams, RankParams, SamplingConfig, TrainLMParams, load_group
from ptg.guidance import Guidance
from ptg.io import atomic_path, write_json
from ptg.models import ADAPTER_DIR, add_lora, eos_ids, load_lm, load_tokenizer
from ptg.pipeline import Context, encode_prompts_of, encode_targets_of, read_examples, sample_table
from ptg.train import (
    Example,
    SampleScorer,
    example_weights,
    load_optimizer,
    make_optimizer,
    save_optimizer,
    schedule,
    train_lm,
)

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"


def sample_scorer(tokenizer: PreTrainedTokenizerBase, metric: str) -> SampleScorer:
    """Scores of sampled token ids against their example's references by ``metric`` (the rank stage's preference,
    so the sequence-level credit is the same preference the guidance was fitted to)."""
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


def validation_scorer(tokenizer: PreTrainedTokenizerBase, items: int, ctx: Context
                      ) -> Callable[[PreTrainedModel], float]:
    """ROUGE-L (x100) of greedy predictions (``evaluate.max_new_tokens``, as the evaluation decodes; batches of
    ``sample.batch_size``, so that evaluate's batch size, which changes no result, reruns no training) on the first
    ``items`` validation inputs: what checkpoint selection maximises, never the test split."""
    mp: ModelParams = load_group("model", ctx.params)
    ep: EvaluateParams = load_group("evaluate", ctx.params)
    batch_size = load_group("sample", ctx.params).batch_size
    val = read_examples("validation").head(items)
    refs = [list(r) for r in val["references"]]
    greedy = SamplingConfig(num_samples=1, max_new_tokens=ep.max_new_tokens, temperature=0.0)

    def validate(model: PreTrainedModel) -> float:
        table, _ = sample_table(model, tokenizer, val, mp, greedy, batch_size, ctx, generator=None)
        return 100.0 * sum(metrics.score("rouge", table["text"].tolist(), refs)) / len(refs)

    return validate


def train_and_save(src: Path, dst: Path, cfg: TrainLMParams, guidance: Guidance | None, ctx: Context,
                   metrics_path: Path, history_path: Path) -> None:
    """Load the LM at ``src``, train it on the training split with ``cfg`` (uniform token weights without a
    guidance; fresh LoRA adapters when ``cfg.lora.rank`` > 0), keep its best validation checkpoint when
    ``cfg.eval_every`` > 0, save it to ``dst`` atomically with its tokenizer, its optimizer state when
    ``cfg.carry_optimizer``, and its adapters under ``adapter/`` beside the merged weights with LoRA; write the
    summary JSON (``metrics_path``) and the per-update history CSV (``history_path``), which the stage then logs."""
    mp: ModelParams = load_group("model", ctx.params)
    model, tok = load_lm(src, ctx.device), load_tokenizer(src)
    lora = cfg.lora
    if lora.enabled:
        model = add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, cfg.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train = read_examples("train")
    prompts = encode_prompts_of(tok, model, train, mp)
    targets = encode_targets_of(tok, model, train, mp)
    examples = [Example(p, t, tuple(refs)) for p, t, refs in zip(prompts, targets, train["references"], strict=True)]
    summary: dict[str, float | int | str | bool] = {}
    if guidance is not None and cfg.objective == "wmle":
        # The references this run trains on, scored once (the guidance is frozen): no guidance forward in training.
        used = sorted({i for chunk in schedule(examples, cfg) for i in chunk})
        t0 = time.perf_counter()
        rewards, weights = example_weights(guidance, [examples[i] for i in used], cfg, tok.pad_token_id,
                                           ctx.device, ctx.dtype, ctx.progress)
        summary["guidance_seconds"] = time.perf_counter() - t0
        for i, w in zip(used, weights, strict=True):
            examples[i] = dataclasses.replace(examples[i], weights=tuple(w))
        bounds = None if cfg.contrast is None else (cfg.weight_min, cfg.weight_max)
        summary |= {f"reward_{k}": v for k, v in stats.spread(rewards).items()}
        summary |= {f"weight_{k}": v for k, v in stats.spread(weights, bounds).items()}
    sampling = None
    if cfg.objective == "reinforce" or cfg.pg_coeff > 0:
        sp = load_group("sample", ctx.params)
        sampling = SamplingConfig(1, sp.max_new_tokens, sp.temperature, sp.top_k, sp.top_p)
    score = None
    if cfg.pg_coeff > 0:
        rp: RankParams = load_group("rank", ctx.params)
        if cfg.pg_credit == "sequence" or rp.metric in metrics.METRICS:
            score = sample_scorer(tok, rp.metric)
    validate = validation_scorer(tok, cfg.eval_items, ctx) if cfg.eval_every else None
    opt = make_optimizer(model, cfg)
    carried = cfg.carry_optimizer and (src / OPTIMIZER_FILE).exists()
    if carried:
        load_optimizer(opt, src / OPTIMIZER_FILE, cfg.lr)
    t0 = time.perf_counter()
    history = train_lm(model, examples, cfg, tok.pad_token_id, ctx.device, ctx.dtype, guidance, sampling,
                       eos_ids(model, tok), ctx.progress, optimizer=opt, score=score, validate=validate)
    seconds = time.perf_counter() - t0
    updates = [h for h in history if h["update"] > 0]
    last = updates[-1]
    tokens = sum(h["tokens"] for h in updates)
    summary = {"objective": cfg.objective, "guided": guidance is not None, "optimizer_carried": carried,
               "lora_rank": lora.rank, "trainable_parameters": trainable,
               "updates": len(updates), "final_loss": last["loss"], "final_nll": last["nll"], "seconds": seconds,
               "tokens_per_second": tokens / seconds, "processes": distributed.rank_and_world()[1], **summary}
    if validate is not None:
        scored = [(h["val_score"], int(h["update"])) for h in history if "val_score" in h]
        best_score, best_update = max(scored, key=lambda x: (x[0], -x[1]))
        summary |= {"val_score_start": scored[0][0], "val_score_best": best_score, "best_update": best_update}
    frame = pd.DataFrame(history)
    if distributed.is_main():  # every rank holds the same weights: one writes
        with atomic_path(dst) as tmp:
            if lora.enabled:  # the adapters, and the merged LM that the next stages load
                model.save_pretrained(tmp / ADAPTER_DIR)
                model = model.merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if cfg.carry_optimizer:
                save_optimizer(opt, tmp / OPTIMIZER_FILE)
        write_json(metrics_path, summary)
        with atomic_path(history_path) as tmp:
            frame.to_csv(tmp, index=False)
    distributed.barrier()  # the other ranks go on (the baseline's next round) once the LM is saved
