"""DVC stage `fit_guidance@r`: fit the token-level guidance to round r's rankings, warm-started from round r-1's.

Groups of K ranked samples of training inputs fit it; those of validation inputs measure it (ListMLE and pairwise
ranking accuracy). The best validation checkpoint is kept. Writes data/rounds/r/guidance (safetensors) and
metrics/rounds/r/fit_guidance.json (+ fit_guidance_history.csv, the per-update curve).
Run: python stages/fit_guidance.py --round r [--params params.yaml]
"""

import dataclasses

import pandas as pd

from ptg import pipeline, schemas, tracking
from ptg.config import load_group
from ptg.guidance import FitConfig, RankedGroup, fit_guidance, load_guidance, save_guidance
from ptg.io import atomic_path, read_table, write_json
from ptg.models import load_tokenizer


def _groups(samples: pd.DataFrame, rankings: pd.DataFrame, prompts: dict[str, list[int]]) -> list[RankedGroup]:
    merged = samples.merge(rankings, on=["id", "sample_idx"], validate="one_to_one").sort_values(["id", "sample_idx"])
    return [RankedGroup(prompts[i], [list(map(int, t)) for t in g["token_ids"]], g["score"].tolist())
            for i, g in merged.groupby("id", sort=True)]


def main(r: int, params: str = "params.yaml") -> None:
    ctx = pipeline.start(f"fit_guidance@{r}", params)
    mp, fp = load_group("model", params), load_group("fit_guidance", params)
    samples = read_table(pipeline.round_dir(r) / "samples.parquet", schemas.Samples)
    rankings = read_table(pipeline.round_dir(r) / "rankings.parquet", schemas.Rankings)
    examples = pipeline.read_examples("train", "validation")
    examples = examples[examples["id"].isin(samples["id"])]
    guidance = load_guidance(pipeline.round_dir(r - 1) / "guidance", fp.head_hidden, fp.squash)
    tok = load_tokenizer(pipeline.round_dir(0) / "lm")
    prompts_ids = pipeline.encode_prompts_of(tok, guidance.backbone, examples, mp)
    prompts = dict(zip(examples["id"], prompts_ids, strict=True))
    split = dict(zip(examples["id"], examples["split"], strict=True))
    train = _groups(samples[samples["id"].map(split) == "train"], rankings, prompts)
    val = _groups(samples[samples["id"].map(split) == "validation"], rankings, prompts)
    cfg = FitConfig(**{f.name: getattr(fp, f.name) for f in dataclasses.fields(FitConfig)})
    cfg = dataclasses.replace(cfg, seed=ctx.seed("fit_guidance", r))
    result = fit_guidance(guidance, train, val, cfg, tok.pad_token_id, ctx.device, ctx.dtype, ctx.progress)
    out = pipeline.round_dir(r) / "guidance"
    with atomic_path(out) as tmp:
        save_guidance(guidance.cpu(), tmp)
    start = result.history[0]
    summary = {"val_loss": result.best_val_loss, "val_accuracy": result.best_val_accuracy,
               "best_update": result.best_update, "updates": result.updates, "val_loss_start": start["val_loss"],
               "val_accuracy_start": start["val_accuracy"], "train_groups": len(train), "val_groups": len(val)}
    write_json(pipeline.round_metrics(r, "fit_guidance"), summary)
    history = pd.DataFrame(result.history)
    with atomic_path(pipeline.round_metrics(r, "fit_guidance_history").with_suffix(".csv")) as tmp:
        history.to_csv(tmp, index=False)
    tracking.log_stage("fit_guidance", r, dataclasses.asdict(cfg), summary, history=history, model_dir=out,
                       registered_name="ptg-guidance")


if __name__ == "__main__":
    pipeline.cli(main, __doc__)
