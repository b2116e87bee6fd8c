"""What ``mlflow.pyfunc.load_model`` gives for a ptg folder logged as a pyfunc model (a guidance, a seq2seq LM).

Models are logged with ``loader_module="ptg.tracking"``; the package re-exports this module's ``load_pyfunc`` as
MLflow's entry point ``ptg.tracking._load_pyfunc``, so models logged before the package split still load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOADER_MODULE = "ptg.tracking"


class HFFolderModel:
    """What ``mlflow.pyfunc.load_model`` gives for a ptg model logged as a folder: ``path`` is that folder.

    - A guidance folder (``guidance.json``, ``backbone/`` with its tokenizer): ``predict`` takes a DataFrame (or
      records) with columns ``prompt`` and ``response`` and returns each response's per-token rewards (lists of
      floats, one per response token including the stop token), as the pipeline computes them on CPU.
    - An LM folder logged this way (a seq2seq LM): ``predict`` decodes greedily: prompts (a list, a Series, or a
      DataFrame's first column) -> completions. Decoder-only LMs are logged with the transformers flavour instead.
    ``params``: ``max_prompt_tokens`` (default 512), ``max_new_tokens`` / ``max_target_tokens`` (default 64)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        import pandas as pd
        import torch

        from ptg.lm.encoding import encode_prompts, encode_responses, eos_ids, turn_end_id
        from ptg.lm.models import is_seq2seq, load_lm, load_tokenizer

        params = params or {}
        cpu = torch.device("cpu")
        if (self.path / "guidance.json").is_file():
            from ptg.guidance.model import load_guidance, token_rewards

            frame = pd.DataFrame(model_input)
            missing = sorted({"prompt", "response"} - set(frame.columns))
            if missing:
                raise ValueError(f"guidance input needs columns prompt and response; missing {', '.join(missing)}")
            guidance, tok = load_guidance(self.path), load_tokenizer(self.path / "backbone")
            prompts = encode_prompts(tok, frame["prompt"].astype(str).tolist(),
                                     int(params.get("max_prompt_tokens", 512)), is_seq2seq(guidance.backbone))
            responses = encode_responses(tok, frame["response"].astype(str).tolist(),
                                         int(params.get("max_target_tokens", 64)), turn_end_id(guidance.backbone, tok))
            return token_rewards(guidance, prompts, responses, tok.pad_token_id, cpu, torch.float32)
        from ptg.lm.sampling import SamplingConfig, sample

        if not (self.path / "config.json").is_file():
            raise TypeError(f"{self.path} is neither a guidance nor an LM folder")
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0]
        prompts = [model_input] if isinstance(model_input, str) else [str(x) for x in model_input]
        model, tok = load_lm(self.path), load_tokenizer(self.path)
        ids = encode_prompts(tok, prompts, int(params.get("max_prompt_tokens", 512)), is_seq2seq(model))
        cfg = SamplingConfig(num_samples=1, max_new_tokens=int(params.get("max_new_tokens", 64)), temperature=0.0)
        drawn = sample(model, ids, cfg, eos_ids(model, tok), tok.pad_token_id, cpu, progress=False)
        return [tok.decode(group[0], skip_special_tokens=True).strip() for group in drawn]


def load_pyfunc(data_path: str) -> HFFolderModel:
    """MLflow's pyfunc entry point (``loader_module``'s ``_load_pyfunc``)."""
    return HFFolderModel(data_path)
