"""Typed, frozen views of ``params.yaml`` groups: each stage loads its group at the top of ``main()``.

Unknown or missing keys fail fast with the file and the key's name, so a typo in params.yaml never silently falls
back to a default; so does a value of the wrong type (``lr: 5e-4``, which YAML reads as a string; ``"3"`` for an
integer; ``true`` for a number) or out of range, naming the group, key and value. The library's configs
(``FitConfig``, ``TrainConfig``, ``SamplingConfig``) live here too, so that reading params imports no torch, and the
stage groups extend them with stage-only keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ptg.data import DataConfig

T = TypeVar("T")
OBJECTIVES: tuple[str, ...] = ("wmle", "reinforce")  # train_lm.objective
PG_CREDITS: tuple[str, ...] = ("sequence", "token")  # train_lm.pg_credit: who gets the policy-gradient credit
NORMALIZATIONS: tuple[str, ...] = ("sequence", "batch")  # how wmle normalises token weights (ptg.losses)
AGG_METHODS: tuple[str, ...] = ("avg", "sum", "soft_max", "soft_min")  # sequence score from token rewards
SQUASH_MODES: tuple[str, ...] = ("soft_clamp", "sigmoid")  # token reward from the head's output
PREFERENCE_LAYOUTS = ("auto", "listwise", "pairwise")


class ParamsError(ValueError):
    """A params file is missing a key, has an unknown one, or a value of the wrong type."""


def _at_least(cfg: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}; got {getattr(cfg, name)!r}")


# The library's configs (ptg.sampling, ptg.train, ptg.guidance use them); defined here, with no torch import, so
# reading params is cheap for every stage.


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = field(default=1, metadata={"help": "K: continuations per input"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per continuation at most (EOS included)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 decodes greedily"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 keeps all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 keeps all"})

    def __post_init__(self) -> None:
        for name, ok in (("num_samples", self.num_samples >= 1), ("max_new_tokens", self.max_new_tokens >= 1),
                         ("temperature", self.temperature >= 0), ("top_k", self.top_k >= 0),
                         ("top_p", 0 < self.top_p <= 1)):
            if not ok:
                raise ValueError(f"SamplingConfig.{name} is out of range: {getattr(self, name)!r}")


@dataclass(frozen=True)
class TrainConfig:
    objective: str = field(default="wmle", metadata={"help": "wmle or reinforce"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate (constant, as the reference)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer update"})
    max_updates: int = field(default=100, metadata={"help": "optimizer updates"})
    clip_norm: float = field(default=5.0, metadata={"help": "gradient-norm clipping"})
    use_q: bool = field(default=False, metadata={"help": "weight tokens by Q_t = sum_{t'>=t} r_t' instead of r_t"})
    exp_rewards: bool = field(default=False, metadata={"help": "wmle: weight by exp(r_t)"})
    normalize: str = field(default="sequence", metadata={
        "help": "wmle: token weights sum to 1 per sequence (the paper's) or per batch (token-mean with uniform "
                "weights)"})
    carry_optimizer: bool = field(default=False, metadata={
        "help": "keep the AdamW state from round to round (the reference's default); false = fresh each round"})
    entropy_coeff: float = field(default=0.125, metadata={"help": "reinforce: max-entropy bonus alpha"})
    contrast: float | None = field(default=None, metadata={
        "help": "wmle: null = the paper's weights (w_t proportional to the guidance's reward r_t); a strength "
                "lambda >= 0 = w_t = clip(1 + lambda * z_t, weight_min, weight_max), z_t the reward standardised "
                "within the reference (0 = uniform weights, plain MLE bit for bit)"})
    weight_min: float = field(default=0.1, metadata={"help": "contrast: smallest token weight (<= 1)"})
    weight_max: float = field(default=5.0, metadata={"help": "contrast: largest token weight (>= 1)"})
    pg_coeff: float = field(default=0.0, metadata={
        "help": "wmle: alpha of a policy-gradient term on the LM's own samples added to the MLE loss (0 = off, "
                "the MLE update bit for bit)"})
    pg_credit: str = field(default="token", metadata={
        "help": "pg_coeff > 0: sequence (every token of a sample gets its metric score minus the leave-one-out "
                "baseline) or token (each token its guidance reward minus the leave-one-out baseline: PTG); "
                "objective reinforce: token (the guidance's rewards, the paper's) or sequence (each sample's "
                "score standardised over the micro-batch's samples on every token: RLPrompt's)"})
    pg_samples: int = field(default=3, metadata={"help": "pg_coeff > 0: on-policy samples per input (K >= 2)"})
    eval_every: int = field(default=0, metadata={
        "help": "score greedy predictions of eval_items validation inputs (ROUGE-L) every this many updates and "
                "keep the best checkpoint (the start included); 0 = off, the last update is kept"})
    eval_items: int = field(default=64, metadata={"help": "eval_every > 0: validation inputs scored"})
    seed: int = field(default=0, metadata={"help": "seed of data order and REINFORCE sampling"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}; got {self.normalize!r}")
        if self.pg_credit not in PG_CREDITS:
            raise ValueError(f"pg_credit must be one of {', '.join(PG_CREDITS)}; got {self.pg_credit!r}")
        for name in ("batch_size", "grad_accum", "max_updates", "eval_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.contrast is not None and self.contrast < 0:
            raise ValueError(f"contrast must be null or >= 0; got {self.contrast}")
        if not 0 <= self.weight_min <= 1 <= self.weight_max:
            raise ValueError(f"weight_min must be in [0, 1] and weight_max >= 1; got {self.weight_min}, "
                             f"{self.weight_max}")
        if self.pg_coeff < 0 or self.eval_every < 0 or self.pg_samples < 2:
            raise ValueError(f"pg_coeff and eval_every must be >= 0 and pg_samples >= 2; got {self.pg_coeff}, "
                             f"{self.eval_every}, {self.pg_samples}")
        if self.pg_coeff > 0 and self.objective != "wmle":
            raise ValueError("pg_coeff adds a policy-gradient term to the wmle objective; objective reinforce "
                             "is policy gradient already (set pg_coeff: 0)")


@dataclass(frozen=True)
class FitConfig:
    agg: str = field(default="avg", metadata={"help": "aggregation of token rewards: avg, sum, soft_max, soft_min"})
    temperature: float = field(default=2.0, metadata={"help": "beta of soft_max / soft_min aggregation"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate"})
    batch_groups: int = field(default=8, metadata={"help": "inputs (lists of K samples) per optimizer step"})
    max_updates: int = field(default=100, metadata={"help": "optimizer steps in this round"})
    eval_every: int = field(default=25, metadata={"help": "validate every this many updates (and at the end)"})
    clip_norm: float = field(default=5.0, metadata={"help": "gradient-norm clipping"})
    lr_decay: float = field(default=0.8, metadata={"help": "ReduceLROnPlateau factor"})
    lr_patience: int = field(default=2, metadata={"help": "ReduceLROnPlateau patience, in validations"})
    early_stop: int = field(default=7, metadata={"help": "stop after this many validations without improvement"})
    seed: int = field(default=0, metadata={"help": "seed of batch order and ListMLE tie breaks"})
    head_lr: float | None = field(default=None, metadata={
        "help": "Adam learning rate of the MLP head (null = lr): a head faster than the backbone leaves its "
                "initial constant output sooner"})

    def __post_init__(self) -> None:
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError(f"head_lr must be null or > 0; got {self.head_lr}")
        if self.agg not in AGG_METHODS:
            raise ValueError(f"agg must be one of {', '.join(AGG_METHODS)}; got {self.agg!r}")
        for name in ("batch_groups", "max_updates", "eval_every", "early_stop"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1; got {getattr(self, name)}")


@dataclass(frozen=True)
class RunParams:
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda, cuda:1, ..."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where fast), bf16 or fp32"})
    seed: int = field(default=0, metadata={"help": "base seed; each round and stage derives its own"})
    progress: bool = field(default=True, metadata={"help": "show progress bars (off under CI)"})
    launcher: str = field(default="python", metadata={
        "help": "the command dvc.yaml starts fit_guidance, train_lm and baseline with (${launcher} stages/X.py): "
                "python, or e.g. \"accelerate launch --multi_gpu --num_processes 4\" for data parallel"})

    def __post_init__(self) -> None:
        if not self.launcher.strip():
            raise ValueError(f"launcher must be a non-empty command (e.g. python); got {self.launcher!r}")


@dataclass(frozen=True)
class ModelParams:
    policy: str = field(default="smollm2-135m-instruct", metadata={
        "help": "smollm2-135m-instruct (offline default), tiny-llama / tiny-t5 (random, for tests), a local HF "
                "folder, or a hub id when online"})
    guidance: str | None = field(default=None, metadata={
        "help": "guidance backbone: null = the policy's first guidance_layers layers; else a path or hub id with "
                "the policy's tokenizer"})
    guidance_layers: int = field(default=4, metadata={"help": "layers kept when the guidance is a truncated policy"})
    max_prompt_tokens: int = field(default=384, metadata={
        "help": "prompt tokens at most (an over-long prompt loses the end of its text; instruction and template stay)"})
    max_target_tokens: int = field(default=48, metadata={"help": "reference tokens at most, EOS included"})

    def __post_init__(self) -> None:
        _at_least(self, 1, "guidance_layers", "max_prompt_tokens", "max_target_tokens")


@dataclass(frozen=True)
class SampleParams(SamplingConfig):
    batch_size: int = field(default=8, metadata={"help": "inputs per sampling batch"})
    train_inputs: int = field(default=64, metadata={"help": "training inputs sampled per round (seeded draw)"})
    validation_inputs: int = field(default=16, metadata={"help": "validation inputs sampled per round"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (rank orders the K samples of each input, and one sample "
                             f"orders nothing); got {self.num_samples}")
        _at_least(self, 1, "batch_size", "train_inputs", "validation_inputs")


# ptg.metrics.METRICS plus the two non-reference sources; spelled out here so that every stage (they all load their
# params through this module) does not depend on the metrics code. tests/test_reward_model.py checks they agree.
RANK_METRICS: tuple[str, ...] = ("meteor", "rouge", "chrf", "bleu", "file", "reward_model")
REWARD_DIRECTIONS: tuple[str, ...] = ("higher", "lower")
UNFINISHED_RANKING: tuple[str, ...] = ("keep", "last")
REWARD_INPUTS: tuple[str, ...] = ("prompt+response", "response")


@dataclass(frozen=True)
class RankParams:
    metric: str = field(default="meteor", metadata={
        "help": "meteor, rouge, chrf, bleu (against the references), file (human scores from scores_file) or "
                "reward_model (a local sequence-classification model's score, see reward_model)"})
    scores_file: str | None = field(default=None, metadata={
        "help": "with metric: file, a table (csv/jsonl/parquet) of id, text, score"})
    reward_model: str | None = field(default=None, metadata={
        "help": "with metric: reward_model, a local Hugging Face sequence-classification folder (safetensors "
                "weights and its tokenizer); a hub id only works online"})
    reward_batch_size: int = field(default=32, metadata={"help": "sequences per reward-model forward pass"})
    reward_label: int = field(default=0, metadata={
        "help": "the logit column that is the score: 0 for a 1-label reward head, the 'good' class of a classifier"})
    reward_direction: str = field(default="higher", metadata={
        "help": "higher (a larger score is better) or lower (the score is negated before ranking)"})
    reward_input: str = field(default="prompt+response", metadata={
        "help": "prompt+response (one user turn and one assistant turn through the reward model's chat template, "
                "else prompt + newline + response) or response (the response text alone)"})
    unfinished: str = field(default="keep", metadata={
        "help": "keep (rank by the score alone) or last (samples that hit sample.max_new_tokens without a stop "
                "token rank below every finished sample of their input, by score among themselves)"})

    def __post_init__(self) -> None:
        if self.metric not in RANK_METRICS:
            raise ValueError(f"metric must be one of {', '.join(RANK_METRICS)}; got {self.metric!r}")
        if self.metric == "reward_model" and not self.reward_model:
            raise ValueError(f"metric reward_model needs reward_model, a model folder; got {self.reward_model!r}")
        if isinstance(self.reward_batch_size, bool) or not isinstance(self.reward_batch_size, int) \
                or self.reward_batch_size < 1:
            raise ValueError(f"reward_batch_size must be an integer >= 1; got {self.reward_batch_size!r}")
        if isinstance(self.reward_label, bool) or not isinstance(self.reward_label, int) or self.reward_label < 0:
            raise ValueError(f"reward_label must be an integer >= 0; got {self.reward_label!r}")
        if self.reward_direction not in REWARD_DIRECTIONS:
            raise ValueError(f"reward_direction must be higher or lower; got {self.reward_direction!r}")
        if self.reward_input not in REWARD_INPUTS:
            raise ValueError(f"reward_input must be prompt+response or response; got {self.reward_input!r}")
        if self.unfinished not in UNFINISHED_RANKING:
            raise ValueError(f"unfinished must be keep or last; got {self.unfinished!r}")


@dataclass(frozen=True)
class FitGuidanceParams(FitConfig):
    head_hidden: int = field(default=2048, metadata={"help": "hidden width of the MLP head"})
    squash: str = field(default="soft_clamp", metadata={"help": "soft_clamp (reference) or sigmoid"})
    head_init_gain: float = field(default=1e-4, metadata={
        "help": "Xavier gain of the head's layers when round 1 creates it (the reference's 1e-4: every token starts "
                "at the same reward); larger starts the head with per-token differences"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 1, "head_hidden")
        if self.head_init_gain <= 0:
            raise ValueError(f"head_init_gain must be > 0; got {self.head_init_gain}")
        if self.squash not in SQUASH_MODES:
            raise ValueError(f"squash must be one of {', '.join(SQUASH_MODES)}; got {self.squash!r}")

    def fit_config(self) -> FitConfig:
        """The library's FitConfig part of these params (without the stage-only head keys)."""
        return FitConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FitConfig)})


@dataclass(frozen=True)
class LoraParams:
    """LoRA adapters (``peft``) instead of full fine-tuning: each round trains fresh adapters on the previous round's
    merged LM and saves both (the adapters under ``lm/adapter``; sampling, evaluation and the next round use the
    merged model). The baseline trains with the same setup."""

    rank: int = field(default=0, metadata={"help": "adapter rank r; 0 = full fine-tuning (no adapters)"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: updates are scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    target_modules: str | None = field(default=None, metadata={
        "help": "comma-separated module names (e.g. q_proj,v_proj), all-linear, or null for peft's default of the "
                "architecture (q_proj,v_proj for Llama, q,v for T5)"})

    def __post_init__(self) -> None:
        _at_least(self, 0, "rank")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0; got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True)
class TrainLMParams(TrainConfig):
    lora: LoraParams = field(default_factory=LoraParams, metadata={"help": "LoRA adapters (rank 0 = off)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora.enabled and self.carry_optimizer:
            raise ValueError("carry_optimizer needs full fine-tuning (lora.rank: 0): every round's LoRA adapters "
                             "are new parameters, so there is no optimizer state to carry")


TASKS: tuple[str, ...] = ("summarisation", "prompt")
CLASSIFIER_KINDS: tuple[str, ...] = ("causal", "masked")
BASELINE_BUDGETS: tuple[str, ...] = ("updates", "calls")


@dataclass(frozen=True)
class TaskParams:
    """What the pipeline learns: ``summarisation`` (weighted MLE on references, the stages' default) or ``prompt``
    (discrete prompts for a frozen few-shot classifier, REINFORCE on the guidance; the other keys apply)."""

    name: str = field(default="summarisation", metadata={"help": "summarisation or prompt"})
    classifier: str | None = field(default=None, metadata={
        "help": "prompt: the frozen classifier, null = model.policy (the offline default), or a local causal-LM "
                "or masked-LM folder"})
    classifier_kind: str = field(default="causal", metadata={
        "help": "prompt: causal (the next token after the template) or masked (the template's {mask})"})
    template: str = field(default="{text} {prompt}", metadata={
        "help": "prompt: how a text and a prompt become the classifier's input ({text}, {prompt}; masked: {mask})"})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "prompt: the class names, in verbalizer order"})
    verbalizers: tuple[str, ...] = field(default=(), metadata={
        "help": "prompt: one single-token word per label, read at the classifier's answer position"})
    shots: int = field(default=16, metadata={"help": "prompt: training and validation examples per class"})
    calibrate: bool = field(default=False, metadata={
        "help": "prompt: divide the class probabilities by those of a content-free input (contextual calibration)"})
    correct_coeff: float = field(default=200.0, metadata={"help": "prompt: gap reward scale of a correct example"})
    incorrect_coeff: float = field(default=180.0, metadata={"help": "prompt: gap reward scale of a wrong example"})
    manual_prompt: str = field(default="", metadata={"help": "prompt: the hand-written prompt baseline"})
    head_hidden: int = field(default=2048, metadata={
        "help": "prompt: hidden width of the policy's MLP on the frozen LM's last hidden state (0 = no MLP: the "
                "LM itself is trained, e.g. with train_lm.lora)"})
    candidates: int = field(default=16, metadata={
        "help": "prompt: prompts sampled from the trained policy (with its greedy one) and chosen among on "
                "validation"})
    batch_size: int = field(default=128, metadata={"help": "prompt: classifier rows (text x prompt) per forward pass"})
    baseline_budget: str = field(default="updates", metadata={
        "help": "prompt: the sequence-level baseline trains as many updates as PTG (updates; it calls the "
                "classifier at every one) or as many as the classifier calls PTG's ranking spent allow (calls)"})

    def __post_init__(self) -> None:
        for name in ("labels", "verbalizers"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings; got {value!r}")
        if self.baseline_budget not in BASELINE_BUDGETS:
            raise ValueError(f"baseline_budget must be one of {', '.join(BASELINE_BUDGETS)}; got "
                             f"{self.baseline_budget!r}")
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "verbalizers", tuple(self.verbalizers))
        if self.name not in TASKS:
            raise ValueError(f"name must be one of {', '.join(TASKS)}; got {self.name!r}")
        if self.classifier_kind not in CLASSIFIER_KINDS:
            raise ValueError(f"classifier_kind must be one of {', '.join(CLASSIFIER_KINDS)}; got "
                             f"{self.classifier_kind!r}")
        if self.name == "prompt":
            if len(self.labels) < 2 or len(self.labels) != len(self.verbalizers):
                raise ValueError(f"labels and verbalizers must be lists of the same length >= 2 (one verbalizer "
                                 f"per label); got labels {list(self.labels)}, verbalizers {list(self.verbalizers)}")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be distinct; got {list(self.labels)}")
        _at_least(self, 1, "shots", "candidates", "batch_size")
        _at_least(self, 0, "head_hidden")


@dataclass(frozen=True)
class EvaluateParams:
    split: str = field(default="test", metadata={
        "help": "test (reported results) or validation (for choosing settings: ablations never look at test)"})
    max_new_tokens: int = field(default=48, metadata={"help": "greedy decoding length at most"})
    batch_size: int = field(default=16, metadata={"help": "inputs per decoding batch"})
    subset_items: int = field(default=0, metadata={
        "help": "rounds before the last evaluate only the first this many test items (0 = all); the last round "
                "always evaluates the whole test split"})

    def __post_init__(self) -> None:
        if self.split not in ("test", "validation"):
            raise ValueError(f"split must be test or validation; got {self.split!r}")
        _at_least(self, 1, "max_new_tokens", "batch_size")
        _at_least(self, 0, "subset_items")


@dataclass(frozen=True)
class PreferencesParams:
    path: str | None = field(default=None, metadata={
        "help": "preference data: a jsonl/csv/parquet file, a folder of them, or a hub dataset id (online); "
                "null = none"})
    layout: str = field(default="auto", metadata={
        "help": "listwise (input, text, score rows), pairwise (prompt, chosen, rejected) or auto (pairwise when "
                "the chosen column exists)"})
    input_field: str = field(default="input", metadata={"help": "listwise: the column the candidates answer"})
    text_field: str = field(default="text", metadata={"help": "listwise: the candidate column"})
    score_field: str = field(default="score", metadata={"help": "listwise: the score column (higher = better)"})
    group_field: str = field(default="group", metadata={
        "help": "listwise: the column that groups candidates into one list (absent: the input does)"})
    reference_field: str = field(default="reference", metadata={"help": "optional reference column"})
    prompt_field: str = field(default="prompt", metadata={"help": "pairwise: the prompt column"})
    chosen_field: str = field(default="chosen", metadata={"help": "pairwise: the preferred response column"})
    rejected_field: str = field(default="rejected", metadata={"help": "pairwise: the other response column"})
    prompt_template: str = field(default="{input}", metadata={
        "help": "how an input becomes the prompt the guidance reads (the data group's template, e.g.)"})
    heldout_fraction: float = field(default=0.2, metadata={
        "help": "share of inputs held out for evaluation when the data has no split column"})
    weight: float = field(default=0.0, metadata={
        "help": "share of preference groups among the guidance's training groups in every round (0 = the LM's "
                "own samples only, 1 = preferences only)"})
    prior_updates: int = field(default=0, metadata={
        "help": "round 1 first fits this many updates on the preference groups alone (a prior guidance)"})
    seed: int = field(default=0, metadata={"help": "seed of the held-out split and of the mixing draw"})

    def __post_init__(self) -> None:
        if self.layout not in PREFERENCE_LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(PREFERENCE_LAYOUTS)}; got {self.layout!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1); got {self.heldout_fraction}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1]; got {self.weight}")
        if self.prior_updates < 0:
            raise ValueError(f"prior_updates must be >= 0; got {self.prior_updates}")
        if "{input}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{input}}; got {self.prompt_template!r}")


_KINDS: dict[str, tuple[str, Any]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def _type_error(name: str, annotation: Any, value: Any) -> str | None:
    """Why ``value`` does not fit a field annotated ``annotation`` (a string: this module and ptg.data use postponed
    annotations), or None when it fits or the annotation is not a plain scalar type."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    optional = "None" in kinds
    kinds = [k for k in kinds if k != "None"]
    if len(kinds) != 1 or kinds[0] not in _KINDS or (value is None and optional):
        return None
    what, fits = _KINDS[kinds[0]]
    if fits(value):
        return None
    hint = ""
    if isinstance(value, str) and kinds[0] in ("int", "float"):
        with contextlib.suppress(ValueError):
            float(value)
            hint = (" (YAML reads an exponent without a dot as a string: write 5.0e-4, not 5e-4)"
                    if "e" in value.lower() else " (quoted, it is a string: write it without quotes)")
    return f"{name} must be {what}{' or null' if optional else ''}; got {value!r} ({type(value).__name__}){hint}"


def _build(cls: type[T], values: Any, where: str) -> T:
    if not isinstance(values, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in values)
    if missing:
        raise ParamsError(f"{where}: missing key(s) {', '.join(missing)}")
    values = {n: _build(_NESTED[f.type], values[n], f"{where}.{n}") if f.type in _NESTED else values[n]
              for n, f in fields.items()}
    wrong = [e for n, f in fields.items() if (e := _type_error(n, f.type, values[n])) is not None]
    if wrong:
        raise ParamsError(f"{where}: " + "; ".join(wrong))
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ParamsError(f"{where}: {e}") from e


_NESTED: dict[str, type] = {"LoraParams": LoraParams}  # a group's sub-mapping, built and checked like a group
LOG_MODELS: tuple[str, ...] = ("best", "all", "none")


@dataclass(frozen=True)
class TrackingParams:
    """What MLflow keeps (not a DVC param: changing it reruns nothing)."""

    log_models: str = field(default="best", metadata={
        "help": "best (one registered version each of the best-evaluated PTG LM, transformers flavour in bf16, and "
                "of the guidance that trained it; superseded versions are deleted with their weights), all (every "
                "train_lm, fit_guidance and baseline folder logged and registered) or none (runs, metrics and "
                "artifacts only); the models always stay in DVC"})

    def __post_init__(self) -> None:
        if self.log_models not in LOG_MODELS:
            raise ValueError(f"log_models must be one of {', '.join(LOG_MODELS)}; got {self.log_models!r}")


GROUPS: dict[str, type] = {
    "data": DataConfig, "model": ModelParams, "sample": SampleParams, "rank": RankParams,
    "fit_guidance": FitGuidanceParams, "train_lm": TrainLMParams, "evaluate": EvaluateParams,
    "preferences": PreferencesParams, "tracking": TrackingParams, "task": TaskParams,
}
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunParams))


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file {path} not found")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return params


def load_group(name: str, path: str | Path = "params.yaml") -> Any:
    """The params group ``name`` of ``path`` as its frozen dataclass (``run`` collects the top-level keys)."""
    params = read_params(path)
    if name == "run":
        return _build(RunParams, {k: params[k] for k in RUN_KEYS if k in params}, str(path))
    if name not in params:
        raise ParamsError(f"{path}: missing group {name!r}")
    return _build(GROUPS[name], params[name], f"{path}: {name}")


ROUND_OVERRIDES = ("fit_guidance_updates", "train_lm_updates")


def rounds(path: str | Path = "params.yaml") -> list[dict[str, int | None]]:
    """The rounds as [{round: 1, prev: 0, fit_guidance_updates: None, train_lm_updates: None}, ...] from params'
    ``rounds`` mapping ("1": {prev: 0}, ...), checked to be a chain 1..N with string keys (DVC skips integer keys
    silently). An entry may override its round's budgets: ``fit_guidance_updates`` (else
    ``fit_guidance.max_updates``) and ``train_lm_updates`` (else ``train_lm.max_updates``), e.g. a larger LM budget
    in the last round for the spec's LM-only tail after the last guidance round."""
    items = read_params(path).get("rounds")
    if not isinstance(items, dict) or not items:
        raise ParamsError(f"{path}: rounds must be a non-empty mapping \"<round>\": {{prev: <round - 1>}}")
    out: list[dict[str, int | None]] = []
    for i, (key, value) in enumerate(items.items(), start=1):
        if key != str(i) or not isinstance(value, dict) or value.get("prev") != i - 1:
            raise ParamsError(f"{path}: rounds entry {i} must be \"{i}\": {{prev: {i - 1}}} (a quoted key); "
                              f"got {key!r}: {value}")
        unknown = sorted(set(value) - {"prev", *ROUND_OVERRIDES})
        if unknown:
            raise ParamsError(f"{path}: rounds.{key}: unknown key(s) {', '.join(unknown)}; allowed: prev, "
                              f"{', '.join(ROUND_OVERRIDES)}")
        for name in ROUND_OVERRIDES:
            v = value.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ParamsError(f"{path}: rounds.{key}.{name} must be an integer >= 1; got {v!r}")
        out.append({"round": i, "prev": i - 1, **{name: value.get(name) for name in ROUND_OVERRIDES}})
    return out


def round_budget(stage: str, r: int, path: str | Path = "params.yaml") -> Any:
    """The params group of ``stage`` (fit_guidance or train_lm) with round r's ``max_updates`` override."""
    cfg = load_group(stage, path)
    override = rounds(path)[r - 1][f"{stage}_updates"]
    return cfg if override is None else dataclasses.replace(cfg, max_updates=override)  # type: ignore[type-var]
