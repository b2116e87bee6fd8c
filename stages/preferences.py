"""DVC stage `preferences`: read, validate and split the preference data of `preferences.path`.

Listwise (input, text, score) or pairwise (prompt, chosen, rejected) rows become the long table of ranked groups
(schema Preferences, with each input in the train or the validation split); groups that rank nothing are skipped
and counted. With `preferences.path: null` the table is empty and nothing else changes. The stage always runs
(`always_changed`: the data lives outside the project, at a path from params), and its output changes only when
the data does, so `fit_guidance@r` reruns only then.
Writes data/preferences.parquet and metrics/preferences.json.
Run: python stages/preferences.py [--params params.yaml]
"""

import dataclasses

import pandas as pd

from ptg import config, pipeline, schemas, tracking
from ptg.guidance import preferences
from ptg.io import write_json, write_table


def main(path: str = "params.yaml") -> None:
    ctx = pipeline.start("preferences", config.load(path), with_torch=False)
    params = ctx.params
    pp = params.preferences
    if pp.path:
        table, counts = preferences.load(pp)
    else:
        table = pd.DataFrame({c: pd.Series(dtype=float if c == "score" else str) for c in preferences.COLUMNS})
        counts = {"groups": 0}
    write_table(table, pipeline.PREFERENCES, schemas.Preferences)
    write_json(pipeline.METRICS / "preferences.json", counts)
    tracking.log_stage("preferences", None, dataclasses.asdict(pp), pipeline.METRICS / "preferences.json")


if __name__ == "__main__":
    pipeline.cli(main, __doc__, per_round=False)
