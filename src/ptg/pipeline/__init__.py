"""The pipeline: the DVC stages' runtime (here) and the bodies they share (the modules of this package).

Here: artifact paths, a stage's start (``start``: logging, the params read once, device, precision, seeds; the
``Context``), reading the prepared examples as token ids, and turning samples into tables. The modules:
``training`` (an LM trained from one folder into another, as train_lm@r and the baseline do), ``evaluation``
(greedy predictions and their scores), ``round_report`` (PTG against the baseline, round by round: the report
stage), ``sources`` (fingerprints of the local paths params name), ``annotation`` (people's scores of a round's
samples), ``viz`` (heatmaps and plots). The stages stay a dozen lines each; the math stays in ``ptg.losses``, the
learning in ``ptg.guidance.model`` and ``ptg.lm.train``. torch and transformers are imported only by the functions
that use them, so a stage that loads no model (prepare, preferences, rank with a metric, report) starts without
them (``start(..., with_torch=False)``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ptg import schemas
from ptg.config import ModelParams, Params, SamplingConfig
from ptg.io import read_table

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


def baseline_metrics(r: int, stage: str) -> Path:
    """What the baseline arm's ``stage`` wrote for round r (its train_lm and evaluate)."""
    return METRICS / "baseline" / str(r) / f"{stage}.json"


@dataclass(frozen=True)
class Context:
    """What every stage needs: its params (read once, at its start), device and autocast dtype."""

    params: Params
    device: torch.device | None  # None for a stage started without torch
    dtype: torch.dtype | None

    def seed(self, stage: str, r: int = 0) -> int:
        """A seed per (base seed, stage, round), stable across Python processes."""
        digest = hashlib.sha256(f"{self.params.run.seed}/{stage}/{r}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def generator(self, stage: str, r: int = 0) -> torch.Generator:
        import torch

        return torch.Generator().manual_seed(self.seed(stage, r))

    @property
    def precision(self) -> str:
        """What the stage's matmuls compute in (``bf16`` or ``fp32``), for its metrics JSON."""
        return "bf16" if str(self.dtype) == "torch.bfloat16" else "fp32"

    @property
    def progress(self) -> bool:
        return self.params.run.progress and not os.environ.get("CI") and os.environ.get("RANK", "0") == "0"


def cli(main: Callable[..., None], doc: str | None, per_round: bool = True) -> None:
    """The command line of a stage script: ``[--round R] [--params params.yaml]``, then ``main(R, params)``."""
    import typer

    params_opt = typer.Option("params.yaml", "--params", help="params file")
    if per_round:
        def command(round_: int = typer.Option(..., "--round", help="the PTG round (1, 2, ...)"),
                    params: str = params_opt) -> None:
            main(round_, params)
    else:
        def command(params: str = params_opt) -> None:  # type: ignore[misc]
            main(params)
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command(help=doc)(command)
    app()


def start(stage: str, params: Params, with_torch: bool = True) -> Context:
    """Configure logging for ``stage``; with ``with_torch`` (a stage that runs a model) also resolve the device and
    precision and seed torch. Without it, torch is never imported."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")
    run = params.run
    if not with_torch:
        return Context(params, None, None)
    import torch

    from ptg.lm import distributed
    from ptg.lm.precision import resolve_device, resolve_precision

    distributed.init_from_env()  # under `accelerate launch --num_processes N`: data-parallel train_lm
    device = resolve_device(run.device)
    dtype = resolve_precision(run.precision, device, *policy_shape())
    torch.manual_seed(run.seed)
    log.info("device %s, compute dtype %s", device, dtype)
    return Context(params, device, dtype)


def policy_shape() -> tuple[int, int]:
    """(hidden size, intermediate size) of the base policy (data/rounds/0/lm), what ``precision: auto`` probes;
    (0, 0) before base_model has run."""
    path = round_dir(0) / "lm" / "config.json"
    if not path.is_file():
        return 0, 0
    cfg = json.loads(path.read_text())
    width = cfg.get("hidden_size") or cfg.get("d_model") or 0
    return int(width), int(cfg.get("intermediate_size") or cfg.get("d_ff") or 0)


def read_examples(*splits: str) -> pd.DataFrame:
    """The prepared examples of ``splits`` (validated), in one frame."""
    return pd.concat([read_table(PREPARED / f"{s}.parquet", schemas.Examples) for s in splits], ignore_index=True)


def encode_prompts_of(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                      mp: ModelParams) -> list[list[int]]:
    """Prompt token ids of ``frame`` (chat template for decoder-only models that have one)."""
    from ptg.lm.encoding import encode_prompts
    from ptg.lm.models import is_seq2seq

    return encode_prompts(tokenizer, frame["prompt"].tolist(), mp.max_prompt_tokens, is_seq2seq(model))


def encode_targets_of(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                      mp: ModelParams) -> list[list[int]]:
    """Reference token ids of ``frame``, ending with the token the model ends its own turn with (``turn_end_id``:
    e.g. ``<|im_end|>`` for a ChatML model, however its EOS ids sort)."""
    from ptg.lm.encoding import encode_responses, turn_end_id

    return encode_responses(tokenizer, frame["target"].tolist(), mp.max_target_tokens, turn_end_id(model, tokenizer))


def sample_table(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, mp: ModelParams,
                 cfg: SamplingConfig, batch_size: int, ctx: Context, generator: torch.Generator | None,
                 prompts: list[list[int]] | None = None, stops: list[int] | None = None
                 ) -> tuple[pd.DataFrame, dict[str, float]]:
    """K continuations of every row of ``frame`` as a Samples table, plus throughput figures. ``prompts``: the
    rows' input ids (default: their encoded ``prompt``); ``stops``: the ids that end a sample (default: the EOS
    ids; empty: every sample is ``max_new_tokens`` long, as a prompt policy's)."""
    from ptg.lm.encoding import eos_ids
    from ptg.lm.sampling import sample

    prompts = encode_prompts_of(tokenizer, model, frame, mp) if prompts is None else prompts
    stops = eos_ids(model, tokenizer) if stops is None else stops
    t0 = time.perf_counter()
    drawn = sample(model, prompts, cfg, stops, tokenizer.pad_token_id, ctx.device, ctx.dtype, batch_size,
                   generator, ctx.progress)
    seconds = time.perf_counter() - t0
    rows = []
    for ex_id, group in zip(frame["id"], drawn, strict=True):
        for k, ids in enumerate(group):
            rows.append({"id": ex_id, "sample_idx": k, "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                         "token_ids": ids, "n_tokens": len(ids), "finished": not stops or ids[-1] in stops})
    table = pd.DataFrame(rows)
    n_tokens = int(table["n_tokens"].sum())
    return table, {"seconds": seconds, "tokens": n_tokens, "tokens_per_second": n_tokens / max(seconds, 1e-9),
                   "mean_tokens": float(table["n_tokens"].mean()), "finished_fraction": float(table["finished"].mean())}


# ---------------------------------------------------------------------------------------------------------------
# The data concern of a task whose examples have references (schema Examples: summarisation's, copy's), which its
# ``data`` module re-exports (``ptg.tasks.TaskData``)
# ---------------------------------------------------------------------------------------------------------------


def round_inputs(ctx: Context, r: int) -> pd.DataFrame:
    """The inputs sample@r samples K continuations of: ``sample.train_inputs`` training inputs (a fresh seeded draw
    each round) and the first ``sample.validation_inputs`` validation ones."""
    sp = ctx.params.sample
    train, val = read_examples("train"), read_examples("validation")
    train = train.sample(n=min(sp.train_inputs, len(train)), random_state=ctx.seed("sample", r))
    return pd.concat([train, val.head(sp.validation_inputs)], ignore_index=True)


def inputs_of(ids: Sequence[str], params: Params) -> pd.DataFrame:
    """The examples with these ids, for fit_guidance."""
    examples = read_examples("train", "validation")
    return examples[examples["id"].isin(set(ids))]


def encode_inputs(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, frame: pd.DataFrame,
                  params: Params) -> list[list[int]]:
    """The encoded prompts."""
    return encode_prompts_of(tokenizer, model, frame, params.model)


def stops(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: Params) -> list[int]:
    """The EOS ids (``ptg.lm.encoding.eos_ids``: the tokenizer's, the generation config's, the chat turn's end)."""
    from ptg.lm.encoding import eos_ids

    return eos_ids(model, tokenizer)


def training_inputs(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, cfg: object,
                    params: Params) -> list[tuple[list[int], list[int], tuple[str, ...]]]:
    """What train_lm trains on: the training split's (prompt, reference response, references)."""
    mp = params.model
    train = read_examples("train")
    prompts = encode_prompts_of(tokenizer, model, train, mp)
    targets = encode_targets_of(tokenizer, model, train, mp)
    return [(p, t, tuple(refs)) for p, t, refs in zip(prompts, targets, train["references"], strict=True)]
