"""Training an LM from one folder into another, as `train_lm@r` (with round r's guidance) and the `baseline`
(uniform weights) do: load, encode the training split, weigh the references with the frozen guidance once, train
(``ptg.lm.train.train_lm``), keep the checkpoint that scores best on the validation split (``train_lm.eval_every``),
save atomically, and write the summary JSON and the per-update history CSV the stage logs.

The summary says how far from uniform the round trained: the spread of the guidance's raw rewards and of the
token weights made of them on the training references the run draws (``ptg.guidance.model.spread``: median
within-reference CV, median p90 / p10 ratio, the share of clipped weights).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pandas as pd

from ptg import metrics, tasks
from ptg.config import SamplingConfig, TrainLMParams
from ptg.guidance.model import Guidance, spread
from ptg.io import atomic_path, write_json
from ptg.lm import distributed
from ptg.lm.models import ADAPTER_DIR, add_lora, load_lm, load_tokenizer, save_lm
from ptg.lm.train import (
    Example,
    example_weights,
    load_optimizer,
    make_optimizer,
    save_optimizer,
    schedule,
    train_lm,
)
from ptg.pipeline import Context

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"


def curve_path(metrics_path: Path) -> Path:
    """The per-input learning curve written beside a training summary JSON (``train_lm_curve.csv``): the
    held-out reward of each validation input at each checkpoint (objectives pg and grpo; only its header
    otherwise)."""
    return metrics_path.with_name("train_lm_curve.csv")


def needs_scorer(cfg: TrainLMParams, metric: str) -> bool:
    """Whether training scores its samples: every credit of objectives pg and grpo (the reward is logged even when
    the guidance's rewards are the credit), RLPrompt's sequence-level REINFORCE, and the policy-gradient term beside
    MLE when its credit needs the score or the metric can score samples (the score is then logged)."""
    if cfg.objective in ("pg", "grpo"):
        return True
    if cfg.objective == "reinforce":
        return cfg.pg_credit == "sequence"
    return cfg.pg_coeff > 0 and (cfg.pg_credit != "token" or metric in metrics.METRICS)


def train_and_save(src: Path, dst: Path, cfg: TrainLMParams, guidance: Guidance | None, ctx: Context,
                   metrics_path: Path, history_path: Path) -> None:
    """Load the LM at ``src``, train it on the training split with ``cfg`` (uniform token weights without a
    guidance; fresh LoRA adapters when ``cfg.lora.rank`` > 0), keep its best validation checkpoint when
    ``cfg.eval_every`` > 0, save it to ``dst`` atomically with its tokenizer, its optimizer state when
    ``cfg.carry_optimizer``, and its adapters under ``adapter/`` beside the merged weights with LoRA; write the
    summary JSON (``metrics_path``) and the per-update history CSV (``history_path``), which the stage then logs."""
    model, tok = load_lm(src, ctx.device), load_tokenizer(src)
    lora = cfg.lora
    sharded = distributed.fsdp_requested()  # FSDP: train_lm builds the optimizer; rank 0 saves the gathered state
    for field, value in (("lora.rank", lora.rank), ("carry_optimizer", cfg.carry_optimizer),
                         ("objective", cfg.objective if cfg.objective == "grpo" else None)):  # TRL's own loop
        if sharded and value:
            raise ValueError(f"FSDP: train_lm.{field} {value!r} is not supported with sharded weights; set it "
                             "off, or train with data parallelism (launcher \"accelerate launch --multi_gpu\")")
    if lora.enabled:
        model = add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, cfg.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data, scoring = tasks.data(ctx.params), tasks.scoring(ctx.params)
    examples = [Example(*x) for x in data.training_inputs(tok, model, cfg, ctx.params)]
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
        summary |= {f"reward_{k}": v for k, v in spread(rewards).items()}
        summary |= {f"weight_{k}": v for k, v in spread(weights, bounds).items()}
    sampling = None
    policy_gradient = cfg.objective != "wmle" or cfg.pg_coeff > 0
    if policy_gradient:
        sp = ctx.params.sample
        sampling = SamplingConfig(1, sp.max_new_tokens, sp.temperature, sp.top_k, sp.top_p)
    score = None
    if needs_scorer(cfg, ctx.params.rank.metric):
        score = scoring.sample_scorer(tok, ctx)
    validate = scoring.validation_scorer(tok, cfg, ctx) if cfg.eval_every else None
    opt = None if sharded else make_optimizer(model, cfg)
    carried = cfg.carry_optimizer and (src / OPTIMIZER_FILE).exists()
    if carried:
        assert opt is not None
        load_optimizer(opt, src / OPTIMIZER_FILE, cfg.lr)
    t0 = time.perf_counter()
    if cfg.objective == "grpo":
        from ptg.lm.grpo import train_grpo  # TRL: the bench extra

        assert sampling is not None and score is not None
        history = train_grpo(model, tok, examples, cfg, sampling, score, data.stops(model, tok, ctx.params),
                             ctx.device, validate, ctx.progress, bf16=ctx.precision == "bf16")
    else:
        history = train_lm(model, examples, cfg, tok.pad_token_id, ctx.device, ctx.dtype, guidance, sampling,
                           data.stops(model, tok, ctx.params), ctx.progress, optimizer=opt, score=score,
                           validate=validate)
    seconds = time.perf_counter() - t0
    updates = [h for h in history if h["update"] > 0]
    last = updates[-1]
    tokens = sum(h["tokens"] for h in updates)
    summary = {"objective": cfg.objective, "guided": guidance is not None, "optimizer_carried": carried,
               "lora_rank": lora.rank, "trainable_parameters": trainable,
               "updates": len(updates), "final_loss": last["loss"], "seconds": seconds,
               "seconds_per_update": sum(h["seconds"] for h in updates) / len(updates),
               "tokens_per_second": tokens / seconds, "processes": distributed.rank_and_world()[1], "fsdp": sharded,
               "precision": ctx.precision, **summary}
    if "nll" in last:  # TRL's GRPO logs no NLL
        summary["final_nll"] = last["nll"]
    summary |= scoring.scorer_summary(score)  # e.g. the prompt task's budget: the classifier's calls in training
    if validate is not None:
        scored = [(h["val_score"], int(h["update"])) for h in history if "val_score" in h]
        best_score, best_update = max(scored, key=lambda x: (x[0], -x[1]))
        summary |= {"val_score_start": scored[0][0], "val_score_best": best_score, "best_update": best_update}
    frame = pd.DataFrame(history)
    curve = pd.DataFrame(columns=["update", "id", "reward_greedy", "reward_sampled"])
    per_input = getattr(validate, "items", None)  # a learning curve per validation input (train.Validator)
    if per_input:  # at every checkpoint (in call order)
        checkpoints = [int(h["update"]) for h in history if "val_score" in h]
        curve = pd.concat([items.assign(update=u) for u, items in zip(checkpoints, per_input, strict=True)],
                          ignore_index=True)[list(curve.columns)]
    state = distributed.full_state(model) if sharded else None  # every rank sends its shards to rank 0
    if distributed.is_main():  # every rank holds the same weights (or rank 0 the gathered ones): one writes
        with atomic_path(dst) as tmp:
            if lora.enabled:  # the adapters, and the merged LM that the next stages load
                model.save_pretrained(tmp / ADAPTER_DIR)
                model = model.merge_and_unload()
            save_lm(model, tmp, state)
            tok.save_pretrained(tmp)
            if opt is not None and cfg.carry_optimizer:
                save_optimizer(opt, tmp / OPTIMIZER_FILE)
        write_json(metrics_path, summary)
        with atomic_path(history_path) as tmp:
            frame.to_csv(tmp, index=False)
        with atomic_path(curve_path(metrics_path)) as tmp:
            curve.to_csv(tmp, index=False)
    distributed.barrier()  # the other ranks go on (the baseline's next round) once the LM is saved
