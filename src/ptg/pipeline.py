"""Glue shared by the DVC stages: artifact paths, stage start-up, reading the prepared examples as token ids,
turning samples into tables, and training an LM from one folder into another (``ptg.evaluation`` evaluates).
The stages stay a dozen lines each; the math stays in ``ptg.losses``, the learning in ``ptg.guidance`` and
``ptg.train``. torch and transformers are imported only by the functions that use them, so a stage that loads no
model (prepare, preferences, rank with a metric, report) starts without them (``start(..., with_torch=False)``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ptg import schemas
from ptg.config import ModelParams, RunParams, SamplingConfig, TrainLMParams, load_group
from ptg.io import atomic_path, read_table, write_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.guidance import Guidance

log = logging.getLogger(__name__)

DATA = Path("data")
PREPARED = DATA / "prepared"
PREFERENCES = DATA / "preferences.parquet"
METRICS = Path("metrics")
SPLITS = ("train", "validation", "test")


def round_dir(r: int) -> Path:
    """Artifacts of round r; round 0 holds the base policy (lm/) and the untrained guidance backbone."""
    return DATA / "rounds" / str(r)


def baseline_dir(r: int) -> Path:
    """Artifacts of the MLE baseline after as many updates as PTG rounds 1..r."""
    return DATA / "baseline" / str(r)


def round_metrics(r: int, stage: str) -> Path:
    return METRICS / "rounds" / str(r) / f"{stage}.json"


@dataclass(frozen=True)
class Context:
    """What every stage needs: the params file, run settings, device and autocast dtype."""

    params: Path
    run: RunParams
    device: torch.device | None  # None for a stage started without torch
    dtype: torch.dtype | None

    def seed(self, stage: str, r: int = 0) -> int:
        """A seed per (base seed, stage, round), stable across Python processes."""
        digest = hashlib.sha256(f"{self.run.seed}/{stage}/{r}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def generator(self, stage: str, r: int = 0) -> torch.Generator:
        import torch

        return torch.Generator().manual_seed(self.seed(stage, r))

    @property
    def progress(self) -> bool:
        return self.run.progress and not os.environ.get("CI") and os.environ.get("RANK", "0") == "0"


def cli(main: Callable[..., None], doc: str | None, per_round: bool = True) -> None:
    """The command line of a stage script: ``[--round R] [--params params.yaml]``, then ``main(R, params)``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if per_round:
        ap.add_argument("--round", type=int, required=True, help="the PTG round (1, 2, ...)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = ap.parse_args()
    if per_round:
        main(args.round, args.params)
    else:
        main(args.params)


def start(stage: str, params: str | Path = "params.yaml", with_torch: bool = True) -> Context:
    """Configure logging for ``stage``; with ``with_torch`` (a stage that runs a model) also resolve the device and
    precision and seed torch. Without it, torch is never imported."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")
    run: RunParams = load_group("run", params)
    if not with_torch:
        return Context(Path(params), run, None, None)
    import torch

    from ptg import distributed
    from ptg.precision import resolve_device, resolve_precision

    distributed.init_from_env()  # under `accelerate launch --num_processes N`: data-parallel train_lm
    device = resolve_device(run.device)
    dtype = resolve_precision(run.precision, device)
    torch.manual_seed(run.seed)
    log.info("device %s, compute dtype %s", device, dtype)
    return Context(Path(params), run, device, dtype)


def read_examples(*splits: str) -> pd.DataFrame:
    """The prepared examples of ``splits`` (validated), in one frame."""
    return pd.concat([read_table(PREPARED / f"{s}.parquet", schemas.Examples) for s in splits], ignore_index=True)


def encode_prompts_of(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                      mp: ModelParams) -> list[list[int]]:
    """Prompt token ids of ``frame`` (chat template for decoder-only models that have one)."""
    from ptg.models import encode_prompts, is_seq2seq

    return encode_prompts(tokenizer, frame["prompt"].tolist(), mp.max_prompt_tokens, is_seq2seq(model))


def encode_targets_of(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                      mp: ModelParams) -> list[list[int]]:
    """Reference token ids of ``frame``, ending with the token the model ends its own turn with (``turn_end_id``:
    e.g. ``<|im_end|>`` for a ChatML model, however its EOS ids sort)."""
    from ptg.models import encode_responses, turn_end_id

    return encode_responses(tokenizer, frame["target"].tolist(), mp.max_target_tokens, turn_end_id(model, tokenizer))


def sample_table(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, mp: ModelParams,
                 cfg: SamplingConfig, batch_size: int, ctx: Context, generator: torch.Generator | None
                 ) -> tuple[pd.DataFrame, dict[str, float]]:
    """K continuations of every row of ``frame`` as a Samples table, plus throughput figures."""
    from ptg.models import eos_ids
    from ptg.sampling import sample

    prompts = encode_prompts_of(tokenizer, model, frame, mp)
    stops = eos_ids(model, tokenizer)
    t0 = time.perf_counter()
    drawn = sample(model, prompts, cfg, stops, tokenizer.pad_token_id, ctx.device, ctx.dtype, batch_size,
                   generator, ctx.progress)
    seconds = time.perf_counter() - t0
    rows = []
    for ex_id, group in zip(frame["id"], drawn, strict=True):
        for k, ids in enumerate(group):
            rows.append({"id": ex_id, "sample_idx": k, "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                         "token_ids": ids, "n_tokens": len(ids), "finished": ids[-1] in stops})
    table = pd.DataFrame(rows)
    n_tokens = int(table["n_tokens"].sum())
    return table, {"seconds": seconds, "tokens": n_tokens, "tokens_per_second": n_tokens / max(seconds, 1e-9),
                   "mean_tokens": float(table["n_tokens"].mean()), "finished_fraction": float(table["finished"].mean())}


OPTIMIZER_FILE = "optimizer.safetensors"


def train_and_save(src: Path, dst: Path, cfg: TrainLMParams, guidance: Guidance | None, ctx: Context,
                   metrics_path: Path, history_path: Path) -> None:
    """Load the LM at ``src``, train it on the training split with ``cfg`` (uniform token weights without a
    guidance; fresh LoRA adapters when ``cfg.lora.rank`` > 0), save it to ``dst`` atomically with its tokenizer,
    its optimizer state when ``cfg.carry_optimizer``, and its adapters under ``adapter/`` beside the merged weights
    with LoRA; write the summary JSON (``metrics_path``) and the per-update history CSV (``history_path``), which
    the stage then logs."""
    from ptg import distributed
    from ptg.models import ADAPTER_DIR, add_lora, eos_ids, load_lm, load_tokenizer
    from ptg.train import Example, load_optimizer, make_optimizer, save_optimizer, train_lm

    mp: ModelParams = load_group("model", ctx.params)
    model, tok = load_lm(src, ctx.device), load_tokenizer(src)
    lora = cfg.lora
    if lora.enabled:
        model = add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, cfg.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train = read_examples("train")
    prompts = encode_prompts_of(tok, model, train, mp)
    targets = encode_targets_of(tok, model, train, mp)
    examples = [Example(p, t) for p, t in zip(prompts, targets, strict=True)]
    sampling = None
    if cfg.objective == "reinforce":
        sp = load_group("sample", ctx.params)
        sampling = SamplingConfig(1, sp.max_new_tokens, sp.temperature, sp.top_k, sp.top_p)
    opt = make_optimizer(model, cfg)
    carried = cfg.carry_optimizer and (src / OPTIMIZER_FILE).exists()
    if carried:
        load_optimizer(opt, src / OPTIMIZER_FILE, cfg.lr)
    t0 = time.perf_counter()
    history = train_lm(model, examples, cfg, tok.pad_token_id, ctx.device, ctx.dtype, guidance, sampling,
                       eos_ids(model, tok), ctx.progress, optimizer=opt)
    seconds = time.perf_counter() - t0
    last = history[-1]
    tokens = sum(h["tokens"] for h in history)
    summary = {"objective": cfg.objective, "guided": guidance is not None, "optimizer_carried": carried,
               "lora_rank": lora.rank, "trainable_parameters": trainable,
               "updates": len(history), "final_loss": last["loss"], "final_nll": last["nll"], "seconds": seconds,
               "tokens_per_second": tokens / seconds, "processes": distributed.rank_and_world()[1]}
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
