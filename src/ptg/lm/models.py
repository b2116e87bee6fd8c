"""Loading LMs and the one token alignment that guidance fitting, guidance weighting and LM training share.

A *batch* holds B prompts and N = B * K responses (the K responses of one prompt contiguous, "input-major").
Prompts are left-padded and responses right-padded, so response token t of every row sits at the same column.
Two functions read a model at response positions, for seq2seq and decoder-only models alike:

- ``response_logits``: logits[:, t] is the LM's distribution for response token t (teacher forcing);
- ``response_hidden``: hidden[:, t] is the backbone state at the position whose *input* token is response token
  t, i.e. it has seen the prompt and a_0..a_t: the state the guidance turns into r(s_t, a_t).

Seq2seq decoders always see [decoder start] + response, in fitting and in weighting alike (spec pitfall 7.1),
and the encoder runs once per prompt, its states expanded to the K responses (spec pitfall 7.19).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ptg.lm import distributed


@dataclass(frozen=True)
class Batch:
    """prompt_ids, prompt_mask: (B, P) left-padded; response_ids, response_mask: (B * K, T) right-padded."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.response_ids.shape[0] // self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        tensors = (self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)
        return Batch(*(t.to(device) for t in tensors))

    def groups(self, rows: list[int]) -> Batch:
        """The prompts ``rows`` with their K responses each (same padded widths)."""
        k = self.group_size
        responses = [r * k + j for r in rows for j in range(k)]
        return Batch(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[responses],
                     self.response_mask[responses])


def pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ``seqs`` padded with ``pad_id`` to the longest, on the left or the right: (N, T) each."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """Build a Batch from B prompts and B * K responses (token id lists, responses input-major)."""
    if not prompts or len(responses) % len(prompts):
        raise ValueError(f"responses ({len(responses)}) must be a positive multiple of prompts ({len(prompts)})")
    empty = [i for i, r in enumerate(responses) if not r]
    if empty:
        raise ValueError(f"responses {empty[:8]} are empty; every response needs at least one token")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    return Batch(*pad(prompts, pad_id, left=True), *pad(responses, pad_id, left=False))


def is_seq2seq(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


ADAPTER_DIR = "adapter"  # a trained LM folder's LoRA adapters (peft's adapter_config.json + safetensors)


def add_lora(model: PreTrainedModel, rank: int, alpha: float, dropout: float, target_modules: str | None,
             seed: int) -> Any:
    """``model`` wrapped with fresh LoRA adapters (peft): only the adapters are trainable. ``target_modules``:
    comma-separated module names, ``all-linear``, or None for peft's default of the architecture. The adapters'
    random init is drawn from ``seed`` (so PTG and its baseline start round r from the same adapters) without
    touching torch's global generator."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets: str | list[str] | None = target_modules
    if target_modules is not None and target_modules != "all-linear":
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    task = TaskType.SEQ_2_SEQ_LM if is_seq2seq(model) else TaskType.CAUSAL_LM
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, cfg)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model" and the like
            raise ValueError(f"train_lm.lora.target_modules: {target_modules!r} does not fit "
                             f"{type(model).__name__}: {e}") from e


PROMPT_HEAD_FILE = "prompt_head.safetensors"  # a prompt policy's trainable MLP (task.head_hidden), beside the LM


class PromptHead(torch.nn.Module):
    """The prompt policy's head (the reference's, spec §3b): a trainable MLP (hidden -> width -> hidden, ReLU) maps
    the frozen LM's last hidden state to a new one, which the frozen LM head reads out. Xavier-uniform gain 1e-4 and
    bias -1e-4, as the reference: the policy starts near uniform over the vocabulary."""

    def __init__(self, lm_head: torch.nn.Module, hidden: int, width: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, width), torch.nn.ReLU(), torch.nn.Linear(width, hidden))
        self.lm_head = lm_head
        for layer in (self.mlp[0], self.mlp[2]):
            torch.nn.init.xavier_uniform_(layer.weight, gain=1e-4)
            torch.nn.init.constant_(layer.bias, -1e-4)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mlp(hidden))


def add_prompt_head(model: PreTrainedModel, width: int, seed: int) -> PreTrainedModel:
    """``model`` frozen, with a fresh ``PromptHead`` of ``width`` (drawn from ``seed``, not the global generator)
    as its output layer: only the head's MLP trains."""
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = PromptHead(model.get_output_embeddings(), model.config.hidden_size, width)
    model.set_output_embeddings(head.to(next(model.parameters()).device))
    return model


def prompt_head(model: PreTrainedModel) -> PromptHead | None:
    head = model.get_output_embeddings()
    return head if isinstance(head, PromptHead) else None


def save_lm(model: PreTrainedModel, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained`` (safetensors), of ``state_dict`` when given (the weights FSDP gathered from its
    shards, ``distributed.full_state``); a prompt policy's LM is saved without its head, and the head's MLP beside
    it (``PROMPT_HEAD_FILE``), which ``load_lm`` puts back."""

    head = prompt_head(model)
    if head is None:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        return
    if state_dict is not None:
        raise ValueError("save_lm: a prompt policy is saved from its own weights, not a gathered state dict")
    model.set_output_embeddings(head.lm_head)
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        model.set_output_embeddings(head)
    save_prompt_head(head, folder)


def save_prompt_head(head: PromptHead, folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in head.mlp.state_dict().items()}
    save_file(tensors, Path(folder) / PROMPT_HEAD_FILE, metadata={"width": str(head.mlp[0].out_features)})


def decoder_start_id(model: PreTrainedModel) -> int:
    start = model.config.decoder_start_token_id
    if start is None:
        start = model.config.pad_token_id
    if start is None:
        raise ValueError(f"{model.config.model_type}: config has neither decoder_start_token_id nor pad_token_id")
    return int(start)


def decoder_only_inputs(batch: Batch, n_prompt_repeat: int) -> dict[str, torch.Tensor]:
    """A decoder-only forward's inputs: each prompt repeated ``n_prompt_repeat`` times, then its response."""
    prompt_ids = batch.prompt_ids.repeat_interleave(n_prompt_repeat, dim=0)
    prompt_mask = batch.prompt_mask.repeat_interleave(n_prompt_repeat, dim=0)
    ids = torch.cat([prompt_ids, batch.response_ids], dim=1)
    mask = torch.cat([prompt_mask, batch.response_mask], dim=1)
    # Left padding: positions count real tokens only, as generation does.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}


MIN_SHARED_PREFIX = 8  # leading tokens every prompt of a batch must share for a pass of their own to pay


def shared_prefix_len(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading tokens all of a batch's left-padded prompts ``ids`` (B, P) have in common (a chat template's
    system turn, an instruction), leaving each prompt at least one token of its own; 0 for fewer than
    ``MIN_SHARED_PREFIX`` or a batch of one prompt."""
    lengths = mask.sum(-1)
    most = int(lengths.min()) - 1
    if ids.shape[0] < 2 or most < MIN_SHARED_PREFIX:
        return 0
    cols = (ids.shape[1] - lengths)[:, None] + torch.arange(most, device=ids.device)  # each row's first tokens
    lead = ids.gather(1, cols)
    n = int((lead == lead[:1]).all(0).long().cumprod(0).sum())
    return n if n >= MIN_SHARED_PREFIX else 0


def prefill(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> tuple[Any, torch.Tensor]:
    """A decoder-only forward of left-padded prompts ``ids`` (B, P) that fills a KV cache. On the CPU the leading
    tokens every prompt shares (``shared_prefix_len``) run once, as one row whose cache every prompt then reads, and
    each prompt's rest runs after them at the same positions: the values of one pass over the whole prompts (a
    test) for less work (a 93-token docstring prompt shares 38 tokens of chat template and instruction). Returns
    the last pass's output, whose ``past_key_values`` hold all P columns, and the (B, P) attention mask of those
    columns. ``kwargs`` go to both passes (e.g. ``logits_to_keep=1``)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    n = shared_prefix_len(ids, mask) if ids.device.type == "cpu" else 0
    if not n:
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs), mask
    first = ids.shape[1] - int(mask[0].sum())
    shared = model(input_ids=ids[:1, first:first + n], use_cache=True, **kwargs)
    cache = shared.past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    # The cache's columns: the shared tokens, then each prompt's rest (its own copy of the shared tokens masked).
    cached = torch.cat([torch.ones_like(mask[:, :n]), (mask.bool() & (pos >= n))[:, n:].to(mask.dtype)], dim=1)
    out = model(input_ids=ids[:, n:], attention_mask=cached, position_ids=pos[:, n:], past_key_values=cache,
                use_cache=True, **kwargs)
    return out, cached


def shares_prompts(model: PreTrainedModel, batch: Batch) -> bool:
    """Whether a decoder-only forward runs the prompts in a pass of their own whose cache the responses read
    (``_shared_prompt_forward``: each prompt once for its K responses, and the prefix all prompts share once,
    ``prefill``) rather than one pass over the concatenated sequences. Both give the same values
    (tests/test_models_sampling.py); which is faster depends on the device. Measured with the guidance backbone
    (`make perf`'s guidance row, K = 3, SmolLM2-135M's 4 layers): on a 2-core CPU, compute-bound, sharing runs 2.1x
    the rows/s; on an H100 (bf16), bound by kernel launches at these sizes, sharing (two passes, a cache copy) ran
    0.45-0.58x of repeating at 8, 24 and 64 prompts. So: share on the CPU only. Not while training with gradient
    checkpointing, which keeps no cache to share, nor on sharded (FSDP) weights, whose forwards are collectives that
    every rank must run alike."""
    if model.training and getattr(model, "is_activation_checkpointing", False) or distributed.is_sharded(model):
        return False
    return batch.prompt_ids.device.type == "cpu" and (
        batch.group_size > 1 or shared_prefix_len(batch.prompt_ids, batch.prompt_mask) > 0)


def _shared_prompt_forward(model: PreTrainedModel, batch: Batch, **prompt_kwargs: Any) -> tuple[Any, Any]:
    """Decoder-only forward of K responses per prompt that runs each prompt once: the prompt pass (``prefill``)
    fills a cache, repeated K times, which the responses' pass attends to (same positions and masks as the
    concatenated sequence). Returns both passes' outputs; gradients flow through the cache."""
    prompt, cached = prefill(model, batch.prompt_ids, batch.prompt_mask, **prompt_kwargs)
    cache = prompt.past_key_values
    k = batch.group_size
    if k > 1:
        cache.batch_repeat_interleave(k)
    p = batch.prompt_ids.shape[1]
    positions = decoder_only_inputs(batch, k)["position_ids"][:, p:]
    mask = torch.cat([cached.repeat_interleave(k, dim=0), batch.response_mask], dim=1)
    responses = model(input_ids=batch.response_ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True)
    return prompt, responses


def _encode_once(model: PreTrainedModel, batch: Batch) -> tuple[tuple[torch.Tensor], torch.Tensor]:
    """Run the encoder once per prompt and expand its states to the K responses of that prompt."""
    encoder = model.get_encoder()
    hidden = encoder(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask).last_hidden_state
    k = batch.group_size
    return (hidden.repeat_interleave(k, dim=0),), batch.prompt_mask.repeat_interleave(k, dim=0)


def _with_start(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.full((ids.shape[0], 1), decoder_start_id(model), dtype=ids.dtype, device=ids.device)
    return torch.cat([start, ids], dim=1), torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


def response_logits(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """(N, T, V) logits where [:, t] predicts response token t given the prompt and tokens < t."""
    t = batch.response_ids.shape[1]
    if is_seq2seq(model):
        enc, enc_mask = _encode_once(model, batch)
        dec_ids, dec_mask = _with_start(model, batch.response_ids[:, :-1], batch.response_mask[:, :-1])
        out = model(encoder_outputs=enc, attention_mask=enc_mask, decoder_input_ids=dec_ids,
                    decoder_attention_mask=dec_mask, use_cache=False)
        return out.logits
    if shares_prompts(model, batch):
        prompt, responses = _shared_prompt_forward(model, batch, logits_to_keep=1)
        first = prompt.logits[:, -1:].repeat_interleave(batch.group_size, dim=0)  # predicts response token 0
        return torch.cat([first, responses.logits[:, : t - 1]], dim=1)
    out = model(**decoder_only_inputs(batch, batch.group_size), use_cache=False, logits_to_keep=t + 1)
    # logits_to_keep keeps the last t + 1 positions: those from column p - 1 on, which predict response tokens.
    return out.logits[:, :t]


def response_hidden(backbone: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """(N, T, d) last hidden states at the positions whose input token is response token t.

    ``backbone`` is a base model without LM head (``AutoModel``: e.g. LlamaModel, T5Model).
    """
    p = batch.prompt_ids.shape[1]
    if is_seq2seq(backbone):
        enc, enc_mask = _encode_once(backbone, batch)
        dec_ids, dec_mask = _with_start(backbone, batch.response_ids, batch.response_mask)
        out = backbone(encoder_outputs=enc, attention_mask=enc_mask, decoder_input_ids=dec_ids,
                       decoder_attention_mask=dec_mask, use_cache=False)
        return out.last_hidden_state[:, 1:]
    if shares_prompts(backbone, batch):
        return _shared_prompt_forward(backbone, batch)[1].last_hidden_state
    out = backbone(**decoder_only_inputs(batch, batch.group_size), use_cache=False)
    return out.last_hidden_state[:, p:]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_local_path(spec: str | Path) -> bool:
    """Whether a model spec can only be a local path, never a hub id (``name`` or ``namespace/name``): absolute,
    starting with ``.`` or ``~``, or with more than one ``/``."""
    text = str(spec)
    return Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text


def require_model_folder(path: str | Path) -> None:
    """A spec that can only be a local path must be an existing folder: ``FileNotFoundError`` naming it (instead
    of the hub's complaint about a malformed repository id)."""
    if is_local_path(path) and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"{path}: no such model folder (has the stage that writes it run?)")


def require_safetensors(path: str | Path) -> None:
    """Refuse a local model folder whose weights are only pickle checkpoints (loading one can run code), or whose
    safetensors files are damaged (a truncated file names itself here, not deep inside a loader)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    weights = sorted(folder.glob("*.safetensors"))
    for file in weights:
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, not exported)
            raise ValueError(f"{file}: damaged weights ({e}); if it is a pipeline output, `dvc status` shows it "
                             "as modified and `dvc checkout --force` (or `dvc repro`) restores it") from None
    if weights:
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder}: only safetensors weights are loaded, found pickle checkpoint(s) "
                         f"{', '.join(pickles[:3])}; convert them with `model.save_pretrained(folder)` from a "
                         "trusted environment")


DECODE_ATTENTION = "ptg_decode"  # transformers' SDPA, with ``decode_attention`` for one query token on a CPU


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of a decode step (one query token per row) on the CPU as two matmuls and a softmax, the query heads
    grouped by the key/value head they share: (B, H, 1, d) against (B, KV, L, d). torch's fused CPU kernel spends
    0.85 ms a call on it at batch 16 (SmolLM2, bf16), 18 % of greedy decoding; this runs greedy decoding 1.09x as
    fast in bf16 (no faster in fp32). Everything else (prefill, training, other devices, dropout, position biases)
    goes to transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q_len, d = query.shape
    kv = key.shape[1]
    if (q_len != 1 or query.device.type != "cpu" or kwargs.get("dropout") or kwargs.get("position_bias") is not None
            or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scale = kwargs.get("scaling") or d ** -0.5
    scores = torch.matmul(query.reshape(b, kv, h // kv, d), key.transpose(-1, -2)) * scale  # (B, KV, H / KV, L)
    if attention_mask is not None:  # (B, 1, 1, L), True = attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    out = torch.matmul(scores.float().softmax(-1).to(value.dtype), value)  # (B, KV, H / KV, d)
    return out.reshape(b, 1, h, d), None


def register_decode_attention() -> None:
    """Make ``DECODE_ATTENTION`` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


def load_lm(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
            ) -> PreTrainedModel:
    """Load a seq2seq or causal LM from a local folder (or a hub id when online), from safetensors only; with its
    prompt head when the folder has one (``save_lm``). Weights in ``dtype``: fp32 (what training updates), or bf16
    for a model that only infers under ``precision`` bf16 (its weights cast once, at load, rather than per
    autocast region: 1.09x greedy decoding on a CPU with avx512_bf16)."""
    require_model_folder(path)
    require_safetensors(path)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    else:
        register_decode_attention()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     attn_implementation=DECODE_ATTENTION).to(device)
    head_file = Path(path) / PROMPT_HEAD_FILE
    if head_file.is_file():  # a prompt policy: the frozen LM and its trained head
        with safe_open(head_file, "pt") as f:
            width = int(f.metadata()["width"])
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        add_prompt_head(model, width, seed=0).get_output_embeddings().mlp.load_state_dict(state)
        model.get_output_embeddings().to(dtype)
    return model


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    require_model_folder(path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
