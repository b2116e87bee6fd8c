"""Data parallelism for `train_lm`: several processes, one model replica each, one global batch.

Launch a stage with ``accelerate launch --multi_gpu --num_processes N stages/train_lm.py --round r`` (or
``torchrun --nproc-per-node N``; both set RANK / WORLD_SIZE / LOCAL_RANK). ``init_from_env`` joins the process
group (NCCL on CUDA, one GPU per process; gloo on the CPU). Every rank draws the same seeded micro-batches and trains
on its share of each (``shard``); each rank's loss is its part of the global batch's loss (its numerator over
the numerator's count summed over ranks, ``all_reduce_sum``), and ``sync_gradients`` sums the gradients, so every
rank takes the update one process would take on the whole batch, to float rounding. Rank 0 writes the outputs.
In one process every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_env() -> None:
    """Join the process group a launcher set up (WORLD_SIZE > 1), once; on CUDA, each process on its LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


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


def sync_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks (one flat all-reduce; a rank without a gradient adds zeros)."""
    if rank_and_world()[1] == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
