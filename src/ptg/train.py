"""One LM training loop for the three objectives PTG compares (spec §3):

- ``wmle``: guidance-weighted MLE on reference responses, w_t = r_t / sum_t' r_t' (the supervised objective);
- ``reinforce``: REINFORCE on the LM's own samples with the guidance's token rewards plus an entropy bonus (the
  objective for tasks without references);
- ``mle``: plain token-mean MLE on the references (the baseline every result is compared against).

The guidance is frozen throughout. AdamW, gradient accumulation, clipping, bf16 autocast where it pays, a
progress bar, and one metrics row per optimizer update returned to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ptg import losses
from ptg.guidance import Guidance
from ptg.models import Batch, collate, response_logits
from ptg.precision import autocast
from ptg.sampling import SamplingConfig, sample

log = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("wmle", "reinforce", "mle")


@dataclass(frozen=True)
class TrainConfig:
    objective: str = field(default="wmle", metadata={"help": "wmle, reinforce or mle"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate (constant, as the reference)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer update"})
    max_updates: int = field(default=100, metadata={"help": "optimizer updates"})
    clip_norm: float = field(default=5.0, metadata={"help": "gradient-norm clipping"})
    use_q: bool = field(default=False, metadata={"help": "weight tokens by Q_t = sum_{t'>=t} r_t' instead of r_t"})
    exp_rewards: bool = field(default=False, metadata={"help": "wmle: weight by exp(r_t)"})
    entropy_coeff: float = field(default=0.125, metadata={"help": "reinforce: max-entropy bonus alpha"})
    seed: int = field(default=0, metadata={"help": "seed of data order and REINFORCE sampling"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        for name in ("batch_size", "grad_accum", "max_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1; got {getattr(self, name)}")


@dataclass(frozen=True)
class Example:
    """One training input: prompt token ids and, for wmle/mle, the reference response's token ids."""

    prompt: list[int]
    response: list[int] = field(default_factory=list)


def _micro_batches(n: int, size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless seeded epochs of index lists."""
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, size):
            yield order[i:i + size]


def _loss(model: PreTrainedModel, batch: Batch, cfg: TrainConfig, guidance: Guidance | None) -> tuple[
        torch.Tensor, dict[str, float]]:
    mask = batch.response_mask
    logits = response_logits(model, batch)
    nll = losses.token_nll(logits, batch.response_ids, mask)
    stats: dict[str, float] = {"nll": float((nll.detach() * mask).sum() / mask.sum())}
    if cfg.objective == "mle":
        return (nll * mask).sum() / mask.sum(), stats
    assert guidance is not None
    with torch.no_grad():
        rewards = guidance(batch)
    stats["reward"] = float((rewards * mask).sum() / mask.sum())
    if cfg.objective == "wmle":
        return losses.weighted_mle(nll, rewards, mask, cfg.use_q, cfg.exp_rewards), stats
    neg_ent = losses.neg_entropy(logits.float(), mask)
    stats["entropy"] = -float(neg_ent)
    return losses.reinforce_loss(nll, rewards, mask, cfg.use_q) + cfg.entropy_coeff * neg_ent, stats


def train_lm(model: PreTrainedModel, examples: Sequence[Example], cfg: TrainConfig, pad_id: int,
             device: torch.device, dtype: torch.dtype = torch.float32, guidance: Guidance | None = None,
             sampling: SamplingConfig | None = None, eos_ids: Sequence[int] = (),
             progress: bool = True) -> list[dict[str, float]]:
    """Train ``model`` in place for ``cfg.max_updates`` optimizer updates; returns one metrics row per update.

    ``wmle`` and ``reinforce`` need ``guidance``; ``reinforce`` also needs ``sampling`` (K = 1 sample per
    prompt, drawn in eval mode and scored under the model's unfiltered distribution) and ``eos_ids``.
    """
    if not examples:
        raise ValueError("examples is empty")
    if cfg.objective != "mle" and guidance is None:
        raise ValueError(f"objective {cfg.objective!r} needs a guidance model")
    if cfg.objective == "reinforce" and (sampling is None or not eos_ids):
        raise ValueError("objective 'reinforce' needs sampling settings and eos_ids")
    if cfg.objective != "reinforce" and any(not e.response for e in examples):
        raise ValueError(f"objective {cfg.objective!r} needs a reference response for every example")
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    if guidance is not None:
        guidance.to(device).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)
    batches = _micro_batches(len(examples), cfg.batch_size, gen)
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.max_updates + 1), desc=f"train_lm[{cfg.objective}]", disable=not progress, leave=False)
    for update in bar:
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            chunk = [examples[i] for i in next(batches)]
            prompts = [e.prompt for e in chunk]
            if cfg.objective == "reinforce":
                drawn = sample(model, prompts, sampling, eos_ids, pad_id, device, dtype, batch_size=len(prompts),
                               generator=gen, progress=False)
                responses = [s[0] for s in drawn]
                model.train()
            else:
                responses = [e.response for e in chunk]
            batch = collate(prompts, responses, pad_id).to(device)
            with autocast(device, dtype):
                loss, stats = _loss(model, batch, cfg, guidance)
            (loss / cfg.grad_accum).backward()
            stats["loss"] = loss.item()
            stats["tokens"] = float(batch.response_mask.sum())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + (v if k == "tokens" else v / cfg.grad_accum)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        row = {"update": float(update), **sums, "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    model.eval()
    return history
