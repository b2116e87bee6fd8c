"""Evaluating an LM as `evaluate@r` and `baseline` do: greedy predictions on the test split, scored against all
references (ROUGE, METEOR), plus the guidance's mean token reward on them. Kept apart from ``ptg.pipeline`` so
stages that score nothing do not pay for importing the metrics (nltk)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptg import metrics, schemas
from ptg.config import ModelParams, load_group
from ptg.guidance import Guidance
from ptg.io import write_json, write_table
from ptg.models import collate, load_lm, load_tokenizer
from ptg.pipeline import Context, encode_prompts_of, read_examples, sample_table
from ptg.precision import autocast
from ptg.sampling import SamplingConfig


@torch.no_grad()
def mean_token_reward(guidance: Guidance, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      ctx: Context, batch_size: int = 16) -> list[float]:
    """Mean guidance reward over the tokens of each response."""
    guidance.to(ctx.device).eval()
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        batch = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_id).to(ctx.device)
        with autocast(ctx.device, ctx.dtype):
            r = guidance(batch).float()
        out.extend((r.sum(-1) / batch.response_mask.sum(-1)).tolist())
    return out


def evaluate_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test: pd.DataFrame, mp: ModelParams,
                max_new_tokens: int, batch_size: int, ctx: Context, guidance: Guidance | None
                ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Greedy predictions on ``test`` scored against all references: a Predictions table and corpus metrics
    (ROUGE-1/2/L/Lsum, METEOR x100, mean length, the guidance's mean token reward when a guidance is given)."""
    cfg = SamplingConfig(num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0)
    samples, speed = sample_table(model, tokenizer, test, mp, cfg, batch_size, ctx, generator=None)
    preds = samples["text"].tolist()
    refs = [list(r) for r in test["references"]]
    rouge = metrics.rouge_scores(preds, refs)
    table = pd.DataFrame({"id": test["id"].tolist(), "prediction": preds, "references": refs,
                          "rougeL": rouge["rougeL"], "meteor": metrics.meteor(preds, refs)})
    summary = metrics.summary(preds, refs)
    if guidance is not None:
        prompts = encode_prompts_of(tokenizer, model, test, mp)
        table["guidance_score"] = mean_token_reward(guidance, prompts, samples["token_ids"].tolist(),
                                                    tokenizer.pad_token_id, ctx)
        summary["guidance_score"] = float(table["guidance_score"].mean())
    else:
        table["guidance_score"] = float("nan")
    summary |= {"gen_tokens": speed["mean_tokens"], "decode_tokens_per_second": speed["tokens_per_second"],
                "meteor_wordnet": float(metrics.meteor_backend() == "wordnet")}
    return table, summary


def evaluate_and_save(lm_dir: Path, guidance: Guidance | None, predictions_path: Path, metrics_path: Path,
                      ctx: Context) -> dict[str, float]:
    """Evaluate the LM at ``lm_dir`` on the test split; write the Predictions table and the metrics JSON."""
    mp: ModelParams = load_group("model", ctx.params)
    ep = load_group("evaluate", ctx.params)
    model, tok = load_lm(lm_dir, ctx.device), load_tokenizer(lm_dir)
    table, summary = evaluate_lm(model, tok, read_examples("test"), mp, ep.max_new_tokens, ep.batch_size, ctx,
                                 guidance)
    write_table(table, predictions_path, schemas.Predictions)
    write_json(metrics_path, summary)
    return summary
