"""`make perf`: how fast ptg's hot paths run on this machine, each as a ratio measured in the same run.

Rows (SmolLM2-135M-Instruct, the default policy, materialised offline into build/perf/lm once):
- **sample**: ``ptg.lm.sampling.sample`` (K samples per prompt) against transformers' ``generate`` with
  identical settings (do_sample, temperature 1, top-k off, top-p 1, ``num_return_sequences`` = K) on the same
  prompts, and against the compute bound: the useful FLOPs (real prompt tokens once, generated tokens, attention)
  at the matmul peak measured in this run for the same dtype.
- **greedy** (what `evaluate` decodes): ``sample`` with temperature 0 against greedy ``generate``, and the bound.
- **guidance**: forward rows/s of the guidance backbone with each prompt encoded once and shared by its K
  responses, against the prompt repeated K times (prompts about 4x longer than responses).
- **train_lm**: achieved FLOP/s of weighted-MLE training (6 x parameters x tokens, attention included) against the
  same-dtype matmul peak.
- **start-up**: seconds from process start to the stage's argument parsing (every import it does) per stage.

On CUDA (``--device cuda``, or ``auto`` where a GPU is present) every row runs on the GPU in the pipeline's
precision there (bf16 autocast, ``generate`` under the same autocast) and the peak is the bf16 matmul peak.

Writes metrics/perf.json and prints a table.
Run: ptg perf [--device auto|cpu|cuda] [--threads N] [--prompts N] [--batch-size N] [--out metrics/perf.json]
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ptg.lm.precision import autocast, resolve_precision
from ptg.ops.workspace import TEMPLATE

log = logging.getLogger(__name__)
CPU = torch.device("cpu")

PERF_DIR = Path("build") / "perf"  # in the working directory (the project)
STAGES = ("sources", "prepare", "base_model", "preferences", "sample", "rank", "fit_guidance", "train_lm", "evaluate",
          "baseline", "report")


def matmul_peak(dtype: torch.dtype, device: torch.device = CPU, n: int = 0, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul in ``dtype`` on ``device`` (on the CPU: the threads torch uses now). ``n``
    defaults to 2048 on the CPU and 8192 on a GPU (large enough to fill it)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best


def memory_bandwidth(device: torch.device = CPU, mib: int = 512, repeats: int = 3) -> float:
    """Best bytes/s of copying a ``mib`` MiB tensor (read + write) on ``device``: what a decode step that reads
    every weight once is bound by."""
    a = torch.empty(mib << 18, device=device)  # fp32: 4 bytes each
    b = torch.empty_like(a).copy_(a)  # touched once, so no page is first faulted in inside the timing
    best = min(_timed(lambda: b.copy_(a), device) for _ in range(repeats))
    return 2 * a.numel() * 4 / best


def decode_steps(prompts: list[list[int]], outputs: list[list[list[int]]], batch_size: int) -> int:
    """Decode steps (forwards after the prefill) of sampling ``outputs`` in ptg's batches (prompts sorted by length,
    ``batch_size`` at a time): each batch steps until its longest output is complete."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return sum(max(len(s) for i in order[b:b + batch_size] for s in outputs[i]) - 1
               for b in range(0, len(order), batch_size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device = CPU) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _shape(model: torch.nn.Module) -> dict[str, int]:
    """Parameters in the decoder layers' matmuls, vocabulary, width, layers, attention width."""
    cfg = model.config
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    heads = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return {"linear": linear, "vocab": cfg.vocab_size, "width": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "attn": heads}


def forward_flops(shape: dict[str, int], contexts: list[int], with_logits: int) -> float:
    """FLOPs of a forward over tokens at the given context lengths (each attends to that many positions), with
    the LM head applied to ``with_logits`` of them."""
    per_token = 2 * shape["linear"]
    attention = 4 * shape["layers"] * shape["attn"] * sum(contexts)
    return per_token * len(contexts) + attention + 2 * shape["vocab"] * shape["width"] * with_logits


def decode_flops(shape: dict[str, int], prompts: list[list[int]], outputs: list[list[list[int]]]) -> float:
    """Useful FLOPs of sampling ``outputs`` (K per prompt): each prompt prefilled once, each new token decoded."""
    total = 0.0
    for p, group in zip(prompts, outputs, strict=True):
        total += forward_flops(shape, list(range(1, len(p) + 1)), 1)
        for seq in group:
            steps = max(len(seq) - 1, 0)  # the last token is sampled, never fed back
            total += forward_flops(shape, [len(p) + i + 1 for i in range(steps)], steps)
    return total


def _generate(model: torch.nn.Module, prompts: list[list[int]], k: int, greedy: bool, max_new: int,
              eos: list[int], pad_id: int, batch_size: int, device: torch.device = CPU,
              dtype: torch.dtype = torch.float32) -> list[list[list[int]]]:
    from ptg.lm.models import pad

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the same batches as ptg's
    results: dict[int, list[list[int]]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad([prompts[i] for i in chunk], pad_id, left=True)
        kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                        "top_p": 1.0, "num_return_sequences": k}
        with autocast(device, dtype):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                                 eos_token_id=eos, pad_token_id=pad_id, **kwargs)[:, ids.shape[1]:].tolist()
        for j, i in enumerate(chunk):
            rows = gen[j * k:(j + 1) * k] if not greedy else [gen[j]]
            results[i] = [r[:next((n + 1 for n, t in enumerate(r) if t in eos), len(r))] for r in rows]
    return [results[i] for i in range(len(prompts))]


def decoding_rows(model: torch.nn.Module, prompts: list[list[int]], eos: list[int], pad_id: int,
                  k: int = 3, max_new: int = 32, batch_size: int = 16, device: torch.device = CPU,
                  dtype: torch.dtype = torch.float32, bandwidth: float = 0.0) -> dict[str, dict[str, float]]:
    """The sample and greedy rows: ptg against generate, ptg's useful FLOP/s (``with_peak`` turns it into the
    fraction of the compute bound) and, with the measured memory ``bandwidth`` (bytes/s), the seconds its decode
    steps need at least: each reads every weight once, in the compute dtype (``bandwidth_bound_s``)."""
    from ptg.lm.sampling import SamplingConfig, sample

    shape = _shape(model)
    step_bytes = (shape["linear"] + shape["vocab"] * shape["width"]) * torch.finfo(dtype).bits // 8
    rows = {}
    for name, temperature, kk in (("sample", 1.0, k), ("greedy", 0.0, 1)):
        cfg = SamplingConfig(num_samples=kk, max_new_tokens=max_new, temperature=temperature)
        res: dict[str, Any] = {}
        for who in ("ptg", "generate"):
            torch.manual_seed(0)
            _sync(device)
            t0 = time.perf_counter()
            if who == "ptg":
                outputs = sample(model, prompts, cfg, eos, pad_id, device, dtype, batch_size=batch_size,
                                 generator=torch.Generator().manual_seed(0), progress=False)
            else:
                with torch.no_grad():
                    outputs = _generate(model, prompts, kk, temperature == 0, max_new, eos, pad_id, batch_size,
                                        device, dtype)
            _sync(device)
            seconds = time.perf_counter() - t0
            tokens = sum(len(s) for g in outputs for s in g)
            res[who] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                        "flops_per_s": decode_flops(shape, prompts, outputs) / seconds}
        ptg, gen = res["ptg"], res["generate"]
        rows[name] = {"ptg_tokens_per_s": ptg["tokens_per_s"], "generate_tokens_per_s": gen["tokens_per_s"],
                      "vs_generate": ptg["tokens_per_s"] / gen["tokens_per_s"],
                      "flops_per_s": ptg["flops_per_s"], "ptg_seconds": ptg["seconds"],
                      "generate_seconds": gen["seconds"], "tokens": ptg["tokens"]}
        if bandwidth:
            bound = decode_steps(prompts, outputs, batch_size) * step_bytes / bandwidth
            rows[name] |= {"bandwidth_bound_s": bound, "of_bandwidth_bound": bound / ptg["seconds"]}
        log.info("%s: %s", name, rows[name])
    return rows


def guidance_backbone(policy_dir: Path, layers: int = 4) -> torch.nn.Module:
    """The default guidance backbone: the policy's first ``layers`` layers (materialised once under build/perf)."""
    from transformers import AutoModel

    from ptg.lm.base_models import truncate_backbone

    directory = PERF_DIR / f"guidance-{layers}"
    if not (directory / "config.json").is_file():
        truncate_backbone(policy_dir, layers, directory)
    return AutoModel.from_pretrained(directory).eval()


def guidance_row(backbone: torch.nn.Module, prompts: list[list[int]], pad_id: int, k: int = 3,
                 repeats: int = 3, device: torch.device = CPU, dtype: torch.dtype = torch.float32
                 ) -> dict[str, float]:
    """Guidance backbone forward rows/s with K responses per prompt, each a quarter of its prompt's length:
    the prompt run once and its cache shared by the K responses, against the prompt repeated K times. No
    gradients (scoring, validation); fitting runs the same forward with them."""
    from ptg.lm.models import collate, decoder_only_inputs, response_hidden

    responses = [p[-max(len(p) // 4, 1):] for p in prompts for _ in range(k)]
    batches = [collate(prompts[i:i + 8], responses[i * k:(i + 8) * k], pad_id).to(device)
               for i in range(0, len(prompts), 8)]
    seconds = {}
    with torch.no_grad(), autocast(device, dtype):
        for name, fn in (("shared", lambda b: response_hidden(backbone, b)),
                         ("repeated", lambda b: backbone(**decoder_only_inputs(b, k)).last_hidden_state)):
            fn(batches[0])  # warm-up
            seconds[name] = min(_timed(lambda fn=fn: [fn(b) for b in batches], device) for _ in range(repeats))
    rows = len(responses)
    return {"k": k, "shared_rows_per_s": rows / seconds["shared"], "repeated_rows_per_s": rows / seconds["repeated"],
            "speedup": seconds["repeated"] / seconds["shared"]}


def train_row(model: torch.nn.Module, prompts: list[list[int]], targets: list[list[int]], pad_id: int,
              updates: int = 3, batch_size: int = 8, device: torch.device = CPU,
              dtype: torch.dtype = torch.float32, lora_rank: int = 0) -> dict[str, float]:
    """Achieved FLOP/s of ``updates`` weighted-MLE updates (uniform weights; ``with_peak`` adds the fraction of
    the matmul peak); with ``lora_rank`` > 0, of LoRA adapters (peft's default targets) on ``model``, removed after.
    The FLOPs counted are the full model's either way (LoRA skips the frozen weights' gradients, not their
    backward through the activations), so the two rows compare as seconds per update."""
    from ptg.lm.models import add_lora
    from ptg.lm.train import Example, TrainConfig, train_lm

    examples = [Example(p, t) for p, t in zip(prompts, targets, strict=True)]
    cfg = TrainConfig(max_updates=updates, batch_size=batch_size, lr=1e-5)
    full, trainable_before = model, [p.requires_grad for p in model.parameters()]
    if lora_rank:
        model = add_lora(model, lora_rank, 2.0 * lora_rank, 0.0, None, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # One untimed update first: the first one pays one-off costs (CUDA context and cuBLAS handles, autocast weight
    # casts, allocator growth) that made 3 timed updates on an H100 read 1.38 s each.
    train_lm(model, examples, dataclasses.replace(cfg, max_updates=1), pad_id, device, dtype, progress=False)
    model.load_state_dict(state)
    _sync(device)
    t0 = time.perf_counter()
    history = train_lm(model, examples, cfg, pad_id, device, dtype, progress=False)
    _sync(device)
    seconds = time.perf_counter() - t0
    model.load_state_dict(state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if lora_rank:
        model = model.unload()  # the base model without adapter layers; peft froze its weights: thaw them
        for p, flag in zip(full.parameters(), trainable_before, strict=True):
            p.requires_grad_(flag)
    shape = _shape(full)
    # Tokens per update: the same seeded batches train_lm drew; FLOPs = 3 x forward (forward + backward).
    gen = torch.Generator().manual_seed(cfg.seed)
    from ptg.lm.train import micro_batches

    batches = micro_batches([len(e.prompt) + len(e.response) for e in examples], batch_size, gen)
    flops = 0.0
    for _ in range(updates):
        for i in next(batches):
            n_p, n_t = len(examples[i].prompt), len(examples[i].response)
            flops += 3 * forward_flops(shape, list(range(1, n_p + n_t + 1)), n_t)
    return {"seconds_per_update": seconds / updates, "flops_per_s": flops / seconds,
            "tokens_per_update": sum(h["tokens"] for h in history) / updates, "trainable_parameters": trainable}


def with_peak(result: dict[str, Any], peak: float) -> dict[str, Any]:
    """``result`` with every achieved FLOP/s also as a fraction of ``peak``: of the compute bound for decoding,
    of the matmul peak for training."""
    for row in ("sample", "greedy"):
        result[row]["of_compute_bound"] = result[row]["flops_per_s"] / peak
    for row in ("train_lm", "train_lm_lora"):
        if row in result:
            result[row]["of_peak"] = result[row]["flops_per_s"] / peak
    return result


def startup_row(stages: tuple[str, ...] = STAGES) -> dict[str, float]:
    """Seconds from process start to a parsed command line (every import the stage does), per stage."""
    out = {}
    for stage in stages:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, f"stages/{stage}.py", "--help"], cwd=TEMPLATE, check=True,
                       capture_output=True)
        out[stage] = time.perf_counter() - t0
    return out


def default_policy(directory: Path = PERF_DIR / "lm") -> tuple[torch.nn.Module, Any]:
    """The offline default policy (SmolLM2-135M-Instruct, fp32) and its tokenizer, materialised into ``directory``
    once."""
    from ptg.lm.base_models import materialize_policy
    from ptg.lm.models import load_lm, load_tokenizer

    if not (directory / "config.json").is_file():
        materialize_policy("smollm2-135m-instruct", directory)
    return load_lm(directory), load_tokenizer(directory)


def default_examples(model: torch.nn.Module, tokenizer: Any, n: int | None = None
                     ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the default params' first ``n`` training prompts and their references (all with None), cut at
    the params' ``model.max_prompt_tokens`` / ``max_target_tokens``: what perf and the scripts time on."""
    from ptg.config import load
    from ptg.corpus import build_examples
    from ptg.lm.encoding import encode_prompts, encode_responses, turn_end_id

    params = load(TEMPLATE / "params.yaml")  # the default params ptg ships, not a project's
    mp = params.model
    frame = build_examples(params.data)["train"].head(n)
    prompts = encode_prompts(tokenizer, frame["prompt"].tolist(), mp.max_prompt_tokens, False)
    targets = encode_responses(tokenizer, frame["target"].tolist(), mp.max_target_tokens,
                               turn_end_id(model, tokenizer))
    return prompts, targets


def run(n_prompts: int = 24, k: int = 3, max_new: int = 32, device: torch.device = CPU, batch_size: int = 16
        ) -> dict[str, Any]:
    from ptg.bench import machine
    from ptg.lm.encoding import eos_ids

    model, tok = default_policy()
    model.to(device)
    # What the pipeline computes in on this device (precision: auto, for this model's shapes).
    dtype = resolve_precision("auto", device, model.config.hidden_size, model.config.intermediate_size)
    prompts, targets = default_examples(model, tok, n_prompts)
    eos = eos_ids(model, tok)
    first = matmul_peak(dtype, device)
    result: dict[str, Any] = {"machine": machine(), "threads": torch.get_num_threads(),
                              "device": device.type, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
                              "settings": {"prompts": n_prompts, "k": k, "max_new_tokens": max_new,
                                           "batch_size": batch_size}}
    result["bandwidth_bytes_per_s"] = memory_bandwidth(device)
    result |= decoding_rows(model, prompts, eos, tok.pad_token_id, k, max_new, batch_size, device, dtype,
                            result["bandwidth_bytes_per_s"])
    result["guidance"] = guidance_row(guidance_backbone(PERF_DIR / "lm").to(device), prompts, tok.pad_token_id, k=k,
                                      device=device, dtype=dtype)
    log.info("guidance: %s", result["guidance"])
    result["train_lm"] = train_row(model, prompts, targets, tok.pad_token_id, device=device, dtype=dtype)
    log.info("train_lm: %s", result["train_lm"])
    result["train_lm_lora"] = train_row(model, prompts, targets, tok.pad_token_id, device=device, dtype=dtype,
                                        lora_rank=8)
    log.info("train_lm LoRA r=8: %s", result["train_lm_lora"])
    result["startup_s"] = startup_row()
    log.info("start-up: %s", result["startup_s"])
    # The peak again after the work, and the higher of the two for every fraction: on a shared or throttled
    # machine one measurement can catch a bad moment (166 against 335 GFLOP/s on two threads here).
    last = matmul_peak(dtype, device)
    name = result["dtype"]
    result["peak_flops"] = {name: max(first, last), f"{name}_start": first, f"{name}_end": last}
    return with_peak(result, max(first, last))


TARGETS = {"vs_generate": 3.0, "of_compute_bound": 0.5, "guidance_speedup": 2.0, "train_of_peak": 0.6,
           "startup_s": 2.0}  # issue #20's targets, printed beside each figure


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    s, g, t = result["sample"], result["greedy"], result["train_lm"]
    dtype = result.get("dtype", "fp32")
    where = f"GPU {m['gpu']} ({dtype} autocast); host " if "gpu" in m else ""
    bandwidth = result.get("bandwidth_bytes_per_s", 0.0)
    lines = [f"machine: {where}{m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags'])}; torch threads "
             f"{result['threads']}; {dtype} matmul peak {result['peak_flops'][dtype] / 1e9:.0f} GFLOP/s; memory "
             f"bandwidth {bandwidth / 1e9:.1f} GB/s",
             "| path | ptg | baseline | ptg / baseline (target) | of the bound (target) |", "|---|---|---|---|---|"]
    for name, row in ((f"sample (K = {result['settings']['k']})", s), ("greedy (evaluate)", g)):
        bound = (f"; its decode steps alone need {row['bandwidth_bound_s']:.1f} s at the bandwidth "
                 f"({row['of_bandwidth_bound']:.0%} of its {row['ptg_seconds']:.1f} s)" if "bandwidth_bound_s" in row
                 else "")
        lines.append(f"| {name} | {row['ptg_tokens_per_s']:.1f} tok/s | generate {row['generate_tokens_per_s']:.1f} "
                     f"tok/s | {row['vs_generate']:.2f}x ({TARGETS['vs_generate']:.0f}x) | "
                     f"{row['of_compute_bound']:.0%} of compute ({TARGETS['of_compute_bound']:.0%}){bound} |")
    if "guidance" in result:
        gd = result["guidance"]
        lines.append(f"| guidance scoring (K = {gd['k']}) | {gd['shared_rows_per_s']:.1f} rows/s shared prompts "
                     f"| {gd['repeated_rows_per_s']:.1f} rows/s repeated | {gd['speedup']:.2f}x "
                     f"({TARGETS['guidance_speedup']:.0f}x) | |")
    lines.append(f"| train_lm (batch 8) | {t['flops_per_s'] / 1e9:.1f} GFLOP/s, {t['seconds_per_update']:.2f} s/update "
                 f"| | | {t['of_peak']:.0%} of peak ({TARGETS['train_of_peak']:.0%}) |")
    if "train_lm_lora" in result:
        lo = result["train_lm_lora"]
        speedup = t["seconds_per_update"] / lo["seconds_per_update"]
        lines.append(f"| train_lm LoRA r=8 (batch 8) | {lo['seconds_per_update']:.2f} s/update, "
                     f"{lo['trainable_parameters'] / 1e6:.2f}M trainable | full: {t['seconds_per_update']:.2f} s, "
                     f"{t['trainable_parameters'] / 1e6:.1f}M | {speedup:.2f}x | |")
    lines.append("| start-up (s) | " + ", ".join(f"{k} {v:.1f}" for k, v in result["startup_s"].items())
                 + f" | | | < {TARGETS['startup_s']:.0f} s for a stage without a model |")
    return "\n".join(lines)
