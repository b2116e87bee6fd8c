"""DVC stage `prepare`: build the train / validation / test examples from `data.source` (params: data, task).

Writes data/prepared/{train,validation,test}.parquet (schema Examples; the prompt task's ClassificationExamples)
and metrics/prepare.json.
Run: python stages/prepare.py [--params params.yaml]
"""

import dataclasses

from ptg import config, pipeline, tasks, tracking
from ptg.io import validate_table, write_json, write_table


def main(path: str = "params.yaml") -> None:
    ctx = pipeline.start("prepare", config.load(path), with_torch=False)
    params = ctx.params
    cfg = params.data
    frames, schema, info = tasks.data(params).build_examples(params)
    # Every split passes its schema before any is written: a bad test split leaves no train table behind.
    frames = {split: validate_table(frame, schema, str(pipeline.PREPARED / f"{split}.parquet"))
              for split, frame in frames.items()}
    for split, frame in frames.items():
        write_table(frame, pipeline.PREPARED / f"{split}.parquet", schema)
    write_json(pipeline.METRICS / "prepare.json", info)
    tracking.log_stage("prepare", None, dataclasses.asdict(cfg), pipeline.METRICS / "prepare.json")


if __name__ == "__main__":
    pipeline.cli(main, __doc__, per_round=False)
