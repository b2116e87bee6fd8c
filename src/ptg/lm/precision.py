"""Device and numeric precision: one place decides where tensors live and whether matmuls run in bf16.

bf16 is mixed precision as the GPU world does it: master weights, gradients' accumulation, optimiser state and
losses stay in fp32. Training (``train_lm``, ``fit_guidance``) runs forward and backward on a bf16 working copy
(``WorkingCopy``: weights cast once per update, 1.06x autocast per update); stages that only infer load the model in
bf16 (``models.load_lm(dtype=...)``); the rest runs under ``torch.autocast`` (``autocast``). ``precision: auto``
follows a measurement:

- on CUDA, bf16 where the GPU supports it;
- on a CPU, bf16 where it makes the model's matmuls faster: ``bf16_speedup`` times a [512, width] x [width, ffn]
  matmul (the policy's shapes) in fp32 and in bf16 with torch's threads, once per (CPU, torch version, threads,
  shape), and keeps the figure in ``PTG_CACHE``/precision.json, so every stage of a run, and every later run on the
  machine, makes the same choice. bf16 wins at ``BF16_MIN_SPEEDUP`` or more. CPUs without bf16 units
  (``avx512_bf16`` / ``amx_bf16``) emulate it slower and are not probed.

Measured (docs/performance.md): on a 2-core EPYC with avx512_bf16 (torch 2.13, one thread, SmolLM2-135M) bf16 autocast
trained 1.6x and decoded greedily 1.7x as fast as fp32; an earlier session measured it slower on a 2-core Intel Xeon
with avx512_bf16, and a later one 1.86x faster there: hence a measurement, not a rule. Tiny models (width 64) stay
fp32: a bf16 matmul that small is no faster. ``precision: fp32`` or ``bf16`` forces the choice.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
BF16_MIN_SPEEDUP = 1.25  # bf16 must make the probe's matmul this much faster to be chosen
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_ROWS = 512  # tokens of the probe matmul: a micro-batch's worth


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device, width: int = 0, ffn: int = 0) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device``: torch.bfloat16 or torch.float32. ``auto`` on a CPU needs
    the model's ``width`` and ``ffn`` (hidden and intermediate sizes; 0: unknown, fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if not width or bf16_speedup(width, ffn or 4 * width) < BF16_MIN_SPEEDUP:
        return torch.float32
    return torch.bfloat16


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and flags, from /proc/cpuinfo ("", empty where there is none)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return model, flags


def probe_matmul(width: int, ffn: int, repeats: int = 7) -> float:
    """fp32 time / bf16 time of a [PROBE_ROWS, width] x [width, ffn] matmul, the best of ``repeats`` each,
    alternating, with torch's current threads."""
    x, w = torch.randn(PROBE_ROWS, width), torch.randn(width, ffn)
    pairs = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(repeats):
        for dtype, (a, b) in pairs.items():
            t0 = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def cache_file() -> Path:
    return Path(os.environ.get("PTG_CACHE", ".cache")) / "precision.json"


def bf16_speedup(width: int, ffn: int) -> float:
    """``probe_matmul(width, ffn)`` on this CPU, measured once per (CPU, torch version, threads, shape) and then read
    from ``cache_file()`` (under a lock, so stages started together measure once). 0 without bf16 units."""
    model, flags = cpu_info()
    if not flags & set(BF16_FLAGS):
        return 0.0
    key = f"{model}|torch {torch.__version__}|threads {torch.get_num_threads()}|{width}x{ffn}"
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = json.loads(path.read_text()) if path.is_file() else {}
        if key not in known:
            known[key] = round(probe_matmul(width, ffn), 3)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            tmp.replace(path)
    return float(known[key])


class WorkingCopy:
    """bf16 working weights of a model whose fp32 weights (``master``) the optimiser updates: forward and backward
    run on ``model``, a bf16 copy (its weights cast once per update, not once per autocast region, and its
    element-wise work on bf16 activations); ``push`` adds its gradients to the master's in fp32 (accumulated over
    micro-batches there), where clipping and the optimiser step run; ``pull`` casts the updated master weights into
    the copy. Frozen weights are cast once, at the copy. With fp32, ``model`` is the master itself and both calls
    do nothing."""

    def __init__(self, master: torch.nn.Module, dtype: torch.dtype) -> None:
        self.master = master
        self.model = master if dtype == torch.float32 else copy.deepcopy(master).to(dtype)
        self.pairs = [] if self.model is master else [
            (m, w) for m, w in zip(master.parameters(), self.model.parameters(), strict=True) if m.requires_grad]

    @torch.no_grad()
    def pull(self) -> None:
        for m, w in self.pairs:
            w.copy_(m)

    def push(self) -> None:
        for m, w in self.pairs:
            if w.grad is not None:
                m.grad = w.grad.float() if m.grad is None else m.grad.add_(w.grad)
                w.grad = None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """bf16 autocast on ``device`` when ``dtype`` is bf16; a no-op for fp32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
