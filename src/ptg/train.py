"""One LM training loop for the two objectives of PTG (spec §3):

- ``wmle``: guidance-weighted MLE on reference responses (the supervised objective);
- ``reinforce``: REINFORCE on the LM's own samples with the guidance's token rewards plus an entropy bonus (the
  objective for tasks without references). Samples are drawn with the sampling settings and scored under the
  same (temperature / top-k / top-p filtered) distribution, so the update is on-policy (spec pitfall 7.7).

Without a guidance every token weighs the same: that is the baseline PTG is compared against, identical to PTG in
everything else (examples, their order, optimizer, normalisation), so a difference between the two is the
guidance's doing. The guidance is frozen throughout. AdamW, gradient accumulation, clipping, bf16 autocast where it
pays, a progress bar, and one metrics row per optimizer update returned to the caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ptg import distributed, losses
from ptg.config import TrainConfig
from ptg.guidance import Guidance
from ptg.models import Batch, collate, response_logits
from ptg.precision import autocast
from ptg.sampling import SamplingConfig, filter_logits, sample

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Example:
    """One training input: prompt token ids and, for wmle/mle, the reference response's token ids."""

    prompt: list[int]
    response: list[int] = field(default_factory=list)


BUCKET_BATCHES = 8  # micro-batches per length bucket


def _micro_batches(lengths: Sequence[int], size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless seeded epochs of index lists, length-bucketed: each epoch's random order is cut into windows of
    ``BUCKET_BATCHES`` micro-batches, each window sorted by length and cut into micro-batches, and the epoch's
    micro-batches shuffled again, so a micro-batch holds examples of similar length (little padding) while every
    example is still seen once per epoch in a seeded random order."""
    n = len(lengths)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        window = size * BUCKET_BATCHES
        batches = []
        for w in range(0, n, window):
            ranked = sorted(order[w:w + window], key=lambda i: lengths[i])
            batches += [ranked[i:i + size] for i in range(0, len(ranked), size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[b]


def _loss(model: PreTrainedModel, batch: Batch, cfg: TrainConfig, guidance: Guidance | None,
          sampling: SamplingConfig | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, count, sums) of one micro-batch shard: the objective is ``loss * count / sum over ranks of count``
    (in one process, ``loss`` itself); ``sums``: the detached per-token sums the metrics row reports."""
    mask = batch.response_mask
    logits = response_logits(model, batch)
    if cfg.objective == "reinforce":
        # Score the samples under the distribution they were drawn from (temperature, top-k, top-p).
        assert sampling is not None
        logits = filter_logits(logits.flatten(0, 1), sampling).view(logits.shape)
    nll = losses.token_nll(logits, batch.response_ids, mask)
    if guidance is None:
        rewards = mask.float()
    else:
        with torch.no_grad():
            rewards = guidance(batch)
    sums = {"tokens": mask.sum().float(), "nll": (nll.detach() * mask).sum(), "reward": (rewards * mask).sum()}
    if cfg.objective == "wmle":
        total, count = losses.weighted_mle_parts(nll, rewards, mask, cfg.use_q, cfg.exp_rewards, cfg.normalize)
        return total / count, count, sums
    neg_ent = losses.neg_entropy(logits.float(), mask)
    sums["entropy"] = -neg_ent.detach() * sums["tokens"]
    return losses.reinforce_loss(nll, rewards, mask, cfg.use_q) + cfg.entropy_coeff * neg_ent, sums["tokens"], sums


def _micro_batch(model: PreTrainedModel, chunk: list[Example], cfg: TrainConfig, guidance: Guidance | None,
                 sampling: SamplingConfig | None, eos_ids: Sequence[int], pad_id: int, device: torch.device,
                 dtype: torch.dtype, sample_gen: torch.Generator) -> dict[str, float]:
    """Forward and backward of this rank's ``chunk`` of one micro-batch, its loss scaled to its share of the
    whole micro-batch's loss (the counts are summed over ranks first); returns the micro-batch's metrics (loss,
    per-token nll / reward / entropy means, tokens), summed over ranks. A rank with no example (a micro-batch
    smaller than the world) still joins the reductions and adds nothing."""
    rank_sums = {k: torch.zeros((), device=device) for k in ("count", "loss", "tokens", "nll", "reward", "entropy")}
    loss = None
    if chunk:
        prompts = [e.prompt for e in chunk]
        if cfg.objective == "reinforce":
            assert sampling is not None
            drawn = sample(model, prompts, sampling, eos_ids, pad_id, device, dtype, batch_size=len(prompts),
                           generator=sample_gen, progress=False)
            responses = [s[0] for s in drawn]
            model.train()
        else:
            responses = [e.response for e in chunk]
        batch = collate(prompts, responses, pad_id).to(device)
        with autocast(device, dtype):
            loss, count, sums = _loss(model, batch, cfg, guidance, sampling)
        rank_sums |= {k: v.detach().float() for k, v in sums.items()} | {"count": count.detach().float(),
                                                                          "loss": loss.detach().float() * count}
    keys = list(rank_sums)
    total = distributed.all_reduce_sum(torch.stack([rank_sums[k] for k in keys]))
    every = dict(zip(keys, total.tolist(), strict=True))
    if loss is not None:
        # This rank's share: loss * count / total count (exactly the loss in one process: count / count = 1).
        (loss * (rank_sums["count"] / total[keys.index("count")]) / cfg.grad_accum).backward()
    tokens = every["tokens"]
    out = {"loss": every["loss"] / every["count"], "tokens": tokens, "nll": every["nll"] / tokens,
           "reward": every["reward"] / tokens}
    if cfg.objective == "reinforce":
        out["entropy"] = every["entropy"] / tokens
    return out


def make_optimizer(model: PreTrainedModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices only (as the reference). The fused kernel
    (CPU and CUDA): one pass over each parameter instead of a dozen, 5x faster than the default on a CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr,
                             fused=True)


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """The optimizer's state as safetensors (tensors keyed "<param index>.<name>", param groups as metadata)."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": torch.as_tensor(v).contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(sd["param_groups"])})


def load_optimizer(opt: torch.optim.Optimizer, path: Path, lr: float) -> None:
    """Restore what ``save_optimizer`` wrote into ``opt`` (built for the same model), at learning rate ``lr``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = f.get_tensor(key)
    opt.load_state_dict({"state": state, "param_groups": groups})
    for group in opt.param_groups:
        group["lr"] = lr


def train_lm(model: PreTrainedModel, examples: Sequence[Example], cfg: TrainConfig, pad_id: int,
             device: torch.device, dtype: torch.dtype = torch.float32, guidance: Guidance | None = None,
             sampling: SamplingConfig | None = None, eos_ids: Sequence[int] = (),
             progress: bool = True, optimizer: torch.optim.Optimizer | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place for ``cfg.max_updates`` optimizer updates; returns one metrics row per update.

    Without ``guidance`` every token weighs the same (the baseline). ``reinforce`` needs ``sampling`` (K = 1
    sample per prompt, drawn in eval mode and scored under the same filtered distribution) and ``eos_ids``.
    ``optimizer`` (from ``make_optimizer``, possibly with a carried state) defaults to a fresh one. The order of
    examples depends on ``cfg.seed`` alone, never on the model or the guidance, so two calls with the same seed
    see the same examples in the same order.
    """
    if not examples:
        raise ValueError("examples is empty")
    if cfg.objective == "reinforce" and (sampling is None or not eos_ids):
        raise ValueError("objective 'reinforce' needs sampling settings and eos_ids")
    if cfg.objective == "reinforce" and sampling is not None and sampling.temperature <= 0:
        raise ValueError("objective 'reinforce' needs a sampling temperature > 0 (greedy decoding has no gradient)")
    if cfg.objective == "wmle" and any(not e.response for e in examples):
        raise ValueError(f"objective {cfg.objective!r} needs a reference response for every example")
    rank = distributed.rank_and_world()[0]
    order_gen = torch.Generator().manual_seed(cfg.seed)  # the same micro-batches on every rank
    sample_gen = torch.Generator().manual_seed(cfg.seed + 1 + 1_000_003 * rank)  # each rank samples its own share
    model.to(device).train()
    if guidance is not None:
        guidance.to(device).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer if optimizer is not None else make_optimizer(model, cfg)
    batches = _micro_batches([len(e.prompt) + len(e.response) for e in examples], cfg.batch_size, order_gen)
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.max_updates + 1), desc=f"train_lm[{cfg.objective}]", disable=not progress, leave=False)
    for update in bar:
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            chunk = distributed.shard([examples[i] for i in next(batches)])
            parts = _micro_batch(model, chunk, cfg, guidance, sampling, eos_ids, pad_id, device, dtype, sample_gen)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + (v if k == "tokens" else v / cfg.grad_accum)
        distributed.sync_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        row = {"update": float(update), **sums, "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    model.eval()
    return history
