"""DVC stage `sources`: a fingerprint of every local file or folder the params point at (`data.source`,
`model.policy`, `model.guidance`, `rank.scores_file`, `rank.reward_model`, `task.classifier`), so that editing one
in place reruns the stage that reads it (``ptg.pipeline.sources``). It always runs (`always_changed`: DVC cannot see
paths that come from params) and reads no file, only their sizes and times; an unchanged fingerprint reruns nothing.
Writes data/sources/{data,model,scorer}.json.
Run: python stages/sources.py [--params params.yaml]
"""

from ptg import config, pipeline
from ptg.io import write_json
from ptg.pipeline import sources


def main(path: str = "params.yaml") -> None:
    ctx = pipeline.start("sources", config.load(path), with_torch=False)
    params = ctx.params
    for name, prints in sources.fingerprints(params).items():
        write_json(pipeline.DATA / "sources" / f"{name}.json", prints)


if __name__ == "__main__":
    pipeline.cli(main, __doc__, per_round=False)
