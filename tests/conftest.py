"""Shared fixtures: tiny randomly initialised LMs built from configs (no downloads), in eval mode."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]  # this checkout
VOCAB = 24
PAD, EOS, BOS = 0, 1, 2


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS,
                      bos_token_id=BOS, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    return T5ForConditionalGeneration(cfg).eval()


def read_line(proc: subprocess.Popen, seconds: float) -> str:
    """The next line ``proc`` writes to its stdout pipe, waiting at most ``seconds`` (a child that hangs or dies
    fails the test that reads from it, not the whole run)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=seconds):
            proc.kill()
            raise TimeoutError(f"{proc.args!r} wrote no line in {seconds} s")
    return proc.stdout.readline()


def hold_workspace(directory) -> subprocess.Popen:
    """Another process holding ``ptg.workspace.workspace_lock(directory)`` (for two minutes, or until killed)."""
    import sys

    code = ("import sys, time; from ptg.workspace import workspace_lock\nwith workspace_lock(sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert read_line(proc, 60).strip() == "held"
    return proc


def stop_process_group(proc: subprocess.Popen) -> None:
    """Terminate a server started with start_new_session=True, and its children (SIGKILL after 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture(params=["llama", "t5"])
def tiny_lm(request):
    return tiny_llama() if request.param == "llama" else tiny_t5()


def write_prompt_quick(path: Path) -> Path:
    """configs/prompt.yaml on a tiny random Llama (verbalizers that are one token of its tokenizer), a small test
    split and budgets of a few updates: the prompt task end to end in a minute or two."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "prompt.yaml").read_text())
    cfg["progress"] = False
    cfg["precision"] = "fp32"  # tiny models: the same numbers on every machine, as configs/quick.yaml
    cfg["model"] |= {"policy": "tiny-llama", "guidance_layers": 1}
    cfg["task"] |= {"verbalizers": [" food", " the", " a", " of"], "candidates": 4, "head_hidden": 32}
    cfg["data"] |= {"max_test": 40}
    cfg["sample"] |= {"train_inputs": 4, "validation_inputs": 2, "top_k": 16}
    cfg["fit_guidance"] |= {"max_updates": 4, "eval_every": 2, "head_hidden": 32}
    cfg["train_lm"] |= {"max_updates": 3, "eval_every": 2, "batch_size": 4}
    cfg["evaluate"] |= {"subset_items": 20}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
