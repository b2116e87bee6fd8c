"""Guidance from a preference file alone: fit it, report held-out accuracy, score texts with it.

``fit`` fits a token-level guidance (the policy's truncated backbone + head, params' ``model`` and
``fit_guidance`` groups) on a listwise or pairwise preference file (``ptg.guidance.preferences``), then reports its
held-out pairwise accuracy with a bootstrap 95 % CI against chance, against ranking by length and, with
references, against ROUGE-L and METEOR; writes token-reward heatmaps of held-out candidates (HTML + PNG); and
tracks the run in MLflow like a stage (``fit_preferences``). ``score`` writes every token's reward and each
text's score for a file of (input, text) rows.

Run: ptg guidance fit FILE --out DIR [--params params.yaml] [--updates N]
     ptg guidance eval GUIDANCE FILE --out DIR [--tokenizer DIR]   (any guidance)
     ptg guidance score GUIDANCE FILE --out FILE.jsonl [--tokenizer DIR]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ptg import stats
from ptg.config import Params, PreferencesParams
from ptg.guidance.preferences import as_text, load, ranked_groups, require_columns
from ptg.io import read_records


def heldout_report(long: pd.DataFrame, scores: list[float], n_tokens: list[int], fit: pd.DataFrame | None = None,
                   fit_tokens: list[int] | None = None) -> dict[str, Any]:
    """Pairwise accuracy of ``scores`` (one per row of ``long``, the held-out rows) with a bootstrap 95 % CI over
    groups and its p against chance; the same for ranking by length in tokens (direction chosen on ``fit`` rows
    when given) and, when the rows have references, for ROUGE-L and METEOR of each candidate against them; and
    the paired difference guidance - length."""
    from ptg import metrics

    frame = long.assign(id=long["group"], preference=long["score"], guidance=scores, n_tokens=n_tokens)
    fit_frame = None if fit is None else fit.assign(id=fit["group"], preference=fit["score"], n_tokens=fit_tokens)
    report: dict[str, Any] = stats.guidance_vs_length(frame, fit_frame)
    if (frame["reference"] != "").all():
        refs = [[r] for r in frame["reference"]]
        for name in ("rouge", "meteor"):
            metric = frame.assign(m=metrics.score(name, frame["text"].tolist(), refs))
            report[f"{name}_vs_reference"] = stats.accuracy_ci(stats.pairwise_agreement(metric, "m"))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The held-out table as markdown: one row per scorer."""
    lines = ["| scorer | pairwise accuracy [95% CI] | p vs chance | groups | pairs |", "|---|---|---|---|---|"]
    names = {"guidance": "guidance", "length": "length (direction fitted on train)",
             "rouge_vs_reference": "ROUGE-L vs reference", "meteor_vs_reference": "METEOR vs reference"}
    for key, label in names.items():
        if key in report:
            r = report[key]
            lines.append(f"| {label} | {r['accuracy']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['p_vs_chance']:.4f} "
                         f"| {int(r['groups'])} | {int(r['pairs'])} |")
    d = report["guidance_minus_length"]
    lines.append(f"\nguidance − length: {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (p {d['p_value']:.4f})")
    return "\n".join(lines)


def fit_file(pp: PreferencesParams, out: Path, params: Params, base: Path | None = None,
             max_updates: int | None = None) -> dict[str, Any]:
    """Fit a guidance on the preference data of ``pp`` alone; write out/guidance, out/heldout.{json,md},
    out/heldout_candidates.csv and out/heatmap.{html,png}; track it in MLflow like a stage (``fit_preferences``).
    The backbone and tokenizer come from ``base`` (a folder with lm/ and guidance/backbone, e.g. data/rounds/0 of a
    pipeline), else are materialised from params' ``model`` group into out/base."""
    from ptg import tracking
    from ptg.guidance.model import fit_guidance, load_guidance, save_guidance
    from ptg.io import atomic_path
    from ptg.lm.base_models import materialize_base
    from ptg.lm.models import load_tokenizer
    from ptg.pipeline import start

    ctx = start("fit_preferences", params)
    mp, fp = params.model, params.fit_guidance
    if base is None:
        base = out / "base"
        if not (base / "lm" / "config.json").is_file():
            materialize_base(mp, base, params.run.seed)
    tok = load_tokenizer(base / "lm")
    guidance = load_guidance(base / "guidance", fp.head_hidden, fp.squash, fp.head_init_gain)
    long, counts = load(pp)
    fit_rows, val_rows = (long[long["split"] == s].reset_index(drop=True) for s in ("train", "validation"))
    if fit_rows.empty or val_rows.empty:
        raise ValueError(f"{pp.path}: need groups in both splits; got {counts}")
    train, val = (ranked_groups(f, tok, guidance.backbone, pp, mp) for f in (fit_rows, val_rows))
    cfg = fp.fit_config()
    cfg = dataclasses.replace(cfg, seed=pp.seed, max_updates=max_updates or fp.max_updates)
    result = fit_guidance(guidance, train, val, cfg, tok.pad_token_id, ctx.device, ctx.dtype, ctx.progress)
    with atomic_path(out / "guidance") as tmp:
        save_guidance(guidance.cpu(), tmp)
        tok.save_pretrained(tmp / "backbone")  # `score` reads texts with the guidance's own tokenizer
    summary = {"val_loss": result.best_val_loss, "val_accuracy": result.best_val_accuracy,
               "val_pairs": result.val_pairs, "best_update": result.best_update, "updates": result.updates, **counts}
    report, files = write_heldout(guidance, tok, (fit_rows, train), (val_rows, val), cfg, ctx, out, summary)
    tracking.log_stage("fit_preferences", None, dataclasses.asdict(pp) | {"fit_guidance": dataclasses.asdict(cfg)},
                       summary | {f"heldout_{k}_accuracy": v["accuracy"] for k, v in report.items() if "accuracy" in v},
                       history=pd.DataFrame(result.history), artifacts=files,
                       model_dir=out / "guidance", registered_name="ptg-guidance", step_metrics_on_parent=False)
    return {"summary": summary, "report": report}


def write_heldout(guidance: Any, tok: Any, fit: tuple[pd.DataFrame, list[Any]], held: tuple[pd.DataFrame, list[Any]],
                  cfg: Any, ctx: Any, out: Path, summary: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    """Score the held-out groups with ``guidance`` and write out/heldout.{json,md}, out/heldout_candidates.csv and
    out/heatmap.{html,png}; ``fit`` (rows, groups) chooses the length heuristic's direction. Returns the report and
    the files written."""
    from ptg.guidance.model import group_scores, token_rewards
    from ptg.io import atomic_path, write_json
    from ptg.pipeline.evaluation import save_heatmaps

    (fit_rows, fit_groups), (rows, groups) = fit, held
    scores = [x for row in group_scores(guidance, groups, cfg, tok.pad_token_id, ctx.device, ctx.dtype) for x in row]
    lengths = [len(r) for g in groups for r in g.responses]
    fit_lengths = [len(r) for g in fit_groups for r in g.responses]
    report = heldout_report(rows, scores, lengths, fit_rows if fit_lengths else None, fit_lengths or None)
    write_json(out / "heldout.json", {"summary": summary, "report": report})
    with atomic_path(out / "heldout.md") as tmp:
        tmp.write_text(format_report(report) + "\n")
    with atomic_path(out / "heldout_candidates.csv") as tmp:
        rows.assign(guidance=scores, n_tokens=lengths).to_csv(tmp, index=False)
    responses = [r for g in groups for r in g.responses]
    rewards = token_rewards(guidance, [g.prompt for g in groups for _ in g.responses], responses, tok.pad_token_id,
                            ctx.device, ctx.dtype)
    shown = pd.DataFrame({"id": rows["group"], "prediction": [f"score {s:g}: {t}" for s, t in
                                                               zip(rows["score"], rows["text"], strict=True)]})
    files = save_heatmaps(tok, shown, responses, rewards, out / "heatmap")
    return report, [out / "heldout.json", out / "heldout.md", out / "heldout_candidates.csv", *files]


def evaluate_file(guidance_dir: Path, pp: PreferencesParams, out: Path, params: Params,
                  tokenizer: Path | None = None) -> dict[str, Any]:
    """The held-out table of any guidance (a pipeline round's, or one ``fit`` made) on the held-out groups of the
    preference data of ``pp`` (its validation split; the train split chooses the length direction), written like
    ``fit``'s and tracked in MLflow as ``evaluate_preferences``."""
    from ptg import tracking
    from ptg.guidance.model import load_guidance
    from ptg.pipeline import start

    ctx = start("evaluate_preferences", params)
    mp, fp = params.model, params.fit_guidance
    guidance, tok = load_guidance(guidance_dir), _tokenizer(guidance_dir, tokenizer)
    long, counts = load(pp)
    fit_rows, val_rows = (long[long["split"] == s].reset_index(drop=True) for s in ("train", "validation"))
    if val_rows.empty:
        raise ValueError(f"{pp.path}: no held-out groups to evaluate on; got {counts}")
    groups = [ranked_groups(f, tok, guidance.backbone, pp, mp) if len(f) else [] for f in (fit_rows, val_rows)]
    cfg = fp.fit_config()
    report, files = write_heldout(guidance, tok, (fit_rows, groups[0]), (val_rows, groups[1]), cfg, ctx, out,
                                  {"guidance": str(guidance_dir), **counts})
    tracking.log_stage("evaluate_preferences", None, dataclasses.asdict(pp),
                       {f"heldout_{k}_accuracy": v["accuracy"] for k, v in report.items() if "accuracy" in v},
                       artifacts=files, step_metrics_on_parent=False)
    return report


def _tokenizer(guidance_dir: Path, tokenizer: Path | None) -> Any:
    from ptg.lm.models import load_tokenizer

    tokenizer = tokenizer or guidance_dir / "backbone"
    if not any((tokenizer / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{tokenizer}: no tokenizer here; pass --tokenizer (e.g. data/rounds/0/lm)")
    return load_tokenizer(tokenizer)


def score_file(guidance_dir: Path, path: Path, out: Path, pp: PreferencesParams,
               params: Params, tokenizer: Path | None = None) -> pd.DataFrame:
    """Per-token and per-sequence guidance scores of the texts in ``path`` (columns input and text, named as in
    ``pp``): writes ``out`` (parquet or jsonl by suffix) with tokens, token_rewards and score (their mean). The
    tokenizer is ``tokenizer`` or the one saved beside the backbone (``fit`` saves it; a pipeline round's guidance
    needs ``--tokenizer data/rounds/0/lm``)."""
    from ptg.guidance.model import load_guidance, token_rewards
    from ptg.io import atomic_path
    from ptg.lm.encoding import encode_prompts, encode_responses, turn_end_id
    from ptg.lm.models import is_seq2seq
    from ptg.pipeline import start

    ctx = start("score_preferences", params)
    mp = params.model
    raw = read_records(path)
    require_columns(raw, str(path), {"input_field": pp.input_field, "text_field": pp.text_field})
    guidance, tok = load_guidance(guidance_dir), _tokenizer(guidance_dir, tokenizer)
    prompts = encode_prompts(tok, [pp.prompt(as_text(x)) for x in raw[pp.input_field]],
                             mp.max_prompt_tokens, is_seq2seq(guidance.backbone))
    responses = encode_responses(tok, raw[pp.text_field].map(as_text).tolist(), mp.max_target_tokens,
                                 turn_end_id(guidance.backbone, tok))
    rewards = token_rewards(guidance, prompts, responses, tok.pad_token_id, ctx.device, ctx.dtype)
    table = raw.assign(tokens=[[tok.decode([t]) for t in r] for r in responses], token_rewards=rewards,
                       score=[float(np.mean(r)) for r in rewards])
    with atomic_path(out) as tmp:
        if out.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_json(tmp, orient="records", lines=True, force_ascii=False)
    return table
