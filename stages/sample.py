"""DVC stage `sample@r`: K samples per input from LM_{r-1} (round 0's LM is the base model).

Samples `sample.train_inputs` training inputs (a fresh seeded draw each round) and the first
`sample.validation_inputs` validation inputs (a fixed subset, so guidance validation is comparable across
rounds); the prompt task's inputs are that many groups of K prompts (the task's `round_inputs`).
Writes data/rounds/r/samples.parquet (schema Samples) and metrics/rounds/r/sample.json.
Run: python stages/sample.py --round r [--params params.yaml]
"""

import dataclasses

from ptg import config, pipeline, schemas, tasks, tracking
from ptg.io import write_json, write_table
from ptg.lm.models import load_lm, load_tokenizer
from ptg.lm.sampling import SamplingConfig


def main(r: int, path: str = "params.yaml") -> None:
    ctx = pipeline.start(f"sample@{r}", config.load(path))
    params = ctx.params
    mp, sp = params.model, params.sample
    task = tasks.data(params)
    frame = task.round_inputs(ctx, r)
    lm_dir = pipeline.round_dir(r - 1) / "lm"
    model, tok = load_lm(lm_dir, ctx.device, ctx.dtype), load_tokenizer(lm_dir)  # inference only
    cfg = SamplingConfig(**{f.name: getattr(sp, f.name) for f in dataclasses.fields(SamplingConfig)})
    inputs, stops = task.encode_inputs(tok, model, frame, params), task.stops(model, tok, params)
    table, speed = pipeline.sample_table(model, tok, frame, mp, cfg, sp.batch_size, ctx, ctx.generator("sample", r),
                                         inputs, stops)
    out = pipeline.round_dir(r) / "samples.parquet"
    write_table(table, out, schemas.Samples)
    summary = speed | {"inputs": len(frame), "precision": ctx.precision}
    write_json(pipeline.round_metrics(r, "sample"), summary | {"settings": dataclasses.asdict(cfg)})
    tracking.log_stage("sample", r, dataclasses.asdict(sp), pipeline.round_metrics(r, "sample"), artifacts=[out])


if __name__ == "__main__":
    pipeline.cli(main, __doc__)
