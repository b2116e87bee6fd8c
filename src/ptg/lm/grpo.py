"""The peer arm: TRL's ``GRPOTrainer`` trained on ptg's reward, inputs and budget (``train_lm.objective: grpo``).

What a practitioner would run instead of ptg's own policy gradient, given the same pieces: the reward function is
ptg's sample scorer (``rank.metric`` against the references: the very scores ptg's arms train on), the prompts are
the training split's, drawn in ``ptg.lm.train.schedule``'s order (TRL's sampler with ``shuffle_dataset`` off), and K
(``num_generations``), the learning rate (constant), inputs per update, updates, gradient clipping, weight decay
and the sampling settings are train_lm's. The rest is TRL's GRPO as it ships (group-normalised advantages, the
``dapo`` token-level loss, no KL term). The learning curve is ptg's own (the task's ``validation_scorer`` every
``eval_every`` updates, from a callback) and the best checkpoint is kept as ptg's arms keep theirs, so the arm is
evaluated by the evaluate stage like any other. Summarisation only; needs the ``bench`` extra (``pip install
'ptg[bench]'``).

Prompts reach TRL as text (TRL tokenizes its own): each prompt is ptg's chat-formatted prompt, decoded from its
token ids; ``prompt_roundtrip`` counts how many re-encode to the same ids.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ptg.io import import_extra
from ptg.lm.train import Example, SampleScorer, Validator, schedule

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ptg.config import SamplingConfig, TrainConfig

log = logging.getLogger(__name__)


def reward_function(score: SampleScorer, examples: Sequence[Example]):  # noqa: ANN201 - a TRL reward function
    """A TRL reward function that returns ``score``'s sequence-level scores of the completions: the dataset's
    ``index`` column names each completion's example, ``completion_ids`` are its tokens."""

    def ptg_reward(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], index: list[int],
                   **_: Any) -> list[float]:
        scored = score([examples[i].references for i in index], [[list(ids)] for ids in completion_ids])
        return [float(s[0]) for s in scored]

    ptg_reward.__name__ = "ptg_reward"
    return ptg_reward


def prompt_texts(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> tuple[list[str], int]:
    """Each example's prompt as text for TRL, and how many of them re-encode to exactly ptg's token ids."""
    texts = [tokenizer.decode(e.prompt) for e in examples]
    same = sum(tokenizer(t, add_special_tokens=False)["input_ids"] == e.prompt for t, e in zip(texts, examples,
                                                                                                strict=True))
    return texts, same


def train_grpo(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
               cfg: TrainConfig, sampling: SamplingConfig, score: SampleScorer, eos_ids: Sequence[int],
               device: torch.device, validate: Validator | None, progress: bool = False,
               bf16: bool = False) -> list[dict[str, float]]:
    """Train ``model`` in place with TRL's GRPOTrainer for ``cfg.max_updates`` updates of ``cfg.batch_size``
    inputs x ``cfg.pg_samples`` completions; returns one metrics row per update (and validation rows, as
    ``ptg.lm.train.train_lm``), the weights of the best ``val_score`` restored when ``validate`` is given."""
    trl = import_extra("trl", "bench", "train_lm.objective: grpo")
    datasets = import_extra("datasets", "bench", "train_lm.objective: grpo")
    from transformers import TrainerCallback

    if cfg.grad_accum != 1:
        raise ValueError("objective grpo: grad_accum must be 1 (one generation batch per update)")
    order = [i for chunk in schedule(examples, cfg) for i in chunk]
    drawn = [examples[i] for i in order]
    texts, same = prompt_texts(tokenizer, drawn)
    log.info("grpo: %d of %d prompts re-encode to ptg's token ids", same, len(texts))
    dataset = datasets.Dataset.from_dict({"prompt": texts, "index": order})
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def checkpoint(update: int) -> dict[str, float]:
        nonlocal best
        assert validate is not None
        was_training = model.training
        scored = validate(model)
        model.train(was_training)
        if best is None or scored["val_score"] > best[0]:
            best = (scored["val_score"], update, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return scored

    class Rows(TrainerCallback):
        """One ptg metrics row per update from TRL's logs (which come after the step's end), its seconds those of
        the update alone, and a validation every ``eval_every`` updates."""

        def __init__(self) -> None:
            self.t0, self.seconds, self.validated = time.perf_counter(), 0.0, {}

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.seconds = time.perf_counter() - self.t0
            step = state.global_step
            if validate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_updates):
                self.validated = checkpoint(step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if not logs or "loss" not in logs:
                return
            k = cfg.batch_size * cfg.pg_samples
            history.append({"update": float(state.global_step), "loss": float(logs["loss"]),
                            "tokens": float(logs.get("completions/mean_length", 0.0)) * k,
                            "reward": float(logs["reward"]), "pg_score": float(logs["reward"]),
                            "grad_norm": float(logs.get("grad_norm", float("nan"))),
                            "lr": float(logs.get("learning_rate", cfg.lr)), "seconds": self.seconds,
                            **self.validated})
            self.validated = {}

    rows = Rows()
    if validate is not None and cfg.eval_every:
        history.append({"update": 0.0, **checkpoint(0)})
    with tempfile.TemporaryDirectory(prefix="ptg-grpo-") as out:
        args = trl.GRPOConfig(
            output_dir=out, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=not progress,
            use_cpu=device.type == "cpu", bf16=bf16, seed=cfg.seed, data_seed=cfg.seed,
            max_steps=cfg.max_updates, per_device_train_batch_size=cfg.batch_size * cfg.pg_samples,
            gradient_accumulation_steps=1, steps_per_generation=1, num_generations=cfg.pg_samples,
            shuffle_dataset=False, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.clip_norm,
            max_completion_length=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, generation_kwargs={"eos_token_id": list(eos_ids)}, beta=0.0,
            dataloader_num_workers=0, remove_unused_columns=False)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_function(score, examples), args=args,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[rows])
        trainer.train()
    if best is not None:
        log.info("grpo: best validation score %.4f at update %d of %d", best[0], best[1], cfg.max_updates)
        model.load_state_dict(best[2])
    model.eval()
    return history
