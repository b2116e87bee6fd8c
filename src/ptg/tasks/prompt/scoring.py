"""How the prompt task scores a prompt (rank@r, train_lm@r's credit and checkpoint selection): the frozen few-shot
classifier, whose gap reward is the task's sequence-level preference.

A small policy LM writes a discrete prompt; the classifier (a frozen LM) reads "{text} {prompt}" and its next-token
distribution restricted to one verbalizer token per class gives the class probabilities (spec §3c). Two kinds:

- ``causal`` (default; e.g. SmolLM2-135M): the logits after the filled template. Each text is run once and its KV
  cache is reused for every prompt, so scoring P prompts on one text costs 1 + ceil(P / batch_size) forward passes.
- ``masked`` (RLPrompt's roberta-large set-up): the logits at the ``{mask}`` position; no cache.

``Classifier.calls`` and ``Classifier.scored`` count forward passes and scored (prompt, text) pairs: the budget
methods are compared at. ``gap_rewards`` (pure math) turns class probabilities into the per-prompt reward.
Used as a library: ``load_classifier(folder, None, None, [" terrible", " great"]).probs(texts, prompts)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ptg.config import Params, SamplingConfig, TaskParams
from ptg.lm.models import load_tokenizer, require_model_folder, require_safetensors
from ptg.tasks.prompt import read_labelled, split_of_group, start_ids

if TYPE_CHECKING:
    from ptg.config import TrainConfig
    from ptg.lm.train import SampleScorer, Validator
    from ptg.pipeline import Context

KINDS = ("causal", "masked")
DEFAULT_TEMPLATES = {"causal": "{text} {prompt}", "masked": "{text} {prompt} {mask} ."}


def verbalizer_ids(tokenizer: PreTrainedTokenizerBase, verbalizers: Sequence[str],
                   where: str = "task.verbalizers") -> list[int]:
    """The token id of each verbalizer (one class each); every one must encode to exactly one distinct token."""
    if len(verbalizers) < 2:
        raise ValueError(f"{where}: need at least two verbalizers (one per class); got {list(verbalizers)!r}")
    ids: list[int] = []
    for word in verbalizers:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(f"{where}: verbalizer {word!r} must be one token, but it encodes to {len(tokens)} "
                             f"tokens {tokenizer.convert_ids_to_tokens(tokens)!r} (ids {tokens})")
        if tokens[0] in ids:
            other = verbalizers[ids.index(tokens[0])]
            raise ValueError(f"{where}: verbalizers {other!r} and {word!r} are the same token id {tokens[0]}")
        ids.append(tokens[0])
    return ids


def gap_rewards(probs: torch.Tensor, labels: torch.Tensor, correct_coeff: float = 200.0,
                incorrect_coeff: float = 180.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RLPrompt's piecewise gap reward (spec §3c, test vector §8.7).

    probs: (P, N, C) class probabilities of P prompts on N examples; labels: (N,) class indices.
    gap = p[y] - max_{c != y} p[c]; reward = gap * (correct_coeff if gap > 0 else incorrect_coeff).
    Returns (mean reward per prompt (P,), accuracy per prompt (P,) = mean of [gap > 0]).

    The other classes are excluded by index. RLPrompt excludes every column whose probability *equals* p[y]; the
    two agree except on ties, where RLPrompt's gap becomes p[y] + 1 (a tie scored as a confident hit).
    """
    if probs.dim() != 3 or probs.shape[-1] < 2:
        raise ValueError(f"probs must be (P, N, C) with C >= 2; got shape {tuple(probs.shape)}")
    if labels.shape != probs.shape[1:2]:
        raise ValueError(f"labels must be ({probs.shape[1]},) for probs {tuple(probs.shape)}; "
                         f"got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= probs.shape[-1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[-1]}); got {labels.tolist()}")
    index = labels.to(probs.device).view(1, -1, 1).expand(probs.shape[0], -1, 1)
    label_p = probs.gather(-1, index).squeeze(-1)
    others = probs.scatter(-1, index, float("-inf")).amax(-1)
    gap = label_p - others
    correct = gap > 0
    reward = torch.where(correct, gap * correct_coeff, gap * incorrect_coeff)
    return reward.mean(-1), correct.float().mean(-1)


def contextual_calibration(probs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Contextual calibration (Zhao et al. 2021, eq. 2 with W = diag(p_cf)^-1, b = 0): divide each prompt's
    class probabilities by its content-free ones and renormalise. probs (P, N, C), reference (P, C)."""
    scaled = probs / reference.unsqueeze(1)
    return scaled / scaled.sum(-1, keepdim=True)


def check_template(template: str, kind: str) -> None:
    """A causal template holds ``{text}`` then ``{prompt}`` once each; a masked one also ``{mask}`` once."""
    if kind not in KINDS:
        raise ValueError(f"classifier kind must be one of {KINDS}; got {kind!r}")
    needed = ("{text}", "{prompt}", "{mask}") if kind == "masked" else ("{text}", "{prompt}")
    counts = {slot: template.count(slot) for slot in ("{text}", "{prompt}", "{mask}")}
    if any(counts[s] != 1 for s in needed) or (kind == "causal" and counts["{mask}"]):
        raise ValueError(f"{kind} classifier template {template!r} must contain each of {', '.join(needed)} "
                         f"exactly once{'' if kind == 'masked' else ' and no {mask}'}; found {counts}")
    if kind == "causal" and template.index("{text}") > template.index("{prompt}"):
        raise ValueError(f"causal classifier template {template!r} must put {{text}} before {{prompt}} (the text's "
                         "cache is shared by all prompts)")


PREFIX_CACHE_TEXTS = 256


@dataclass(frozen=True)
class _Prefix:
    """A chunk of texts' prefixes run once: each layer's (keys, values) and the left-padded attention mask."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor


@dataclass
class Classifier:
    """A frozen LM that classifies texts given a prompt. ``template`` None means the kind's default."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    verbalizers: Sequence[str]
    template: str | None = None
    kind: str = "causal"
    ids: list[int] = field(init=False)
    calls: int = field(default=0, init=False)
    scored: int = field(default=0, init=False)
    # The prefixes' caches by chunk of texts, kept for the first PREFIX_CACHE_TEXTS texts: the few-shot train and
    # validation texts are scored again at every step, their prefixes run once per process.
    _prefixes: dict[tuple[tuple[int, ...], ...], _Prefix] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"classifier kind must be one of {KINDS}; got {self.kind!r}")
        self.template = DEFAULT_TEMPLATES[self.kind] if self.template is None else self.template
        check_template(self.template, self.kind)
        self.ids = verbalizer_ids(self.tokenizer, self.verbalizers)
        if self.kind == "masked" and self.tokenizer.mask_token_id is None:
            raise ValueError(f"masked classifier: tokenizer {type(self.tokenizer).__name__} has no mask token")
        self.model.eval().requires_grad_(False)

    def probs(self, texts: Sequence[str], prompts: Sequence[str], batch_size: int = 16, calibrate: bool = False,
              uncached: bool = False) -> torch.Tensor:
        """(P, N, C) class probabilities (fp32, on the CPU) of every prompt on every text. ``calibrate`` divides by
        the content-free probabilities (``calibration``); ``uncached`` (causal) runs each full sequence, for tests."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if not texts or not prompts:
            raise ValueError(f"need at least one text and one prompt; got {len(texts)} texts, {len(prompts)} prompts")
        with torch.inference_mode():
            if self.kind == "masked":
                out = self._masked(texts, prompts, batch_size)
            else:
                out = self._causal(texts, prompts, batch_size, uncached)
        self.scored += len(texts) * len(prompts)
        out = out.float().cpu().clone()  # clone: a normal tensor, not an inference-mode one
        return contextual_calibration(out, self.calibration(prompts, batch_size=batch_size)) if calibrate else out

    def calibration(self, prompts: Sequence[str], content_free: str = "N/A", batch_size: int = 16) -> torch.Tensor:
        """(P, C) class probabilities of each prompt on the content-free text (counted in ``calls``/``scored``)."""
        return self.probs([content_free], prompts, batch_size=batch_size)[:, 0]

    def _class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) softmax over the verbalizer ids of (B, V) next-token logits, in fp32."""
        return logits[:, self.ids].float().softmax(-1)

    def _prefix_ids(self, text: str) -> list[int]:
        """The template up to and including the text, with the tokenizer's special tokens (BOS, if it adds one)."""
        assert self.template is not None
        head = self.template[:self.template.index("{text}")] + text
        ids = self.tokenizer.encode(head, add_special_tokens=True)
        if not ids:
            raise ValueError(f"classifier template {self.template!r} with text {text!r}: the prefix has no tokens")
        return ids

    def _suffix_ids(self, prompt: str) -> list[int]:
        """The rest of the template with the prompt filled in, encoded on its own (no special tokens), so that the
        cached and uncached paths see the same ids."""
        assert self.template is not None
        tail = self.template[self.template.index("{text}") + len("{text}"):].replace("{prompt}", prompt)
        ids = self.tokenizer.encode(tail, add_special_tokens=False)
        if not ids:
            raise ValueError(f"classifier template {self.template!r} with prompt {prompt!r}: the part after the "
                             "text has no tokens")
        return ids

    def _causal(self, texts: Sequence[str], prompts: Sequence[str], batch_size: int, uncached: bool) -> torch.Tensor:
        """(P, N, C): texts in chunks of ``batch_size // P`` (one when P >= batch_size); each chunk's prefixes run
        once, left-padded in one batch (kept for the next call while the memo has room), then every (text, prompt)
        row of the chunk in batches of about ``batch_size`` rows over copies of their prefix's cache."""
        suffixes = [self._suffix_ids(p) for p in prompts]
        out = torch.empty(len(prompts), len(texts), len(self.ids))
        per_chunk, prompt_step = max(1, batch_size // len(prompts)), min(len(prompts), batch_size)
        for t0 in range(0, len(texts), per_chunk):
            prefixes = [self._prefix_ids(t) for t in texts[t0:t0 + per_chunk]]
            kv = None if uncached else self._prefill(prefixes)
            for p0 in range(0, len(prompts), prompt_step):
                probs = self._class_probs(self._next_logits(prefixes, suffixes[p0:p0 + prompt_step], kv))
                out[p0:p0 + prompt_step, t0:t0 + len(prefixes)] = probs.view(len(prefixes), -1, len(self.ids)
                                                                              ).transpose(0, 1).cpu()
        return out

    def _prefill(self, prefixes: list[list[int]]) -> _Prefix:
        """The prefixes' per-layer (keys, values), left-padded to one length, with their attention mask."""
        key = tuple(map(tuple, prefixes))
        if key in self._prefixes:
            return self._prefixes[key]
        dev = self.model.device
        ids, mask = _pad(prefixes, self.tokenizer.pad_token_id, dev, left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.calls += 1
        kv = _Prefix([(layer.keys, layer.values) for layer in out.past_key_values.layers], mask)
        if sum(len(k) for k in self._prefixes) + len(prefixes) <= PREFIX_CACHE_TEXTS:
            self._prefixes[key] = kv
        return kv

    def _next_logits(self, prefixes: list[list[int]], suffixes: list[list[int]], kv: _Prefix | None) -> torch.Tensor:
        """(T * S, V) next-token logits after each prefix + each suffix, text-major: over the prefixes' cache
        ``kv``, or with ``kv`` None over the whole sequences. Suffixes are right-padded (causal: padding never
        reaches earlier positions); the LM head reads only each row's last real position."""
        dev, t, s = self.model.device, len(prefixes), len(suffixes)
        if kv is None:
            ids, mask = _pad([p + x for p in prefixes for x in suffixes], self.tokenizer.pad_token_id, dev)
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            tail, tail_mask = _pad(suffixes, self.tokenizer.pad_token_id, dev)
            ids, mask = tail.repeat(t, 1), tail_mask.repeat(t, 1)
            # A fresh cache per batch: the forward appends to it, and the prefixes' tensors must stay as they are.
            cache = DynamicCache([(k.repeat_interleave(s, 0), v.repeat_interleave(s, 0)) for k, v in kv.layers],
                                 config=self.model.config)
            head = kv.mask.repeat_interleave(s, 0)
            pos = head.sum(-1, keepdim=True) + mask.cumsum(-1) - 1
            hidden = self.model.base_model(input_ids=ids, attention_mask=torch.cat([head, mask], dim=1),
                                           position_ids=pos, past_key_values=cache, use_cache=True
                                           ).last_hidden_state
        self.calls += 1
        last = mask.sum(-1) - 1
        return self.model.get_output_embeddings()(hidden[torch.arange(len(ids), device=dev), last])

    def _masked(self, texts: Sequence[str], prompts: Sequence[str], batch_size: int) -> torch.Tensor:
        """(P, N, C) from the logits at the mask position of each filled template, (prompt, text) pairs batched."""
        assert self.template is not None
        tok, dev = self.tokenizer, self.model.device
        filled = [self.template.replace("{mask}", tok.mask_token).replace("{prompt}", p).replace("{text}", t)
                  for p in prompts for t in texts]
        out = []
        for i in range(0, len(filled), batch_size):
            rows = [tok.encode(s, add_special_tokens=True) for s in filled[i:i + batch_size]]
            where = [[j for j, x in enumerate(r) if x == tok.mask_token_id] for r in rows]
            for s, w in zip(filled[i:i + batch_size], where, strict=True):
                if len(w) != 1:
                    raise ValueError(f"masked classifier: {s!r} holds {len(w)} {tok.mask_token!r} tokens, not one")
            ids, mask = _pad(rows, tok.pad_token_id, dev)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            self.calls += 1
            pos = torch.tensor([w[0] for w in where], device=dev)
            out.append(self._class_probs(logits[torch.arange(len(rows), device=dev), pos]))
        return torch.cat(out).view(len(prompts), len(texts), -1)


def _pad(rows: list[list[int]], pad_id: int | None, device: torch.device, left: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids padded with ``pad_id`` (0 when None: masked out anyway), on the right unless ``left``, and their
    attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def load_classifier(path_or_model: str | Path | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                    template: str | None, verbalizers: Sequence[str], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, kind: str = "causal") -> Classifier:
    """A frozen classifier from a local model folder (safetensors only) or a model object. ``tokenizer`` None
    loads the folder's; ``template`` None is the kind's default."""
    if kind not in KINDS:
        raise ValueError(f"classifier kind must be one of {KINDS}; got {kind!r}")
    if isinstance(path_or_model, PreTrainedModel):
        model = path_or_model.to(device=device, dtype=dtype)
        if tokenizer is None:
            raise ValueError("load_classifier: a model object needs its tokenizer (got tokenizer=None)")
    else:
        require_model_folder(path_or_model)
        require_safetensors(path_or_model)
        cls = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        model = cls.from_pretrained(path_or_model, dtype=dtype, use_safetensors=True).to(device)
        tokenizer = load_tokenizer(path_or_model) if tokenizer is None else tokenizer
    return Classifier(model, tokenizer, verbalizers, template, kind)


# ---------------------------------------------------------------------------------------------------------------
# The classifier's reward
# ---------------------------------------------------------------------------------------------------------------


def load_task_classifier(task: TaskParams, ctx: Context) -> Classifier:
    """The frozen classifier: ``task.classifier``, or the materialised policy (data/rounds/0/lm) when null. It is
    the task's measure (its rewards rank prompts, its accuracy is the result), so it computes in fp32 whatever
    ``precision`` the learner uses: in bf16 SmolLM2's verbalizer probabilities moved by up to 0.12."""
    path = task.classifier or str(Path("data") / "rounds" / "0" / "lm")
    return load_classifier(path, None, template=task.template, verbalizers=task.verbalizers, device=ctx.device,
                           dtype=torch.float32, kind=task.classifier_kind)


def label_ids(frame: pd.DataFrame, task: TaskParams) -> torch.Tensor:
    index = {name: i for i, name in enumerate(task.labels)}
    return torch.tensor([index[label] for label in frame["label"]])


@dataclass(frozen=True)
class PromptScores:
    reward: list[float]  # mean gap reward per prompt
    accuracy: list[float]  # share of texts classified right per prompt
    correct: Any  # (P, N) bool tensor


def score_prompts(clf: Classifier, prompts: Sequence[str], frame: pd.DataFrame, task: TaskParams,
                  calibrate: bool | None = None) -> PromptScores:
    """Each prompt's gap reward and accuracy on the texts of ``frame`` (spec §3c)."""
    probs = clf.probs(frame["text"].tolist(), list(prompts), batch_size=task.batch_size,
                      calibrate=task.calibrate if calibrate is None else calibrate)
    labels = label_ids(frame, task)
    reward, accuracy = gap_rewards(probs, labels, task.correct_coeff, task.incorrect_coeff)
    correct = probs.argmax(-1) == labels[None, :]
    return PromptScores(reward.tolist(), accuracy.tolist(), correct)


def prompt_texts(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[Sequence[int]]) -> list[str]:
    """Prompts as the classifier reads them: decoded without special tokens, stripped."""
    return [tokenizer.decode(list(ids), skip_special_tokens=True).strip() for ids in token_ids]


@dataclass(frozen=True)
class PromptScorer:
    """A ``train.SampleScorer``: each sampled prompt's mean gap reward on ``frame``'s texts; ``classifier.scored``
    counts the (prompt, text) pairs it spent."""

    classifier: Classifier
    tokenizer: PreTrainedTokenizerBase
    frame: pd.DataFrame
    task: TaskParams

    def __call__(self, references: Sequence[Sequence[str]], samples: list[list[list[int]]]) -> list[list[float]]:
        texts = prompt_texts(self.tokenizer, [s for group in samples for s in group])
        flat = score_prompts(self.classifier, texts, self.frame, self.task).reward
        k = len(samples[0])
        return [flat[i:i + k] for i in range(0, len(flat), k)]


# ---------------------------------------------------------------------------------------------------------------
# The task's scoring concern (ptg.tasks.TaskScoring)
# ---------------------------------------------------------------------------------------------------------------


def needs_torch_to_rank(params: Params) -> bool:
    return True


def score_samples(samples: pd.DataFrame, ctx: Context) -> tuple[list[float], dict[str, Any]]:
    """Every prompt's mean gap reward on its group's texts (train texts for training groups, validation texts for
    held-out ones), with the classifier calls spent."""
    task = ctx.params.task
    clf = load_task_classifier(task, ctx)
    scores = pd.Series(0.0, index=samples.index)
    split = samples["id"].map(split_of_group)
    extra: dict[str, Any] = {"metric": "classifier gap reward"}
    for name in ("train", "validation"):
        rows, before = samples[split == name], clf.scored
        if not rows.empty:
            scores[rows.index] = score_prompts(clf, rows["text"].tolist(), read_labelled(name), task).reward
        extra[f"classifier_pairs_{name}"] = clf.scored - before
    return scores.tolist(), extra | {"classifier_pairs": clf.scored}


def sample_scorer(tokenizer: PreTrainedTokenizerBase, ctx: Context) -> SampleScorer:
    """The sequence-level credit of ``pg_credit: sequence``: the mean gap reward on the training texts, the calls
    counted in the scorer's ``classifier.scored``."""
    task = ctx.params.task
    return PromptScorer(load_task_classifier(task, ctx), tokenizer, read_labelled("train"), task)


def scorer_summary(score: SampleScorer | None) -> dict[str, Any]:
    """The task's budget: the classifier's calls in training."""
    return {"classifier_pairs": score.classifier.scored} if isinstance(score, PromptScorer) else {}


def validation_scorer(tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, ctx: Context) -> Validator:
    """What checkpoint selection maximises and the learning curve records: the greedy prompt's gap reward on the
    validation texts (``val_score``); objectives pg and grpo add it as ``val_reward_greedy`` and the mean reward of
    ``cfg.eval_samples`` sampled prompts (``val_reward_sampled``, from a generator seeded the same at every
    checkpoint of every arm)."""
    sp, task = ctx.params.sample, ctx.params.task
    curve = cfg.objective in ("pg", "grpo")
    sampled = SamplingConfig(cfg.eval_samples, sp.max_new_tokens, sp.temperature, sp.top_k, sp.top_p)
    clf = load_task_classifier(task, ctx)
    dev = read_labelled("validation")
    start = [start_ids(tokenizer)]

    def prompt_reward(model: PreTrainedModel, how: SamplingConfig, generator: Any) -> float:
        from ptg.lm.sampling import sample

        ids = sample(model, start, how, (), tokenizer.pad_token_id, ctx.device, ctx.dtype, generator=generator,
                     progress=False)[0]
        rewards = score_prompts(clf, prompt_texts(tokenizer, ids), dev, task).reward
        return sum(rewards) / len(rewards)

    def validate_prompt(model: PreTrainedModel) -> dict[str, float]:
        greedy = prompt_reward(model, SamplingConfig(1, sp.max_new_tokens, 0.0), None)
        if not curve:
            return {"val_score": greedy}
        gen = torch.Generator().manual_seed(cfg.seed + 7)
        return {"val_score": greedy, "val_reward_greedy": greedy,
                "val_reward_sampled": prompt_reward(model, sampled, gen)}

    return validate_prompt
