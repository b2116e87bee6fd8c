"""The token-level guidance r_phi(s_t, a_t) and its listwise fitting to sequence-level preferences.

A ``Guidance`` is any Hugging Face backbone (``AutoModel``: decoder-only or encoder-decoder) plus the
reference's MLP head (d -> 2048 -> 1, ReLU, near-zero init) and a squashing function. It returns one positive
reward per response token, read at the same positions in fitting and in weighting (``ptg.lm.models``).

``fit_guidance`` trains it so that the aggregated token rewards of the K samples of each input reproduce their
preference order under ListMLE (spec §2.4-2.5): Adam, gradient clipping, validation ListMLE and pairwise ranking
accuracy on held-out inputs, plateau LR decay, early stopping, and the best validation checkpoint kept.
Checkpoints are safetensors only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, PreTrainedModel

from ptg import losses
from ptg.config import FitConfig
from ptg.lm import distributed
from ptg.lm.models import Batch, collate, require_safetensors, response_hidden
from ptg.lm.precision import WorkingCopy, autocast

log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"
CONFIG_FILE = "guidance.json"
BACKBONE_DIR = "backbone"


class Guidance(nn.Module):
    """Backbone + MLP head + squash: ``forward(batch) -> (N, T)`` float32 token rewards (0 at padding)."""

    def __init__(self, backbone: PreTrainedModel, head_hidden: int = 2048, squash: str = "soft_clamp",
                 init_gain: float = 1e-4) -> None:
        super().__init__()
        if squash not in losses.SQUASH_MODES:
            raise ValueError(f"squash must be one of {', '.join(losses.SQUASH_MODES)}; got {squash!r}")
        self.backbone = backbone
        self.squash_mode = squash
        # False until a head was fitted (or loaded): the initial head gives every token the same reward, so its
        # state is never a candidate for the best guidance of a round.
        self.fitted = False
        self.head_hidden = head_hidden
        d = backbone.config.hidden_size
        self.head = nn.Sequential(nn.Linear(d, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1))
        # The reference's init (gain 1e-4): every head output starts near -1e-4, so every token starts with the same
        # reward (0.5487 with the soft clamp) and the ranking signal alone shapes it. A larger gain starts the head
        # with per-token differences (random ones: the ranking signal still decides which survive).
        for layer in self.head:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight, gain=init_gain)
                nn.init.constant_(layer.bias, -1e-4)

    def forward(self, batch: Batch) -> torch.Tensor:
        hidden = response_hidden(self.backbone, batch)
        raw = self.head(hidden).squeeze(-1).float()
        return losses.squash(raw, self.squash_mode) * batch.response_mask

    @classmethod
    def from_backbone(cls, path: str | Path, head_hidden: int = 2048, squash: str = "soft_clamp",
                      init_gain: float = 1e-4) -> Guidance:
        require_safetensors(path)
        return cls(AutoModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True), head_hidden, squash,
                   init_gain)


def save_guidance(guidance: Guidance, directory: str | Path) -> None:
    """Write backbone (HF folder, safetensors), head (safetensors) and guidance.json into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    guidance.backbone.save_pretrained(directory / BACKBONE_DIR, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in guidance.head.state_dict().items()}, directory / HEAD_FILE)
    (directory / CONFIG_FILE).write_text(
        json.dumps({"head_hidden": guidance.head_hidden, "squash": guidance.squash_mode}, indent=2) + "\n")


def load_guidance(directory: str | Path, head_hidden: int = 2048, squash: str = "soft_clamp",
                  init_gain: float = 1e-4) -> Guidance:
    """Load what ``save_guidance`` wrote. A folder with only ``backbone/`` (round 0) gets a freshly initialised
    head of ``head_hidden`` units, ``squash`` and ``init_gain``; a saved guidance keeps its own."""
    directory = Path(directory)
    if not (directory / BACKBONE_DIR).is_dir():
        raise FileNotFoundError(f"{directory}: no guidance here (expected {directory / BACKBONE_DIR})")
    cfg_path = directory / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {"head_hidden": head_hidden, "squash": squash}
    guidance = Guidance.from_backbone(directory / BACKBONE_DIR, **cfg, init_gain=init_gain)
    head_path = directory / HEAD_FILE
    if head_path.exists():
        guidance.head.load_state_dict(load_file(head_path))
        guidance.fitted = True
    return guidance


@dataclass(frozen=True)
class RankedGroup:
    """The K sampled responses of one input with their preference scores (higher = better)."""

    prompt: list[int]
    responses: list[list[int]]
    scores: list[float]


@dataclass
class FitResult:
    best_val_loss: float
    best_val_accuracy: float
    best_update: int  # 0 = the warm start was kept (no update improved on it)
    updates: int
    val_pairs: int  # compared pairs behind best_val_accuracy
    history: list[dict[str, float]]

    @property
    def kept_start(self) -> bool:
        return self.best_update == 0


def _group_batches(groups: Sequence[RankedGroup], size: int, pad_id: int,
                   order: list[int] | None = None) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Batches of up to ``size`` groups in ``order``; groups of different K never share a batch (a batch is a
    (B, K) list), so with several K each K fills its own batches in order of first appearance and a batch is
    yielded when it is full (the rest at the end). With one K this is plain chunking of ``order``."""
    order = order if order is not None else list(range(len(groups)))
    pending: dict[int, list[RankedGroup]] = {}

    def make(chunk: list[RankedGroup]) -> tuple[Batch, torch.Tensor]:
        batch = collate([g.prompt for g in chunk], [r for g in chunk for r in g.responses], pad_id)
        return batch, torch.tensor([g.scores for g in chunk], dtype=torch.float32)

    for j in order:
        chunk = pending.setdefault(len(groups[j].responses), [])
        chunk.append(groups[j])
        if len(chunk) == size:
            yield make(chunk)
            chunk.clear()
    for chunk in pending.values():
        if chunk:
            yield make(chunk)


def _check_groups(name: str, groups: Sequence[RankedGroup]) -> None:
    if not groups:
        raise ValueError(f"{name} is empty")
    bad = [i for i, g in enumerate(groups) if len(g.responses) != len(g.scores) or len(g.responses) < 2]
    if bad:
        i = bad[0]
        raise ValueError(f"{name}: every group needs K >= 2 responses with one score each; group {i} has "
                         f"{len(groups[i].responses)} responses and {len(groups[i].scores)} scores "
                         f"({len(bad)} such group(s))")


def pairwise_accuracy(scores: torch.Tensor, preferences: torch.Tensor) -> tuple[float, int]:
    """(agreeing pairs, compared pairs) over all pairs within each row with different preferences. (B, K) each.

    A pair the scores tie counts one half, so a constant guidance (e.g. the initial one) scores 0.5, chance."""
    ds = scores.unsqueeze(-1) - scores.unsqueeze(-2)
    dp = preferences.unsqueeze(-1) - preferences.unsqueeze(-2)
    upper = torch.ones_like(dp, dtype=torch.bool).triu(1)
    compared = (dp != 0) & upper
    agree = ((ds * dp > 0) & compared).sum() + 0.5 * ((ds == 0) & compared).sum()
    return float(agree), int(compared.sum())


def sequence_scores(guidance: Guidance, batch: Batch, cfg: FitConfig) -> torch.Tensor:
    """e_phi of every response: (B, K)."""
    rewards = guidance(batch)
    return losses.aggregate(rewards, batch.response_mask, cfg.agg, batch.group_size, cfg.temperature)


@torch.no_grad()
def group_scores(guidance: Guidance, groups: Sequence[RankedGroup], cfg: FitConfig, pad_id: int,
                 device: torch.device, dtype: torch.dtype) -> list[list[float]]:
    """e_phi of every response of ``groups``, in eval mode: one list of K scores per group, in group order."""
    was_training = guidance.training
    guidance.to(device).eval()
    out: list[list[float]] = []
    order = sorted(range(len(groups)), key=lambda i: len(groups[i].responses))  # equal K side by side
    for batch, _ in _group_batches([groups[i] for i in order], cfg.batch_groups, pad_id):
        with autocast(device, dtype):
            out.extend(sequence_scores(guidance, batch.to(device), cfg).float().cpu().tolist())
    guidance.train(was_training)
    by_group = [[] for _ in groups]
    for i, row in zip(order, out, strict=True):
        by_group[i] = row
    return by_group


@torch.no_grad()
def token_rewards(guidance: Guidance, prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int,
                  device: torch.device, dtype: torch.dtype, batch_size: int = 16,
                  progress: bool = False) -> list[list[float]]:
    """The guidance's reward of every token of each response (one pass, inference mode, in eval mode): responses
    are batched by length, so padding is small, and returned in the order given."""
    was_training = guidance.training
    guidance.to(device).eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out: list[list[float]] = [[] for _ in prompts]
    starts = range(0, len(order), batch_size)
    for i in tqdm(starts, desc="guidance rewards", disable=not progress, leave=False):
        rows = order[i:i + batch_size]
        batch = collate([prompts[j] for j in rows], [responses[j] for j in rows], pad_id).to(device)
        with autocast(device, dtype):
            r = guidance(batch).float().cpu()
        for j, row, n in zip(rows, r, batch.response_mask.sum(-1).tolist(), strict=True):
            out[j] = row[:n].tolist()
    guidance.train(was_training)
    return out


def spread(per_sequence: list[list[float]], clip: tuple[float, float] | None = None) -> dict[str, float]:
    """Spread of token values (guidance rewards or training weights) within each sequence, summarised over sequences.

    ``cv``: the median within-sequence coefficient of variation (std / mean; 0 = uniform); ``p90_p10``: the median
    ratio of a sequence's 90th to its 10th percentile value; ``std``: the std of all values pooled; ``mean``: their
    mean; with ``clip = (lo, hi)``, ``clipped``: the share of values at either bound. Sequences of one value count
    as uniform (cv 0, ratio 1). Raises on an empty input."""
    if not per_sequence or any(len(s) == 0 for s in per_sequence):
        raise ValueError("spread needs at least one sequence and no empty sequence")
    cvs, ratios = [], []
    for seq in per_sequence:
        v = np.asarray(seq, dtype=np.float64)
        mean = v.mean()
        cvs.append(v.std() / mean if mean > 0 else 0.0)
        lo, hi = np.percentile(v, [10, 90])
        ratios.append(hi / lo if lo > 0 else float("inf"))
    pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in per_sequence])
    out = {"cv": float(np.median(cvs)), "p90_p10": float(np.median(ratios)), "std": float(pooled.std()),
           "mean": float(pooled.mean())}
    if clip is not None:
        out["clipped"] = float(np.mean(np.isclose(pooled, clip[0]) | np.isclose(pooled, clip[1])))
    return out


def reward_spread(guidance: Guidance, groups: Sequence[RankedGroup], pad_id: int, device: torch.device,
                  dtype: torch.dtype) -> dict[str, float]:
    """How far from uniform the guidance's token rewards are on ``groups``' responses: the median
    within-sequence coefficient of variation, the median p90 / p10 ratio and the spread (std) of all token rewards
    (``spread``)."""
    prompts = [g.prompt for g in groups for _ in g.responses]
    rewards = token_rewards(guidance, prompts, [r for g in groups for r in g.responses], pad_id, device, dtype)
    return spread(rewards)


def evaluate_guidance(guidance: Guidance, groups: Sequence[RankedGroup], cfg: FitConfig, pad_id: int,
                      device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """ListMLE (mean over groups, tie breaks seeded per K) and pairwise accuracy of ``groups``."""
    scores = group_scores(guidance, groups, cfg, pad_id, device, dtype)
    total, agree, compared = 0.0, 0, 0
    for k in sorted({len(g.scores) for g in groups}):
        idx = [i for i, g in enumerate(groups) if len(g.scores) == k]
        s = torch.tensor([scores[i] for i in idx], dtype=torch.float32)
        prefs = torch.tensor([groups[i].scores for i in idx], dtype=torch.float32)
        total += losses.list_mle(s, prefs, generator=torch.Generator().manual_seed(0)).item() * len(idx)
        a, c = pairwise_accuracy(s, prefs)
        agree, compared = agree + a, compared + c
    return {"loss": total / len(groups), "accuracy": agree / compared if compared else float("nan"),
            "pairs": compared}


def _shard_loss(replica: torch.nn.Module, batch: Batch, prefs: torch.Tensor, cfg: FitConfig, gen: torch.Generator,
                device: torch.device, dtype: torch.dtype) -> float:
    """Forward (through ``replica``, ``distributed.replicate`` of the guidance) and backward of this rank's groups
    of one batch (all of them in one process), the ListMLE scaled to their share of the batch's mean and by the
    world (DDP averages the ranks' gradients); returns the whole batch's loss (summed over ranks). Every rank draws
    the batch's tie-break permutation, so the generator stays in step with one process's."""
    rows = distributed.shard(range(prefs.shape[0]))
    world = distributed.rank_and_world()[1]

    def objective(guidance: Guidance) -> torch.Tensor:
        if not rows:
            losses.tie_break_permutation(prefs.shape[1], gen)  # the draw list_mle makes on the ranks with rows
            return distributed.zero_loss(guidance)
        with autocast(device, dtype):
            scores = sequence_scores(guidance, batch.groups(rows).to(device), cfg).float()
        return losses.list_mle(scores, prefs[rows].to(device), generator=gen) * (len(rows) / prefs.shape[0])

    loss = replica(objective)
    (loss * world).backward()
    return float(distributed.all_reduce_sum(loss.detach().float()))


def fit_guidance(guidance: Guidance, train: Sequence[RankedGroup], val: Sequence[RankedGroup], cfg: FitConfig,
                 pad_id: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 progress: bool = True) -> FitResult:
    """Fit ``guidance`` in place (warm start: its current weights are the starting point); returns the history.

    Each update draws ``batch_groups`` inputs, aggregates their K responses' token rewards with ``cfg.agg`` and
    takes one Adam step on ListMLE. Validation runs every ``eval_every`` updates and at the end; the best
    validation loss's weights are restored at the end (spec pitfall 7.2: the reference summarizer kept the last
    iterate). The starting state competes for "best" only when it was itself fitted (a warm start): an unfitted
    head is the constant guidance, and keeping it would silently turn PTG into plain MLE.
    """
    _check_groups("train", train)
    _check_groups("val", val)
    gen = torch.Generator().manual_seed(cfg.seed)
    guidance.to(device).train()
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    opt = torch.optim.Adam([{"params": list(guidance.backbone.parameters()), "lr": cfg.lr},
                            {"params": list(guidance.head.parameters()), "lr": head_lr}], fused=True)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_decay,
                                                       patience=cfg.lr_patience, min_lr=1e-6)
    work = WorkingCopy(guidance, dtype)  # bf16: forward and backward on a bf16 copy, the update on fp32 weights
    net = work.model
    replica = distributed.replicate(net)  # DDP through accelerate when several processes fit
    start = evaluate_guidance(net, val, cfg, pad_id, device, dtype)
    history: list[dict[str, float]] = [{"update": 0, "val_loss": start["loss"], "val_accuracy": start["accuracy"]}]
    best, best_state, best_update, stale = start, None, -1, 0
    if guidance.fitted:
        best_state, best_update = distributed.snapshot(guidance), 0
    batches: Iterator[tuple[Batch, torch.Tensor]] = iter(())
    update = 0
    bar = tqdm(total=cfg.max_updates, desc="fit_guidance", disable=not progress, leave=False)
    while update < cfg.max_updates:
        try:
            batch, prefs = next(batches)
        except StopIteration:
            order = torch.randperm(len(train), generator=gen).tolist()
            batches = _group_batches(train, cfg.batch_groups, pad_id, order)
            continue
        opt.zero_grad(set_to_none=True)
        loss = _shard_loss(replica, batch, prefs, cfg, gen, device, dtype)
        work.push()
        grad_norm = torch.nn.utils.clip_grad_norm_(guidance.parameters(), cfg.clip_norm)
        opt.step()
        work.pull()
        update += 1
        bar.update(1)
        row = {"update": update, "train_loss": loss, "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"]}
        if update % cfg.eval_every == 0 or update == cfg.max_updates:
            val_metrics = evaluate_guidance(net, val, cfg, pad_id, device, dtype)
            row |= {"val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"]}
            sched.step(val_metrics["loss"])
            bar.set_postfix(val_loss=f"{val_metrics['loss']:.4f}", val_acc=f"{val_metrics['accuracy']:.3f}")
            # Relative threshold as the reference, written so it is also right for a negative best.
            if best_update < 0 or val_metrics["loss"] < best["loss"] - 1e-4 * abs(best["loss"]):
                best, best_update, stale = val_metrics, update, 0
                best_state = distributed.snapshot(guidance)
            else:
                stale += 1
        history.append(row)
        if stale >= cfg.early_stop:
            log.info("fit_guidance: early stop at update %d (best at %d)", update, best_update)
            break
    bar.close()
    assert best_state is not None  # the last update always validates
    distributed.restore(guidance, best_state)
    guidance.fitted = True
    guidance.eval()
    if best_update == 0:
        log.warning("fit_guidance: no update improved the validation ListMLE of the warm start (%.4f); the round "
                    "keeps its starting guidance", start["loss"])
    return FitResult(best["loss"], best["accuracy"], best_update, update, int(best["pairs"]), history)

