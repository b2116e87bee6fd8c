"""bf16 mixed precision against fp32 on the default model (SmolLM2-135M-Instruct, build/perf/lm, materialised by
`make perf`): the same N weighted-MLE updates (lr 1e-4, batch 8, the default params' docstring references, one
thread) in fp32 and in bf16 (ptg.lm.precision.WorkingCopy), each from the same weights; prints seconds per update, both
loss trajectories and their per-update relative difference (README "Speed"; tests/test_precision.py checks the
contract on a tiny model). Run: python scripts/bf16_tracking.py [UPDATES=50]"""
import sys
import time

import torch

from ptg.config import TrainConfig
from ptg.lm.train import Example, train_lm
from ptg.ops import perf

torch.set_num_threads(1)
updates = int(sys.argv[1]) if len(sys.argv) > 1 else 50
model, tok = perf.default_policy()
examples = [Example(p, t) for p, t in zip(*perf.default_examples(model, tok), strict=True)]
cfg = TrainConfig(max_updates=updates, batch_size=8, lr=1e-4)
losses = {}
for dtype in (torch.float32, torch.bfloat16):
    net = perf.default_policy()[0]
    start = time.perf_counter()
    history = train_lm(net, examples, cfg, tok.pad_token_id, perf.CPU, dtype, progress=False)
    losses[dtype] = [row["loss"] for row in history]
    print(f"{dtype}: {(time.perf_counter() - start) / updates:.2f} s/update", flush=True)
rel = [abs(b - a) / abs(a) for a, b in zip(losses[torch.float32], losses[torch.bfloat16], strict=True)]
print("fp32", [round(x, 4) for x in losses[torch.float32]])
print("bf16", [round(x, 4) for x in losses[torch.bfloat16]])
print(f"relative difference: first {rel[0]:.1e}, mean {sum(rel) / len(rel):.2e}, max {max(rel):.2e}, "
      f"last {rel[-1]:.2e}")
