"""Data parallelism for `train_lm` and `fit_guidance`: several processes, one model replica each, one global batch,
through accelerate and PyTorch's DistributedDataParallel (DDP).

Launch a stage with ``accelerate launch --multi_gpu --num_processes N stages/train_lm.py --round r`` (or
``torchrun --nproc-per-node N``; both set RANK / WORLD_SIZE / LOCAL_RANK). ``init_from_env`` joins the process
group through accelerate (NCCL on CUDA, one GPU per process; gloo on the CPU). Every rank draws the same seeded
micro-batches and trains on its share of each (``shard``). The loss of a micro-batch is built from sums: each rank
computes its numerators through its ``replicate``-d model (a DDP module: one forward covers every model call the
loss makes, and DDP all-reduces the gradients bucket by bucket while the backward pass runs), the denominators are
summed over ranks (``all_reduce_sum``), and each rank back-propagates ``world x`` its numerators over the global
denominators, so that DDP's mean over ranks is the update one process takes on the whole micro-batch, to float
rounding. A rank whose share is empty still takes part, with a loss of zero that reaches every trainable weight
(``zero_loss``). Rank 0 writes the outputs. In one process every function here is a no-op and ``replicate`` wraps
without DDP.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_env() -> None:
    """Join the process group a launcher set up (WORLD_SIZE > 1), once, through accelerate's ``PartialState``
    (NCCL on CUDA with each process on its LOCAL_RANK; gloo on the CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())  # cpu: accelerate's gloo processes (MULTI_CPU)


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes outputs and tracks (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (every world-th item from its rank): all of them in one process."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (itself in one process)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


class Replica(torch.nn.Module):
    """The module DDP wraps: ``replica(fn, *args)`` returns ``fn(model, *args)``, so that one DDP forward covers
    every call a loss makes to ``model`` (a shared prompt prefix, then each prompt's rest; the policy-gradient term
    beside weighted MLE) and DDP's gradient hooks fire once per backward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self.model, *args)


@functools.cache
def _accelerator() -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # ptg sets the precision itself (ptg.precision); the buffers (rotary frequencies) are the same on every rank.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def replicate(model: torch.nn.Module) -> torch.nn.Module:
    """``Replica(model)``, prepared by accelerate as a DDP module when there are several processes (the weights
    broadcast from rank 0 once; gradients averaged over ranks in the backward pass)."""
    replica = Replica(model)
    if rank_and_world()[1] == 1:
        return replica
    return _accelerator().prepare_model(replica, device_placement=False)


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """0 x the sum of ``model``'s trainable weights: the loss of a rank with nothing to train on this step, which
    gives each of them a zero gradient so that the rank joins DDP's gradient all-reduce."""
    return sum((p.sum() for p in model.parameters() if p.requires_grad), torch.zeros(())) * 0.0
