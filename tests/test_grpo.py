"""The peer arm (``train_lm.objective: grpo``): TRL's GRPOTrainer on ptg's reward, inputs and order, with ptg's
learning curve and best checkpoint. A tiny random Llama with its own tokenizer, CPU, a few updates."""

from pathlib import Path

import pytest
import torch

from ptg import metrics
from ptg.config import SamplingConfig
from ptg.lm.base_models import build_tiny
from ptg.lm.encoding import eos_ids
from ptg.lm.grpo import prompt_texts, reward_function, train_grpo
from ptg.lm.models import load_lm, load_tokenizer
from ptg.lm.train import Example, TrainConfig, schedule

REFERENCES = ["the quick brown fox", "a short summary", "the capital of France", "prices rise quickly",
              "the committee met", "a new park opened", "family friendly food", "the weather is nice"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("grpo") / "lm"
    build_tiny("tiny-llama", folder)
    model, tok = load_lm(folder), load_tokenizer(folder)
    examples = [Example(tok(f"Summarize: {r}.", add_special_tokens=False)["input_ids"], references=(r,))
                for r in REFERENCES]
    return model, tok, examples


def meteor_scorer(tok):
    """ptg's sequence-level scorer of the summarisation task (``rank.metric: meteor``)."""
    def score(references, samples):
        texts = [tok.decode(s, skip_special_tokens=True).strip() for group in samples for s in group]
        flat = metrics.score("meteor", texts, [list(r) for r, group in zip(references, samples, strict=True)
                                                for _ in group])
        k = len(samples[0])
        return [flat[i:i + k] for i in range(0, len(flat), k)]
    return score


def test_the_reward_function_returns_ptgs_metric_for_the_same_completions(tiny):
    _, tok, examples = tiny
    completions = [tok("the quick brown dog", add_special_tokens=False)["input_ids"],
                   tok("a long summary", add_special_tokens=False)["input_ids"], []]
    index = [0, 1, 5]
    reward = reward_function(meteor_scorer(tok), examples)
    got = reward(prompts=["p"] * 3, completions=["c"] * 3, completion_ids=completions, index=index, trainer_state=None)
    expected = metrics.score("meteor", [tok.decode(c, skip_special_tokens=True).strip() for c in completions],
                             [[REFERENCES[i]] for i in index])
    assert got == expected and got[0] > got[1] > 0 == got[2]


def test_prompts_reach_trl_as_the_same_token_ids(tiny):
    _, tok, examples = tiny
    texts, same = prompt_texts(tok, examples)
    assert same == len(examples) and texts[0] == f"Summarize: {REFERENCES[0]}."


def test_grpo_trains_on_ptgs_inputs_in_ptgs_order_and_keeps_the_best_checkpoint(tiny):
    model, tok, examples = tiny
    model = load_lm(Path(model.name_or_path))  # a fresh copy: this test trains it
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(objective="grpo", pg_credit="sequence", lr=5e-3, batch_size=2, max_updates=4, pg_samples=2,
                      eval_every=2, seed=1)
    seen: list = []
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    scores = iter([0.1, 0.5, 0.3])  # updates 0, 2, 4: the best is update 2

    def validate(m):
        snapshots[len(snapshots) * 2] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        return {"val_score": next(scores), "val_reward_sampled": 0.0}

    def even_tokens(references, samples):  # a reward random outputs of a tiny model differ in (METEOR is 0 there)
        seen.append([list(r) for r in references])
        return [[sum(t % 2 == 0 for t in s) / max(len(s), 1) for s in group] for group in samples]

    history = train_grpo(model, tok, examples, cfg, SamplingConfig(max_new_tokens=4), even_tokens,
                         eos_ids(model, tok), torch.device("cpu"), validate)
    assert [int(h["update"]) for h in history] == [0, 1, 2, 3, 4]
    assert [int(h["update"]) for h in history if "val_score" in h] == [0, 2, 4]
    assert all(h["seconds"] > 0 and h["tokens"] > 0 for h in history[1:])
    # The same inputs in the same order as ptg's own loop: the schedule, each input's K completions together.
    order = [i for chunk in schedule(examples, cfg) for i in chunk]
    assert [r for call in seen for r in call] == [[REFERENCES[i]] for i in order for _ in range(cfg.pg_samples)]
    for name, value in model.state_dict().items():  # the best checkpoint (update 2), not the last
        assert torch.equal(value, snapshots[2][name]), name
    assert any(not torch.equal(start[k], v) for k, v in snapshots[2].items())  # it did train
