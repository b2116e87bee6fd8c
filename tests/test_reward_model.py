"""rank.metric reward_model: a local sequence-classification model scores (prompt, response) pairs, batched and
padded without changing a single score, and the rank stage ranks round r's samples by those scores."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO
from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from ptg import metrics
from ptg.config import RANK_METRICS, ParamsError
from ptg.config import load as load_params
from ptg.guidance.ranking import rank_within_groups
from ptg.io import read_table
from ptg.lm.reward_model import encode_reward_inputs, load_reward_model, reward_scores
from ptg.lm.tiny_models import build_tiny_tokenizer
from ptg.ops.workspace import dvc_env, make_workspace
from ptg.schemas import Rankings

CPU, FP32 = torch.device("cpu"), torch.float32
PROMPTS = ["Summarize: the park opened in the city centre.", "What is the capital of France?",
           "Translate the sentence into German.", "Write a short summary of the following article.",
           "Please answer the question."]
RESPONSES = ["A park opened.", "The capital of France is Paris, and the weather is nice today.", "Yes",
             "The committee met on Monday to discuss the budget; on Tuesday it voted.", "no, maybe, always"]


def save_reward_model(folder: Path, num_labels: int = 1, seed: int = 0, arch: str = "llama") -> Path:
    """A random tiny reward model with the tiny tokenizer (ChatML template), as a safetensors folder: Llama (rotary
    positions, so a uniform shift of positions changes nothing) or GPT-2 (absolute positions: a sequence padded on
    the wrong side scores differently). Weights drawn wider than HF's default (std 0.2, not 0.02) so that
    attention, positions and padding visibly matter."""
    tok = build_tiny_tokenizer("tiny-llama")
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.2, num_labels=num_labels, **ids))
    else:
        model = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
            num_labels=num_labels, **ids))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    return save_reward_model(tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def any_rm_dir(request, tmp_path_factory) -> Path:
    return save_reward_model(tmp_path_factory.mktemp("rm") / request.param, arch=request.param)


def unbatched(model, ids: list[int]) -> torch.Tensor:
    """The reward model's logits for one unpadded sequence: (num_labels,)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_batched_scores_equal_one_unpadded_forward_each_in_input_order(any_rm_dir):
    model, tok = load_reward_model(any_rm_dir)
    assert not model.training and (any_rm_dir / "model.safetensors").is_file()
    seqs = encode_reward_inputs(tok, PROMPTS, RESPONSES)
    # The chat template wraps both turns: the sequence ends with the assistant turn's <|im_end|> and newline.
    assert tok.decode(seqs[1]).startswith("<|im_start|>user\nWhat is the capital") and "assistant\nThe capital" \
        in tok.decode(seqs[1])
    assert len({len(s) for s in seqs}) == len(seqs)  # every length differs, so every batch pads
    expected = [unbatched(model, s)[0].item() for s in seqs]
    for batch_size in (1, 2, 32):
        got = reward_scores(model, tok, PROMPTS, RESPONSES, batch_size, 0, "higher", CPU, FP32, progress=False)
        assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == len(expected) and max(expected) - min(expected) > 0.1  # an order bug shows
    alone = reward_scores(model, tok, None, RESPONSES, 2, 0, "higher", CPU, FP32, progress=False)
    assert alone == pytest.approx([unbatched(model, tok(r)["input_ids"])[0].item() for r in RESPONSES], abs=1e-5)
    assert alone != pytest.approx(expected, abs=1e-3)


def test_direction_lower_negates(rm_dir):
    model, tok = load_reward_model(rm_dir)
    higher = reward_scores(model, tok, PROMPTS, RESPONSES, 2, 0, "higher", CPU, FP32, progress=False)
    lower = reward_scores(model, tok, PROMPTS, RESPONSES, 2, 0, "lower", CPU, FP32, progress=False)
    assert lower == pytest.approx([-s for s in higher], abs=1e-6)
    with pytest.raises(ValueError, match="direction must be higher or lower; got 'up'"):
        reward_scores(model, tok, PROMPTS, RESPONSES, 2, 0, "up", CPU, FP32, progress=False)


def test_label_picks_the_logit_column_of_a_multi_label_head(tmp_path):
    model, tok = load_reward_model(save_reward_model(tmp_path / "rm3", num_labels=3, seed=1))
    full = torch.stack([unbatched(model, s) for s in encode_reward_inputs(tok, PROMPTS, RESPONSES)])
    for label in range(3):
        got = reward_scores(model, tok, PROMPTS, RESPONSES, 2, label, "higher", CPU, FP32, progress=False)
        assert got == pytest.approx(full[:, label].tolist(), abs=1e-5)
    assert not torch.allclose(full[:, 0], full[:, 2], atol=1e-3)
    with pytest.raises(ValueError, match="label 3 is out of range: the reward model has 3 label"):
        reward_scores(model, tok, PROMPTS, RESPONSES, 2, 3, "higher", CPU, FP32, progress=False)


def last_token_reward_model(folder: Path, preference: dict[str, float]) -> Path:
    """A reward model whose score is a known increasing function of the input's last token: the blocks add nothing
    (attention and MLP outputs zeroed), every embedding is e_1 plus a_t * e_0 (a_t from ``preference``, keyed by
    the word that is the last token, alone or after a space; 0 for all others), and the head reads dimension 0
    after the RMSNorm: a_t / rms((a_t, 1, 0, ...)), increasing in a_t."""
    save_reward_model(folder)
    model, tok = load_reward_model(folder)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 1] = 1.0
        for word, a in preference.items():
            for form in (word, " " + word):  # the byte-level BPE has a token for each
                emb[tok(form)["input_ids"][-1], 0] = a
        model.score.weight.zero_()
        model.score.weight[0, 0] = 1.0
    model.save_pretrained(folder)
    return folder


def test_a_reward_model_with_a_known_preference_ranks_by_it(tmp_path):
    liked = {"Paris": 3.0, "France": 1.0, "dog": -2.0}  # the score's order: Paris > France > (unset, 0) > dog
    model, tok = load_reward_model(last_token_reward_model(tmp_path / "rm", liked))
    assert len({tok(f)["input_ids"][-1] for t in liked for f in (t, " " + t)}) == 6
    ids = ["a", "a", "a", "a", "b", "b", "b"]
    texts = ["it is a dog", "it is Paris", "it is the", "it is France", "France", "dog", "Paris"]
    scores = reward_scores(model, tok, None, texts, 3, 0, "higher", CPU, FP32, progress=False)
    table = rank_within_groups(pd.DataFrame({"id": ids, "sample_idx": [0, 1, 2, 3, 0, 1, 2], "score": scores}))
    assert table["rank"].tolist() == [4, 1, 3, 2, 2, 3, 1]
    scores = reward_scores(model, tok, None, texts, 3, 0, "lower", CPU, FP32, progress=False)
    table = rank_within_groups(pd.DataFrame({"id": ids, "sample_idx": [0, 1, 2, 3, 0, 1, 2], "score": scores}))
    assert table["rank"].tolist() == [1, 4, 2, 3, 2, 1, 3]


def test_loader_refuses_pickle_weights_and_names_a_missing_path(tmp_path, rm_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((rm_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="only safetensors weights.*pytorch_model.bin"):
        load_reward_model(pickled)
    missing = tmp_path / "no" / "such" / "rm"
    with pytest.raises(OSError, match=f"cannot load the reward model '{missing}': no such local folder"):
        load_reward_model(missing)


def test_empty_inputs_are_refused_with_their_indices(rm_dir):
    model, tok = load_reward_model(rm_dir)
    with pytest.raises(ValueError, match=r"inputs \[1\] encode to no tokens"):
        reward_scores(model, tok, None, ["fine", ""], 2, 0, "higher", CPU, FP32, progress=False)
    # With the prompt the chat template still gives the model something to read.
    assert len(reward_scores(model, tok, ["q", "q"], ["fine", ""], 2, 0, "higher", CPU, FP32, progress=False)) == 2


def _params(tmp_path: Path, **rank) -> Path:
    params = yaml.safe_load((REPO / "configs" / "quick.yaml").read_text())
    params["rank"] |= rank
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_rank_params_validate_the_reward_keys(tmp_path):
    rp = load_params(_params(tmp_path, metric="reward_model", reward_model="some/folder")).rank
    assert (rp.reward_batch_size, rp.reward_label, rp.reward_direction, rp.reward_input) == (
        32, 0, "higher", "prompt+response")
    for bad, match in (({"metric": "reward_model"}, "metric reward_model needs reward_model, a model folder; got None"),
                       ({"metric": "rm"}, "metric must be one of .*reward_model; got 'rm'"),
                       ({"reward_batch_size": 0}, "reward_batch_size must be >= 1; got 0"),
                       ({"reward_label": -1}, "reward_label must be >= 0; got -1"),
                       ({"reward_direction": "up"}, "reward_direction must be one of higher, lower; got 'up'"),
                       ({"reward_input": "prompt"}, r"reward_input must be one of prompt\+response, response; got")):
        with pytest.raises(ParamsError, match="rank: " + match):
            load_params(_params(tmp_path, **bad))
    params = yaml.safe_load(_params(tmp_path).read_text())
    del params["rank"]["reward_label"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="rank: missing key.*reward_label"):
        load_params(tmp_path / "params.yaml")


def test_rank_metrics_are_the_reference_metrics_plus_file_and_reward_model():
    assert (*metrics.METRICS, "file", "reward_model") == RANK_METRICS


def _stage(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dvc_env() | {"PTG_TRACKING": "off", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_rank_stage_ranks_samples_by_the_reward_model(tmp_path, rm_dir):
    """prepare, then round 1's samples (written here, as a sampling stage would), then rank@1 with metric
    reward_model: the rankings hold the reward model's scores of (prompt, sample) and rank by them."""
    params = _params(tmp_path, metric="reward_model", reward_model=str(rm_dir), reward_batch_size=2)
    ws = make_workspace(params, tmp_path / "ws")
    _stage(["stages/prepare.py"], ws)
    examples = pd.concat([pd.read_parquet(ws / "data" / "prepared" / f"{s}.parquet") for s in ("train", "validation")])
    picked = examples.iloc[[0, 1, -1]]  # two training inputs and one validation input
    texts = ["Return the sum.", "Parse the file and return a list of lines.", "Yes", "It opens a socket.",
             "Compute the hash of a string.", "", "Split the path.", "Write the data to disk and close it.", "no"]
    samples = pd.DataFrame({"id": [i for i in picked["id"] for _ in range(3)], "sample_idx": [0, 1, 2] * 3,
                            "text": texts, "token_ids": [[5, 4]] * 9, "n_tokens": [2] * 9, "finished": [True] * 9})
    (ws / "data" / "rounds" / "1").mkdir(parents=True)
    samples.to_parquet(ws / "data" / "rounds" / "1" / "samples.parquet")
    _stage(["stages/rank.py", "--round", "1"], ws)

    model, tok = load_reward_model(rm_dir)
    prompts = [p for p in picked["prompt"] for _ in range(3)]
    expected = reward_scores(model, tok, prompts, texts, 32, 0, "higher", CPU, FP32, progress=False)
    ranked = read_table(ws / "data" / "rounds" / "1" / "rankings.parquet", Rankings)
    assert ranked["score"].tolist() == pytest.approx(expected, abs=1e-5)
    want = rank_within_groups(samples[["id", "sample_idx"]].assign(score=expected))
    assert ranked[["id", "sample_idx", "rank"]].values.tolist() == want[["id", "sample_idx", "rank"]].values.tolist()
    assert sorted(ranked.groupby("id")["rank"].apply(list).map(tuple)) != [(1, 2, 3)] * 3  # not just sample order
    summary = json.loads((ws / "metrics" / "rounds" / "1" / "rank.json").read_text())
    assert summary["metric"] == "reward_model" and summary["mean_score"] == pytest.approx(sum(expected) / 9, abs=1e-5)

    missing = tmp_path / "missing-rm"
    (ws / "params.yaml").write_text(_params(tmp_path, metric="reward_model", reward_model=str(missing)).read_text())
    proc = _stage(["stages/rank.py", "--round", "1"], ws, check=False)
    assert proc.returncode != 0 and f"rank.reward_model: cannot load the reward model '{missing}'" in proc.stderr
