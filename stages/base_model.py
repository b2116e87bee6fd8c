"""DVC stage `base_model`: materialise the policy LM_0 and the guidance backbone as plain HF folders.

params: model.policy, model.guidance, model.guidance_layers. Writes data/rounds/0/lm (policy + tokenizer) and
data/rounds/0/guidance/backbone (the policy's first `guidance_layers` layers, or `model.guidance`).
Run: python stages/base_model.py [--params params.yaml]
"""

import dataclasses

from ptg import pipeline, tracking
from ptg.base_models import TINY_KINDS, build_tiny, copy_backbone, materialize_policy, truncate_backbone
from ptg.config import load_group
from ptg.guidance import BACKBONE_DIR


def main(params: str = "params.yaml") -> None:
    ctx = pipeline.start("base_model", params)
    mp = load_group("model", params)
    lm_dir, guidance_dir = pipeline.round_dir(0) / "lm", pipeline.round_dir(0) / "guidance" / BACKBONE_DIR
    if mp.policy in TINY_KINDS:
        build_tiny(mp.policy, lm_dir, seed=ctx.run.seed)
    else:
        materialize_policy(mp.policy, lm_dir)
    if mp.guidance is None:
        truncate_backbone(lm_dir, mp.guidance_layers, guidance_dir)
    else:
        copy_backbone(mp.guidance, guidance_dir, policy_dir=lm_dir)
    tracking.log_stage("base_model", None, dataclasses.asdict(mp), {})


if __name__ == "__main__":
    pipeline.cli(main, __doc__, per_round=False)
