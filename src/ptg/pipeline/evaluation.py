"""Evaluating an LM on a task with references, as `evaluate@r` and `baseline` do for summarisation: greedy
predictions on the test split, scored against all references (ROUGE, METEOR), plus the guidance's mean token
reward on them; and the token-reward heatmaps every task draws. Kept apart from ``ptg.pipeline`` so stages that
score nothing do not pay for importing the metrics (nltk)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptg import metrics, schemas
from ptg.config import ModelParams
from ptg.guidance.model import Guidance, token_rewards
from ptg.io import atomic_path, write_json, write_table
from ptg.lm.models import load_lm, load_tokenizer
from ptg.lm.sampling import SamplingConfig
from ptg.pipeline import Context, encode_prompts_of, read_examples, sample_table, viz

HEATMAP_EXAMPLES = 6  # test responses shown in the token-level reward heatmap


def save_heatmaps(tokenizer: PreTrainedTokenizerBase, table: pd.DataFrame, token_ids: list[list[int]],
                  rewards: list[list[float]], stem: Path) -> list[Path]:
    """Token-level reward heatmaps of the first few test responses, as ``stem``.html and ``stem``.png."""
    n = min(HEATMAP_EXAMPLES, len(table))
    tokens = [[tokenizer.decode([t]) for t in ids] for ids in token_ids[:n]]
    titles = [f"{i}: {p[:80]}" for i, p in zip(table["id"][:n], table["prediction"][:n], strict=True)]
    html_path, png_path = stem.with_suffix(".html"), stem.with_suffix(".png")
    with atomic_path(html_path) as tmp:
        tmp.write_text(viz.reward_heatmap_html(tokens, rewards[:n], titles))
    with atomic_path(png_path) as tmp:
        viz.reward_heatmap_png(tokens, rewards[:n], titles, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").rename(tmp)
    return [html_path, png_path]


def evaluate_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test: pd.DataFrame, mp: ModelParams,
                max_new_tokens: int, batch_size: int, ctx: Context, guidance: Guidance | None
                ) -> tuple[pd.DataFrame, dict[str, float], list[list[int]], list[list[float]]]:
    """Greedy predictions on ``test`` scored against all references: a Predictions table, corpus metrics
    (ROUGE-1/2/L/Lsum, METEOR x100, mean length, the guidance's mean token reward when a guidance is given),
    and the predictions' token ids with their token rewards (empty without a guidance)."""
    cfg = SamplingConfig(num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0)
    samples, speed = sample_table(model, tokenizer, test, mp, cfg, batch_size, ctx, generator=None)
    preds = samples["text"].tolist()
    refs = [list(r) for r in test["references"]]
    items = metrics.item_scores(preds, refs)
    table = pd.DataFrame({"id": test["id"].tolist(), "prediction": preds, "references": refs, **items,
                          "n_tokens": samples["n_tokens"].tolist()})
    summary = metrics.summarize(items)
    token_ids = samples["token_ids"].tolist()
    rewards: list[list[float]] = []
    if guidance is not None:
        prompts = encode_prompts_of(tokenizer, model, test, mp)
        rewards = token_rewards(guidance, prompts, token_ids, tokenizer.pad_token_id, ctx.device, ctx.dtype)
        table["guidance_score"] = [sum(r) / len(r) for r in rewards]
        summary["guidance_score"] = float(table["guidance_score"].mean())
        summary |= eos_reward(token_ids, rewards, samples["finished"].tolist())
    else:
        table["guidance_score"] = float("nan")
    summary |= {"gen_tokens": speed["mean_tokens"], "finished_fraction": speed["finished_fraction"],
                "decode_tokens_per_second": speed["tokens_per_second"],
                "meteor_wordnet": float(metrics.meteor_backend() == "wordnet")}
    return table, summary, token_ids, rewards


def eos_reward(token_ids: list[list[int]], rewards: list[list[float]], finished: list[bool]) -> dict[str, float]:
    """The guidance's mean reward on the EOS that ends a finished response against its mean reward on every other
    token: a guidance that pays more for stopping than for content makes PTG's outputs shorter."""
    eos = [r[-1] for r, f in zip(rewards, finished, strict=True) if f]
    other = [x for r, f in zip(rewards, finished, strict=True) for x in (r[:-1] if f else r)]
    return {"reward_eos": sum(eos) / len(eos) if eos else float("nan"),
            "reward_other": sum(other) / len(other) if other else float("nan")}


def evaluate_references(lm_dir: Path, guidance: Guidance | None, predictions_path: Path, metrics_path: Path,
                        ctx: Context, last_round: bool = True, seed: int = 0) -> tuple[dict[str, float], list[Path]]:
    """The evaluation of a task with references (its ``evaluation.evaluate``): evaluate the LM at ``lm_dir`` on the
    ``evaluate.split`` split (its first ``evaluate.subset_items`` items unless ``last_round``) by greedy decoding
    (``seed`` draws nothing); write the Predictions table, the per-item scores (evaluate_items.csv beside the
    metrics JSON), the metrics JSON and, with a guidance, the reward heatmaps beside the predictions. Returns the
    metrics and the files written."""
    mp: ModelParams = ctx.params.model
    ep = ctx.params.evaluate
    model, tok = load_lm(lm_dir, ctx.device, ctx.dtype), load_tokenizer(lm_dir)
    examples = read_examples(ep.split)
    if ep.subset_items and not last_round:
        examples = examples.head(ep.subset_items)
    table, summary, token_ids, rewards = evaluate_lm(model, tok, examples, mp, ep.max_new_tokens, ep.batch_size, ctx,
                                                     guidance)
    write_table(table, predictions_path, schemas.Predictions)
    # Per-example scores beside the metrics (small, kept in git): paired statistics across runs read them.
    with atomic_path(metrics_path.with_name("evaluate_items.csv")) as tmp:
        table.drop(columns=["prediction", "references"]).to_csv(tmp, index=False)
    write_json(metrics_path, summary | {"items": len(table), "split": ep.split, "precision": ctx.precision})
    files = [predictions_path]
    if guidance is not None:
        files += save_heatmaps(tok, table, token_ids, rewards, predictions_path.with_name("heatmap"))
    return summary, files
