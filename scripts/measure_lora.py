"""LoRA against full fine-tuning on SmolLM2-135M-Instruct (build/perf/lm, materialised by `make perf`): seconds per
update (batch 8, the perf prompts and references), trainable parameters and this process's peak RSS, as one JSON line.
Run once per mode, each in a fresh process: python scripts/measure_lora.py 0; python scripts/measure_lora.py 8"""
import json
import resource
import sys

import torch

from ptg.ops import perf

torch.set_num_threads(1)
rank = int(sys.argv[1])
model, tok = perf.default_policy()
prompts, targets = perf.default_examples(model, tok, 24)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
row = perf.train_row(model, prompts, targets, tok.pad_token_id, updates=6, batch_size=8, lora_rank=rank)
row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
row["rss_after_load_mb"] = rss0 / 1024
print(json.dumps({"lora_rank": rank, **row}))
