"""Memory per process of train_lm's policy with FSDP against one process and DDP: a random Llama of 8 layers, hidden
1024 (about 110M parameters, fp32, AdamW), 3 updates of weighted MLE on 8 sequences of 128 tokens. Prints one JSON
line per rank: the parameters this rank holds, its RSS after training (weights, gradients and optimizer state held)
and its peak RSS. Run each in a fresh launch:

    python scripts/measure_fsdp.py
    accelerate launch --multi_gpu --num_processes 2 --mixed_precision no scripts/measure_fsdp.py
    accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/measure_fsdp.py
(CPU: CUDA_VISIBLE_DEVICES= and --main_process_ip 127.0.0.1 --main_process_port 0 with the launches)"""
import json
import resource

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ptg.lm import distributed
from ptg.lm.train import Example, TrainConfig, train_lm

torch.set_num_threads(1)
distributed.init_from_env()
torch.manual_seed(0)
config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=0)
model = LlamaForCausalLM(config)
rss_built = psutil.Process().memory_info().rss
gen = torch.Generator().manual_seed(1)
examples = [Example(torch.randint(3, 4096, (64,), generator=gen).tolist(),
                    torch.randint(3, 4096, (64,), generator=gen).tolist()) for _ in range(8)]
history = train_lm(model, examples, TrainConfig(lr=1e-4, batch_size=8, max_updates=3, seed=0), 0,
                   torch.device("cpu"), progress=False)
held = sum(distributed.local_shard(p).numel() for p in model.parameters())
rank, world = distributed.rank_and_world()
print(json.dumps({"rank": rank, "world": world, "fsdp": distributed.fsdp_requested(),
                  "parameters_held_m": held / 1e6, "rss_built_mb": rss_built / 2**20,
                  "rss_after_training_mb": psutil.Process().memory_info().rss / 2**20,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "loss": [round(h["loss"], 4) for h in history]}), flush=True)
