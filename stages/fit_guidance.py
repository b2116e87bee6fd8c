"""DVC stage `fit_guidance@r`: fit the token-level guidance to round r's rankings, warm-started from round r-1's.

Groups of K ranked samples of training inputs fit it; those of validation inputs measure it (ListMLE and pairwise
ranking accuracy, with the number of compared pairs). The best validation checkpoint is kept; round 1 never keeps
the untrained (constant) guidance, and a later round that keeps its warm start says so (`kept_start`). The budget
is `fit_guidance.max_updates`, or the round's `fit_guidance_updates` in `rounds`. Writes data/rounds/r/guidance
(safetensors), metrics/rounds/r/fit_guidance.json (with the spread of the token rewards on the held-out samples
before and after: `reward_cv_start`, `reward_cv`, ...), fit_guidance_history.csv (the per-update curve) and
guidance_groups.csv (every sample's preference, guidance score e_phi and length, for held-out statistics).
With preference data (`preferences.path`, stage `preferences`), a `preferences.weight` share of the training
groups are preference groups, round 1 may first fit `preferences.prior_updates` updates on them alone (a prior
guidance it warm-starts from), and the metrics add the guidance's accuracy on the held-out preference groups.
Run: python stages/fit_guidance.py --round r [--params params.yaml]
"""

import dataclasses
import logging
from typing import Any

import pandas as pd

from ptg import config, pipeline, schemas, tasks, tracking
from ptg.guidance import diagnostics, preferences
from ptg.guidance.model import (
    Guidance,
    RankedGroup,
    evaluate_guidance,
    fit_guidance,
    group_scores,
    load_guidance,
    reward_spread,
    save_guidance,
    token_rewards,
)
from ptg.io import atomic_path, read_table, write_json
from ptg.lm import distributed
from ptg.lm.models import load_tokenizer

log = logging.getLogger(__name__)


def _groups(merged: pd.DataFrame, prompts: dict[str, list[int]]) -> list[RankedGroup]:
    return [RankedGroup(prompts[i], [list(map(int, t)) for t in g["token_ids"]], g["score"].tolist())
            for i, g in merged.groupby("id", sort=True)]


def _check_ranked(samples: pd.DataFrame, rankings: pd.DataFrame, r: int) -> None:
    """Every sample has a rank and every rank a sample: a rankings table of another sample@r run (another K, other
    ids) is an error naming the first (id, sample_idx) pairs on each side, not a silently smaller group."""
    keys = ["id", "sample_idx"]
    both = samples[keys].merge(rankings[keys], on=keys, how="outer", indicator=True)
    problems = []
    for side, what in (("left_only", "samples.parquet has samples that rankings.parquet does not rank"),
                       ("right_only", "rankings.parquet ranks samples that samples.parquet does not have")):
        rows = both[both["_merge"] == side]
        if not rows.empty:
            shown = ", ".join(f"({i!r}, {int(k)})" for i, k in zip(rows["id"][:5], rows["sample_idx"][:5], strict=True))
            problems.append(f"{what}: {len(rows)} (id, sample_idx) pair(s), e.g. {shown}")
    if problems:
        raise ValueError(f"{pipeline.round_dir(r)}: " + "; ".join(problems) + f" (rank@{r} ran on other samples: "
                         f"`dvc repro rank@{r}` ranks these)")


OCCLUSION_SAMPLES = 64  # held-out samples whose tokens are dropped one by one (occlusion credit)


def _diagnostics(guidance: Guidance, val: list[RankedGroup], val_ids: list[str], inputs: pd.DataFrame,
                 cfg: config.FitConfig, tok: Any, ctx: pipeline.Context) -> dict[str, float]:
    """Whether the fitted guidance knows which samples and which tokens were better, on held-out samples
    (``ptg.guidance.diagnostics``; ``val_ids``: the id of each of ``val``'s groups): accuracy on clear pairs (the
    within-sample CV of its token rewards is reward_cv), and the mean Spearman correlation of its token rewards
    with occlusion credit on up to ``OCCLUSION_SAMPLES`` samples, scored by the sequence-level preference that
    trains the LM (a metric against the references, or the prompt task's gap reward on the training texts; none
    for human scores or a reward model)."""
    scores = group_scores(guidance, val, cfg, tok.pad_token_id, ctx.device, ctx.dtype)
    clear = diagnostics.clear_pair_accuracy(scores, [g.scores for g in val])
    out = {"val_accuracy_clear": clear["accuracy"], "val_pairs_clear": clear["pairs"], "clear_margin": clear["margin"]}
    try:
        score = tasks.scoring(ctx.params).sample_scorer(tok, ctx)
    except ValueError as e:
        log.info("no occlusion credit: %s", e)
        return out
    refs = dict(zip(inputs["id"], inputs["references"], strict=True)) if "references" in inputs else {}
    picked = [(g, i, s) for g, i in zip(val, val_ids, strict=True) for s in g.responses if len(s) >= 2]
    picked = picked[:OCCLUSION_SAMPLES]
    rewards = token_rewards(guidance, [g.prompt for g, _, _ in picked], [s for _, _, s in picked], tok.pad_token_id,
                            ctx.device, ctx.dtype)
    full, dropped = [], []
    for _, i, s in picked:
        variants = [s, *diagnostics.occlusions(s)]
        values = score([refs.get(i, [])], [variants])[0]
        full.append(values[0])
        dropped.append(values[1:])
    agreement = diagnostics.occlusion_agreement(rewards, full, dropped)
    return out | {"occlusion_spearman": agreement["spearman"], "occlusion_samples": agreement["samples"],
                  "occlusion_undefined": agreement["undefined"]}


def main(r: int, path: str = "params.yaml") -> None:
    ctx = pipeline.start(f"fit_guidance@{r}", config.load(path))
    params = ctx.params
    mp, fp = params.model, params.budget("fit_guidance", r)
    samples = read_table(pipeline.round_dir(r) / "samples.parquet", schemas.Samples)
    rankings = read_table(pipeline.round_dir(r) / "rankings.parquet", schemas.Rankings)
    _check_ranked(samples, rankings, r)
    task = tasks.data(params)
    examples = task.inputs_of(samples["id"].unique(), params)
    guidance = load_guidance(pipeline.round_dir(r - 1) / "guidance", fp.head_hidden, fp.squash, fp.head_init_gain)
    tok = load_tokenizer(pipeline.round_dir(0) / "lm")
    prompts = dict(zip(examples["id"], task.encode_inputs(tok, guidance.backbone, examples, params), strict=True))
    merged = samples.merge(rankings, on=["id", "sample_idx"], validate="one_to_one").sort_values(["id", "sample_idx"])
    merged["split"] = merged["id"].map(dict(zip(examples["id"], examples["split"], strict=True)))
    by_split = {s: merged[merged["split"] == s] for s in ("train", "validation")}
    train, val = (_groups(by_split[s], prompts) for s in ("train", "validation"))
    cfg = fp.fit_config()
    cfg = dataclasses.replace(cfg, seed=ctx.seed("fit_guidance", r))
    pp = params.preferences
    prefs = read_table(pipeline.PREFERENCES, schemas.Preferences)
    pref_train, pref_val = ([] if prefs.empty or not (prefs["split"] == s).any() else preferences.ranked_groups(
        prefs[prefs["split"] == s], tok, guidance.backbone, pp, mp) for s in ("train", "validation"))
    extra = {}
    if r == 1 and pref_train and pp.prior_updates:
        prior_cfg = dataclasses.replace(cfg, max_updates=pp.prior_updates)
        prior = fit_guidance(guidance, pref_train, pref_val or val, prior_cfg, tok.pad_token_id, ctx.device, ctx.dtype,
                             ctx.progress)
        extra |= {"prior_updates": prior.updates, "prior_val_accuracy": prior.best_val_accuracy}
    fitted_on = preferences.mix_groups(train, pref_train, pp.weight, cfg.seed)
    spread_start = reward_spread(guidance, val, tok.pad_token_id, ctx.device, ctx.dtype)
    result = fit_guidance(guidance, fitted_on, val, cfg, tok.pad_token_id, ctx.device, ctx.dtype, ctx.progress)
    if not distributed.is_main():  # data-parallel fitting (accelerate launch): rank 0 holds the same guidance
        return
    out = pipeline.round_dir(r) / "guidance"
    with atomic_path(out) as tmp:
        save_guidance(guidance.cpu(), tmp)
        tok.save_pretrained(tmp / "backbone")  # self-contained: `ptg guidance score` and MLflow's pyfunc need it
    start = result.history[0]
    summary = {"val_loss": result.best_val_loss, "val_accuracy": result.best_val_accuracy,
               "val_pairs": result.val_pairs, "best_update": result.best_update, "kept_start": result.kept_start,
               "updates": result.updates, "val_loss_start": start["val_loss"],
               "val_accuracy_start": start["val_accuracy"], "train_groups": len(train), "val_groups": len(val),
               "fitted_groups": len(fitted_on), "preference_train_groups": len(pref_train), **extra,
               "precision": ctx.precision,
               # How far the token rewards moved from the starting head's (on the held-out samples).
               **{f"reward_{k}_start": v for k, v in spread_start.items()},
               **{f"reward_{k}": v for k, v in reward_spread(guidance, val, tok.pad_token_id, ctx.device,
                                                              ctx.dtype).items()}}
    val_ids = sorted(by_split["validation"]["id"].unique())  # the order of _groups
    summary |= _diagnostics(guidance, val, val_ids, examples, cfg, tok, ctx)
    if pref_val:
        held = evaluate_guidance(guidance, pref_val, cfg, tok.pad_token_id, ctx.device, ctx.dtype)
        summary |= {"preferences_val_accuracy": held["accuracy"], "preferences_val_pairs": held["pairs"]}
    metrics_file = pipeline.round_metrics(r, "fit_guidance")
    history_file = pipeline.round_metrics(r, "fit_guidance_history").with_suffix(".csv")
    write_json(metrics_file, summary)
    with atomic_path(history_file) as tmp:
        pd.DataFrame(result.history).to_csv(tmp, index=False)
    frames = []
    for split, groups in (("train", train), ("validation", val)):
        scores = group_scores(guidance, groups, cfg, tok.pad_token_id, ctx.device, ctx.dtype)
        frames.append(by_split[split][["id", "sample_idx", "split", "score", "n_tokens", "finished"]]
                      .rename(columns={"score": "preference"}).assign(guidance=[x for row in scores for x in row]))
    with atomic_path(pipeline.round_metrics(r, "guidance_groups").with_suffix(".csv")) as tmp:
        pd.concat(frames).to_csv(tmp, index=False)
    tracking.log_stage("fit_guidance", r, dataclasses.asdict(cfg), metrics_file, history=history_file, model_dir=out,
                       registered_name=tracking.GUIDANCE_MODEL)


if __name__ == "__main__":
    pipeline.cli(main, __doc__)
