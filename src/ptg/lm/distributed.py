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

FSDP (fully sharded data parallelism: each rank holds 1/N of the weights, gradients and optimizer state, and
gathers a block's weights only while it runs) trains a policy that does not fit one device. Launch with accelerate's
FSDP config, ``launcher: "accelerate launch --config_file configs/accelerate/fsdp.yaml"``: accelerate starts the
processes and sets ``ACCELERATE_USE_FSDP`` (``fsdp_requested``), and ptg shards ``train_lm``'s policy with PyTorch's
``fully_shard`` (FSDP2) itself, each decoder block and then the rest (``replicate(model, shard=True)``), on GPUs and
on CPUs alike (accelerate 1.15 applies its own FSDP plugin only to GPU processes). Every FSDP forward is a
collective, so the ranks must run the same forwards: the prompts are not run in a pass of their own
(``models.shares_prompts``), every rank needs an example in every micro-batch, and objectives that sample on each
rank's own share (pg, reinforce, a pg term) are refused; validation runs the same inputs on every rank, through the
sharded root (``replica(validate)``). ``snapshot`` / ``restore`` keep each rank's shards of the best checkpoint in
host memory; ``full_state`` gathers the whole state dict to rank 0, which saves it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
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

    with _accelerate_without_fsdp():
        PartialState(cpu=not torch.cuda.is_available())  # cpu: accelerate's gloo processes (MULTI_CPU)


@contextlib.contextmanager
def _accelerate_without_fsdp() -> Iterator[None]:
    """Hide an FSDP launch from accelerate while its state is made: ptg shards train_lm's policy itself
    (``replicate(shard=True)``) and wants plain DDP from accelerate for the rest (the guidance), which accelerate
    would otherwise wrap with its own FSDP plugin on GPUs."""
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["ACCELERATE_USE_FSDP"]
        else:
            os.environ["ACCELERATE_USE_FSDP"] = saved


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


FSDP_CONFIG = "configs/accelerate/fsdp.yaml"


def fsdp_requested() -> bool:
    """Whether the processes were launched for FSDP (accelerate's FSDP config sets ACCELERATE_USE_FSDP), with
    several processes. Settings ptg does not implement are refused, naming the accelerate field."""
    if rank_and_world()[1] == 1 or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    unsupported = {"FSDP_VERSION": ("fsdp_version", "2", "ptg shards with FSDP2 (torch's fully_shard)"),
                   "FSDP_OFFLOAD_PARAMS": ("fsdp_offload_params", "false", "CPU offload is not supported"),
                   "FSDP_ACTIVATION_CHECKPOINTING": ("fsdp_activation_checkpointing", "false",
                                                     "set train_lm.gradient_checkpointing instead")}
    for env, (field, expected, why) in unsupported.items():
        value = os.environ.get(env, expected).lower()
        if value != expected:
            raise ValueError(f"accelerate config fsdp_config.{field}: {value!r} is not supported ({why}); "
                             f"use {expected!r} (as {FSDP_CONFIG})")
    return True


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

    # ptg sets the precision itself (ptg.lm.precision); the buffers (rotary frequencies) are the same on every rank.
    with _accelerate_without_fsdp():
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                           kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def replicate(model: torch.nn.Module, shard: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``Replica(model)``: with several processes, prepared by accelerate as a DDP module (the weights broadcast
    from rank 0 once; gradients averaged over ranks in the backward pass), or with ``shard``, sharded in place by
    FSDP2 (``fully_shard`` on each of ``model``'s decoder blocks, its ``_no_split_modules``, then on the replica;
    with a bf16 ``dtype``, weights gathered and run in bf16, gradients reduced in fp32)."""
    replica = Replica(model)
    if rank_and_world()[1] == 1:
        return replica
    if not shard:
        return _accelerator().prepare_model(replica, device_placement=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"FSDP: {type(model).__name__} names no decoder blocks to shard (_no_split_modules)")
    mixed = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    after = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mixed, reshard_after_forward=after)
    fully_shard(replica, mp_policy=mixed, reshard_after_forward=after)
    # The weights are one seeded initialisation or one checkpoint on every rank, so the shards need no broadcast.
    return replica


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a block of it) is sharded by FSDP2: never in one process (``replicate`` shards only
    with several), so the common case costs no walk over the modules."""
    if rank_and_world()[1] == 1:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP weight (a DTensor), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state dict in host memory, this rank's shards of a sharded model: a best checkpoint
    kept beside training, off the training device (a second copy there would halve the model that fits)."""
    return {k: local_shard(v).detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a ``snapshot`` back into ``model``'s weights and buffers, in place."""
    current = model.state_dict()
    if current.keys() != state.keys():
        raise ValueError(f"restore: the snapshot's keys differ from the model's: "
                         f"{sorted(current.keys() ^ state.keys())[:5]}")
    for k, v in current.items():
        local_shard(v).copy_(state[k])


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict in host memory, gathered from every rank's shards (a collective: every rank
    calls it; rank 0 gets the tensors, the others an empty dict), without the second name of a tied weight (the
    output embedding that is the input one); ``model``'s own state dict when not sharded."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    first: dict[int, str] = {}
    tied = {k for k, v in model.state_dict(keep_vars=True).items() if first.setdefault(id(v), k) != k}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in state.items() if k not in tied}


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """0 x the sum of ``model``'s trainable weights: the loss of a rank with nothing to train on this step, which
    gives each of them a zero gradient so that the rank joins DDP's gradient all-reduce."""
    return sum((p.sum() for p in model.parameters() if p.requires_grad), torch.zeros(())) * 0.0
