"""Tests of the prompt-generation task (#21): the standardised sequence-level credit and the REINFORCE step it
drives, the policy's MLP prompt head (frozen LM, near-uniform start, save / load), the policy's start token and
groups, the prepare stage refusing a bad classification folder, and the WordNet few-shot splits. Tiny models built
from configs, CPU, no network."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from conftest import PAD, REPO, VOCAB, tiny_llama
from safetensors import safe_open
from transformers import LlamaForCausalLM

from ptg import losses
from ptg.config import DataConfig, SamplingConfig, TaskParams, TrainConfig
from ptg.lm import models, train
from ptg.tasks import prompt as prompt_data
from ptg.tasks.prompt.data import WORDNET_SOURCE, default_wordnet_root, labelled_splits

CPU = torch.device("cpu")
START = [3]  # the policy's one input token
X = 7  # the token the scripted rewards pay for
LABELS = ["animal", "plant", "food", "artifact"]
PROMPT_SAMPLING = SamplingConfig(1, 4, 1.0, top_k=0)  # 4-token prompts, no stop token


def count_x(examples: Any, samples: list[list[list[int]]]) -> list[list[float]]:
    """A ``train.SampleScorer``: each prompt's score is how many times it holds X (K = 1 per example)."""
    return [[float(s.count(X)) for s in group] for group in samples]


class PaysForX(torch.nn.Module):
    """A frozen token-level guidance: 1.0 for token X, 0.01 for any other response token."""

    def forward(self, batch: models.Batch) -> torch.Tensor:
        return torch.where(batch.response_ids == X, 1.0, 0.01) * batch.response_mask


def policy() -> torch.nn.Module:
    return models.add_prompt_head(tiny_llama(), width=16, seed=0)


def p_first(model: torch.nn.Module, token: int) -> float:
    """p(token | START): the policy's probability of ``token`` as a prompt's first token."""
    with torch.no_grad():
        return model(torch.tensor([START])).logits[0, -1].softmax(-1)[token].item()


# ---------------------------------------------------------------------------------------------------------------
# Sequence-level credit
# ---------------------------------------------------------------------------------------------------------------


def test_standardized_has_mean_zero_and_population_std_one():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population std sqrt(14 / 4)
    z = losses.standardized(s)
    torch.testing.assert_close(z, (s - 3.0) / (3.5 ** 0.5))
    assert z.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert z.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-6)


def test_standardized_constant_scores_give_zeros_not_nan():
    assert torch.equal(losses.standardized(torch.full((5,), 2.5)), torch.zeros(5))


def test_sequence_credit_gives_every_token_of_a_prompt_its_standardised_score(monkeypatch):
    """What reaches reinforce_loss: row n is prompt n's score standardised over the step's 8 prompts, the same on
    each of its 4 tokens."""
    seen: list[torch.Tensor] = []
    scored: list[list[float]] = []
    original = losses.reinforce_loss

    def recording(nll, rewards, mask, use_q=False):
        seen.append(rewards.detach().clone())
        return original(nll, rewards, mask, use_q)

    def score(references, samples):  # the sum of a prompt's token ids: a score that differs between prompts
        out = [[float(sum(s)) for s in group] for group in samples]
        scored.append([row[0] for row in out])
        return out

    monkeypatch.setattr(train.losses, "reinforce_loss", recording)
    cfg = TrainConfig(objective="reinforce", pg_credit="sequence", lr=1e-2, batch_size=8, max_updates=3,
                      entropy_coeff=0.0)
    train.train_lm(policy(), [train.Example(START)] * 8, cfg, PAD, CPU, sampling=PROMPT_SAMPLING, eos_ids=(),
                   score=score, progress=False)
    assert len(seen) == len(scored) == 3
    assert all(len(set(step)) > 1 for step in scored), scored  # not all-zero credit
    for rewards, scores in zip(seen, scored, strict=True):
        assert rewards.shape == (8, 4)
        expected = losses.standardized(torch.tensor(scores))
        torch.testing.assert_close(rewards, expected[:, None].expand(8, 4))


@pytest.mark.parametrize("credit", ["sequence", "token"])
def test_reinforce_moves_the_prompt_policy_toward_the_rewarded_token(credit):
    """Sequence credit (the number of X in a prompt, standardised) or token credit (a guidance paying for X):
    ten updates of the head at least 1.5x p(X | start), from 1/V. A sign error lowers it."""
    model = policy()
    before = p_first(model, X)
    assert before == pytest.approx(1 / VOCAB, rel=1e-3)
    cfg = TrainConfig(objective="reinforce", pg_credit=credit, lr=2e-2, batch_size=16, max_updates=10,
                      entropy_coeff=0.0)
    scoring = {"score": count_x} if credit == "sequence" else {"guidance": PaysForX()}
    train.train_lm(model, [train.Example(START)] * 16, cfg, PAD, CPU, sampling=PROMPT_SAMPLING, eos_ids=(),
                   progress=False, **scoring)
    after = p_first(model, X)
    assert after > 1.5 * before, (before, after)


# ---------------------------------------------------------------------------------------------------------------
# The prompt head
# ---------------------------------------------------------------------------------------------------------------


def test_add_prompt_head_freezes_the_lm_and_trains_only_the_mlp():
    model = policy()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    hidden = model.config.hidden_size
    assert trainable == {"lm_head.mlp.0.weight": hidden * 16, "lm_head.mlp.0.bias": 16,
                         "lm_head.mlp.2.weight": 16 * hidden, "lm_head.mlp.2.bias": hidden}
    assert isinstance(models.prompt_head(model), models.PromptHead)


def test_the_prompt_head_starts_near_uniform():
    model = policy()
    with torch.no_grad():
        p = model(torch.tensor([START + [5, 9, 11]])).logits.softmax(-1)
    assert p.max().item() < 1.01 / VOCAB and p.min().item() > 0.99 / VOCAB
    with torch.no_grad():  # the LM alone (its head's init std 0.02) is further from uniform than that
        bare = tiny_llama()(torch.tensor([START + [5, 9, 11]])).logits.softmax(-1)
    assert bare.max().item() > 1.05 / VOCAB


@pytest.mark.parametrize("tied", [False, True])  # SmolLM2, the default policy, ties its head to its embeddings
def test_save_lm_and_load_lm_round_trip_the_prompt_head(tmp_path, tied):
    base = tiny_llama()
    if tied:
        base.config.tie_word_embeddings = True
        base = LlamaForCausalLM(base.config).eval()
    model = models.add_prompt_head(base, width=16, seed=0)
    with torch.no_grad():  # a trained head, not the fresh one load_lm builds before loading the file
        for p in models.prompt_head(model).mlp.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    models.save_lm(model, tmp_path)
    loaded = models.load_lm(tmp_path)
    ids = torch.tensor([START + [5, 9, 11]])
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():  # the saved head is not the fresh one load_lm starts from: the check has teeth
        assert (want - policy()(ids).logits).abs().max().item() > 1e-2
    assert isinstance(models.prompt_head(loaded), models.PromptHead)
    assert isinstance(models.prompt_head(model), models.PromptHead)  # saving put the head back
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())  # noqa: SIM118 (safe_open is not a mapping)
    assert not [k for k in keys if k.startswith(("lm_head.mlp.", "lm_head.lm_head."))], keys
    assert ("lm_head.weight" in keys) != tied  # the LM's own head, saved unless tied to the embeddings
    assert (tmp_path / models.PROMPT_HEAD_FILE).is_file()


# ---------------------------------------------------------------------------------------------------------------
# Start token and groups
# ---------------------------------------------------------------------------------------------------------------


def test_start_ids_is_bos_else_eos_else_an_error():
    from ptg.lm.tiny_models import build_tiny_tokenizer

    assert prompt_data.start_ids(build_tiny_tokenizer("tiny-llama")) == [3]
    assert prompt_data.start_ids(SimpleNamespace(bos_token_id=0, eos_token_id=4)) == [0]  # id 0 is a BOS too
    assert prompt_data.start_ids(SimpleNamespace(bos_token_id=None, eos_token_id=4)) == [4]
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        prompt_data.start_ids(SimpleNamespace(bos_token_id=None, eos_token_id=None))


def test_groups_ids_splits_and_split_of_group():
    frame = prompt_data.groups(3, 2)
    assert frame["id"].tolist() == ["train-0000", "train-0001", "train-0002", "validation-0000", "validation-0001"]
    assert frame["split"].tolist() == ["train"] * 3 + ["validation"] * 2
    assert [prompt_data.split_of_group(i) for i in frame["id"]] == frame["split"].tolist()
    assert prompt_data.groups(0, 1)["split"].tolist() == ["validation"]


# ---------------------------------------------------------------------------------------------------------------
# prepare on a local classification folder
# ---------------------------------------------------------------------------------------------------------------


def prepare_stage() -> Any:
    spec = importlib.util.spec_from_file_location("stage_prepare", REPO / "stages" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def labelled_rows(split: str, drop: str | None = None) -> list[dict[str, str]]:
    return [{"text": f"{split} text {i} about a {label}", "label": label}
            for label in LABELS if label != drop for i in range(2)]


@pytest.fixture
def prompt_ws(tmp_path, monkeypatch) -> Path:
    """A scratch project folder with configs/prompt.yaml's params, its data a local folder (train/dev/test.jsonl)
    of good rows, as the working directory; tracking off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PTG_TRACKING", "off")
    params = yaml.safe_load((REPO / "configs" / "prompt.yaml").read_text())
    params["data"] |= {"source": str(tmp_path / "topics"), "input_field": "text", "target_field": "label"}
    params["task"]["labels"] = LABELS
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "topics").mkdir()
    for split, name in (("train", "train"), ("validation", "dev"), ("test", "test")):
        write_rows(tmp_path / "topics" / f"{name}.jsonl", labelled_rows(split))
    return tmp_path


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_prepare_writes_a_good_classification_folder(prompt_ws):
    prepare_stage().main("params.yaml")
    train_split = pd.read_parquet(prompt_ws / "data" / "prepared" / "train.parquet")
    assert sorted(train_split["label"].unique()) == sorted(LABELS) and len(train_split) == 8
    assert (prompt_ws / "data" / "prepared" / "test.parquet").is_file()


BAD_FOLDERS = {
    "label-without-verbalizer": ("train.jsonl", [*labelled_rows("train"), {"text": "quartz", "label": "mineral"}],
                                 ("train", "field 'label'", "'mineral'")),
    "empty-text": ("dev.jsonl", [*labelled_rows("validation"), {"text": "  ", "label": "plant"}],
                   ("validation", "field 'text' is empty", "'validation-8'")),
    "split-missing-a-label": ("test.jsonl", labelled_rows("test", drop="food"),
                              ("test", "field 'label' lacks", "'food'")),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_prepare_refuses_a_bad_classification_folder_and_writes_nothing(prompt_ws, case):
    name, rows, says = BAD_FOLDERS[case]
    write_rows(prompt_ws / "topics" / name, rows)
    with pytest.raises(ValueError) as info:
        prepare_stage().main("params.yaml")
    message = str(info.value)
    missing = [s for s in (f"data.source {prompt_ws / 'topics'}", *says) if s not in message]
    assert not missing, f"{missing} not in:\n{message}"
    assert not (prompt_ws / "data" / "prepared").exists()
    assert not (prompt_ws / "metrics" / "prepare.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# WordNet few-shot splits
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (default_wordnet_root() / "data.noun").is_file(), reason="WordNet not installed")
def test_wordnet_examples_are_exact_shots_per_class_and_seeded_by_data_seed():
    task = TaskParams(name="prompt", labels=tuple(LABELS), verbalizers=(" animal", " plant", " food", " tool"),
                      shots=4)

    def build(seed: int) -> dict[str, pd.DataFrame]:
        return labelled_splits(DataConfig(source=WORDNET_SOURCE, max_test=40, seed=seed), task)

    first = build(0)
    for split in ("train", "validation"):
        assert first[split]["label"].value_counts().to_dict() == dict.fromkeys(LABELS, 4)
    assert len(first["test"]) == 40
    ids = [set(first[s]["id"]) for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again, other = build(0), build(1)
    for split in first:
        pd.testing.assert_frame_equal(again[split], first[split])
    assert set(other["train"]["id"]) != ids[0]
