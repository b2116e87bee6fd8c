"""DVC stage `base_model`: materialise the policy LM_0 and the guidance backbone as plain HF folders.

params: model.policy, model.guidance, model.guidance_layers, task. Writes data/rounds/0/lm (policy + tokenizer;
the prompt task's with a fresh MLP head, `task.head_hidden`) and data/rounds/0/guidance/backbone (the policy's
first `guidance_layers` layers, or `model.guidance`).
Run: python stages/base_model.py [--params params.yaml]
"""

import dataclasses

from ptg import config, pipeline, tasks, tracking
from ptg.lm.base_models import materialize_base


def main(path: str = "params.yaml") -> None:
    ctx = pipeline.start("base_model", config.load(path))
    params = ctx.params
    mp = params.model
    materialize_base(mp, pipeline.round_dir(0), params.run.seed)
    tasks.data(params).init_policy(params, pipeline.round_dir(0) / "lm", ctx.seed("base_model"))
    tracking.log_stage("base_model", None, dataclasses.asdict(mp), {})


if __name__ == "__main__":
    pipeline.cli(main, __doc__, per_round=False)
