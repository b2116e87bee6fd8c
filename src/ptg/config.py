"""Typed, frozen views of ``params.yaml``: ``load`` reads and checks a params file once into ``Params``, one
frozen dataclass per group, which a stage carries on its context and passes down.

Unknown or missing keys fail fast with the file and the key's name, so a typo in params.yaml never silently falls
back to a default; so does a value of the wrong type (``lr: 5e-4``, which YAML reads as a string; ``"3"`` for an
integer; ``true`` for a number) or out of range, naming the group, key and value. The library's configs
(``FitConfig``, ``TrainConfig``, ``SamplingConfig``) live here too, so that reading params imports no torch, and the
stage groups extend them with stage-only keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import string
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

DOCSTRINGS_SOURCE = "python-docstrings"  # data.source of the offline default corpus (ptg.corpus.docstrings)


def template_fields(template: str) -> set[str]:
    """The placeholders of a prompt template; ``ValueError`` unless it is exactly ``{input}``."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"prompt_template is not a valid format string ({err}): {template!r}") from None
    if names != {"input"}:
        raise ValueError(f"prompt_template must contain the '{{input}}' placeholder and no other (literal braces "
                         f"are written '{{{{' and '}}}}'); found {sorted(names) or 'none'} in {template!r}")
    return names


T = TypeVar("T")
# pydantic checks every field's type (strictly: "3" is no integer, true no number; an integer is a number), range
# and choices when a config is built, from params or in code; __post_init__ keeps the checks across fields.
params_dataclass = pydantic_dataclass(frozen=True, config=ConfigDict(strict=True))
AtLeast0 = Annotated[int, Field(ge=0)]
AtLeast1 = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Strings = Annotated[tuple[str, ...], Field(strict=False)]  # a YAML list
Objective = Literal["wmle", "reinforce", "pg", "grpo"]  # train_lm.objective
PgCredit = Literal["sequence", "token", "spread", "placebo"]  # train_lm.pg_credit: who gets the policy-gradient credit
Normalization = Literal["sequence", "batch"]  # how wmle normalises token weights (ptg.losses)
AggMethod = Literal["avg", "sum", "soft_max", "soft_min"]  # sequence score from token rewards
SquashMode = Literal["soft_clamp", "sigmoid"]  # token reward from the head's output
PreferenceLayout = Literal["auto", "listwise", "pairwise"]
OBJECTIVES, PG_CREDITS, NORMALIZATIONS = get_args(Objective), get_args(PgCredit), get_args(Normalization)
AGG_METHODS, SQUASH_MODES, PREFERENCE_LAYOUTS = get_args(AggMethod), get_args(SquashMode), get_args(PreferenceLayout)


class ParamsError(ValueError):
    """A params file is missing a key, has an unknown one, or a value of the wrong type."""


# The library's configs (ptg.corpus, ptg.lm.sampling, ptg.lm.train, ptg.guidance.model use them); defined here, with no
# torch import, so reading params is cheap for every stage.


@params_dataclass
class DataConfig:
    source: str = field(default=DOCSTRINGS_SOURCE, metadata={
        "help": "'python-docstrings' (stdlib code -> docstring summary), a local folder, or a Hugging Face id"})
    input_field: str = field(default="input", metadata={"help": "input column of a local or Hub dataset"})
    target_field: str = field(default="target", metadata={
        "help": "target column of a local or Hub dataset; a list value means several references"})
    max_train: AtLeast0 = field(default=256, metadata={"help": "train examples at most (seeded sample); 0 keeps all"})
    max_validation: AtLeast0 = field(default=64, metadata={"help": "validation examples at most; 0 keeps all"})
    max_test: AtLeast0 = field(default=64, metadata={"help": "test examples at most; 0 keeps all"})
    prompt_template: str = field(default="Summarize what this Python function does in one sentence.\n\n{input}",
                                 metadata={"help": "prompt format; '{input}' is the only placeholder"})
    max_input_chars: AtLeast0 = field(default=2000, metadata={
        "help": "drop examples whose input is longer than this many characters; 0 keeps all"})
    seed: int = field(default=0, metadata={"help": "seed of the sample that caps each split"})
    config: str | None = field(default=None, metadata={
        "help": "a Hugging Face data set's configuration name (e.g. '3.0.0' for cnn_dailymail); null = none"})
    revision: str | None = field(default=None, metadata={
        "help": "a Hugging Face data set's revision (branch, tag or commit); null = the default branch"})

    def __post_init__(self) -> None:
        template_fields(self.prompt_template)

    def cap(self, split: str) -> int:
        """The row cap of ``split`` (0 = none)."""
        return {"train": self.max_train, "validation": self.max_validation, "test": self.max_test}[split]


@params_dataclass
class SamplingConfig:
    num_samples: AtLeast1 = field(default=1, metadata={"help": "K: continuations per input"})
    max_new_tokens: AtLeast1 = field(default=64, metadata={"help": "tokens per continuation at most (EOS included)"})
    temperature: NonNegative = field(default=1.0, metadata={"help": "softmax temperature; 0 decodes greedily"})
    top_k: AtLeast0 = field(default=0, metadata={"help": "keep the k most likely tokens; 0 keeps all"})
    top_p: Annotated[float, Field(gt=0, le=1)] = field(default=1.0, metadata={
        "help": "nucleus sampling mass; 1.0 keeps all"})


@params_dataclass
class TrainConfig:
    objective: Objective = field(default="wmle", metadata={
        "help": "wmle (weighted MLE on the references), reinforce (the paper's REINFORCE: one sample per input, "
                "the guidance's rewards), pg (policy gradient alone: pg_samples on-policy samples per input, "
                "leave-one-out baseline, credit pg_credit) or grpo (TRL's GRPOTrainer with the same reward, K, "
                "learning rate and inputs: the peer; needs the bench extra)"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate (constant, as the reference)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    batch_size: AtLeast1 = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: AtLeast1 = field(default=1, metadata={"help": "micro-batches per optimizer update"})
    max_updates: AtLeast1 = field(default=100, metadata={"help": "optimizer updates"})
    clip_norm: float = field(default=5.0, metadata={"help": "gradient-norm clipping"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in the backward pass instead of keeping them: less memory for "
                "about one more forward pass per update (the prompts then run with their responses, not in a "
                "shared pass of their own)"})
    use_q: bool = field(default=False, metadata={"help": "weight tokens by Q_t = sum_{t'>=t} r_t' instead of r_t"})
    exp_rewards: bool = field(default=False, metadata={"help": "wmle: weight by exp(r_t)"})
    normalize: Normalization = field(default="sequence", metadata={
        "help": "wmle: token weights sum to 1 per sequence (the paper's) or per batch (token-mean with uniform "
                "weights)"})
    carry_optimizer: bool = field(default=False, metadata={
        "help": "keep the AdamW state from round to round (the reference's default); false = fresh each round"})
    entropy_coeff: float = field(default=0.125, metadata={"help": "reinforce: max-entropy bonus alpha"})
    contrast: NonNegative | None = field(default=None, metadata={
        "help": "wmle: null = the paper's weights (w_t proportional to the guidance's reward r_t); a strength "
                "lambda >= 0 = w_t = clip(1 + lambda * z_t, weight_min, weight_max), z_t the reward standardised "
                "within the reference (0 = uniform weights, plain MLE bit for bit)"})
    weight_min: Annotated[float, Field(ge=0, le=1)] = field(default=0.1, metadata={
        "help": "contrast: smallest token weight (<= 1)"})
    weight_max: Annotated[float, Field(ge=1)] = field(default=5.0, metadata={
        "help": "contrast: largest token weight (>= 1)"})
    pg_coeff: NonNegative = field(default=0.0, metadata={
        "help": "wmle: alpha of a policy-gradient term on the LM's own samples added to the MLE loss (0 = off, "
                "the MLE update bit for bit)"})
    pg_credit: PgCredit = field(default="token", metadata={
        "help": "who gets the policy-gradient credit. pg_coeff > 0 and objective pg: sequence (every token of a "
                "sample gets its rank.metric score minus the leave-one-out baseline: RLOO), token (each token its "
                "guidance reward minus the leave-one-out baseline: the paper's), spread (the sequence-level "
                "advantage shared out over the sample's tokens by the guidance, its sum kept: see pg_spread) or "
                "placebo (spread with each sample's shares permuted among its tokens); objective reinforce: token "
                "or sequence (each sample's score standardised over the micro-batch's samples: RLPrompt's); "
                "objective grpo: sequence"})
    pg_samples: Annotated[int, Field(ge=2)] = field(default=3, metadata={
        "help": "pg_coeff > 0, objective pg or grpo: on-policy samples per input (K >= 2)"})
    pg_spread: Annotated[float, Field(ge=0, le=1)] = field(default=1.0, metadata={
        "help": "pg_credit spread / placebo: beta, the share of each advantage the guidance places (the rest is "
                "spread evenly); 0 = sequence-level credit bit for bit"})
    pg_temperature: Positive = field(default=1.0, metadata={
        "help": "pg_credit spread / placebo: softmax temperature over the sample's standardised guidance rewards "
                "(smaller concentrates the credit on fewer tokens)"})
    eval_every: AtLeast0 = field(default=0, metadata={
        "help": "validate every this many updates and keep the best checkpoint (the start included): greedy "
                "ROUGE-L of eval_items validation inputs (wmle, reinforce: the task's score), the held-out reward "
                "of their greedy and sampled outputs (pg, grpo: the learning curve); 0 = off, the last update is "
                "kept"})
    eval_items: AtLeast1 = field(default=64, metadata={"help": "eval_every > 0: validation inputs scored"})
    eval_samples: AtLeast1 = field(default=2, metadata={
        "help": "objective pg / grpo, eval_every > 0: sampled outputs per validation input in the held-out reward"})
    seed: int = field(default=0, metadata={"help": "seed of data order and REINFORCE sampling"})

    def __post_init__(self) -> None:
        if self.pg_coeff > 0 and self.objective != "wmle":
            raise ValueError("pg_coeff adds a policy-gradient term to the wmle objective; objectives reinforce, pg "
                             "and grpo are policy gradient already (set pg_coeff: 0)")
        if self.objective == "reinforce" and self.pg_credit not in ("sequence", "token"):
            raise ValueError(f"objective reinforce draws one sample per input, so it has no leave-one-out "
                             f"advantage to spread: pg_credit must be sequence or token; got {self.pg_credit!r}")
        if self.objective == "grpo" and self.pg_credit != "sequence":
            raise ValueError(f"objective grpo is TRL's GRPOTrainer, whose credit is sequence-level: set pg_credit: "
                             f"sequence; got {self.pg_credit!r}")


@params_dataclass
class FitConfig:
    agg: AggMethod = field(default="avg", metadata={
        "help": "aggregation of token rewards: avg, sum, soft_max, soft_min"})
    temperature: float = field(default=2.0, metadata={"help": "beta of soft_max / soft_min aggregation"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate"})
    batch_groups: AtLeast1 = field(default=8, metadata={"help": "inputs (lists of K samples) per optimizer step"})
    max_updates: AtLeast1 = field(default=100, metadata={"help": "optimizer steps in this round"})
    eval_every: AtLeast1 = field(default=25, metadata={"help": "validate every this many updates (and at the end)"})
    clip_norm: float = field(default=5.0, metadata={"help": "gradient-norm clipping"})
    lr_decay: float = field(default=0.8, metadata={"help": "ReduceLROnPlateau factor"})
    lr_patience: int = field(default=2, metadata={"help": "ReduceLROnPlateau patience, in validations"})
    early_stop: AtLeast1 = field(default=7, metadata={"help": "stop after this many validations without improvement"})
    seed: int = field(default=0, metadata={"help": "seed of batch order and ListMLE tie breaks"})
    head_lr: Positive | None = field(default=None, metadata={
        "help": "Adam learning rate of the MLP head (null = lr): a head faster than the backbone leaves its "
                "initial constant output sooner"})


@params_dataclass
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


@params_dataclass
class ModelParams:
    policy: str = field(default="smollm2-135m-instruct", metadata={
        "help": "smollm2-135m-instruct (offline default), tiny-llama / tiny-t5 (random, for tests), a local HF "
                "folder, or a hub id when online"})
    guidance: str | None = field(default=None, metadata={
        "help": "guidance backbone: null = the policy's first guidance_layers layers; else a path or hub id with "
                "the policy's tokenizer"})
    guidance_layers: AtLeast1 = field(default=4, metadata={
        "help": "layers kept when the guidance is a truncated policy"})
    max_prompt_tokens: AtLeast1 = field(default=384, metadata={
        "help": "prompt tokens at most (an over-long prompt loses the end of its text; instruction and template stay)"})
    max_target_tokens: AtLeast1 = field(default=48, metadata={"help": "reference tokens at most, EOS included"})
    revision: str | None = field(default=None, metadata={
        "help": "the hub revision (branch, tag or commit) of policy and guidance when they are hub ids; null = the "
                "default branch"})


@params_dataclass
class SampleParams(SamplingConfig):
    batch_size: AtLeast1 = field(default=8, metadata={"help": "inputs per sampling batch"})
    train_inputs: AtLeast1 = field(default=64, metadata={"help": "training inputs sampled per round (seeded draw)"})
    validation_inputs: AtLeast1 = field(default=16, metadata={"help": "validation inputs sampled per round"})

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (rank orders the K samples of each input, and one sample "
                             f"orders nothing); got {self.num_samples}")


# ptg.metrics.METRICS plus the two non-reference sources; spelled out here so that every stage (they all load their
# params through this module) does not depend on the metrics code. tests/test_reward_model.py checks they agree.
RankMetric = Literal["meteor", "rouge", "chrf", "bleu", "file", "reward_model"]
RANK_METRICS = get_args(RankMetric)


@params_dataclass
class RankParams:
    metric: RankMetric = field(default="meteor", metadata={
        "help": "meteor, rouge, chrf, bleu (against the references), file (human scores from scores_file) or "
                "reward_model (a local sequence-classification model's score, see reward_model)"})
    scores_file: str | None = field(default=None, metadata={
        "help": "with metric: file, a table (csv/jsonl/parquet) of id, text, score"})
    reward_model: str | None = field(default=None, metadata={
        "help": "with metric: reward_model, a local Hugging Face sequence-classification folder (safetensors "
                "weights and its tokenizer); a hub id only works online"})
    reward_batch_size: AtLeast1 = field(default=32, metadata={"help": "sequences per reward-model forward pass"})
    reward_label: AtLeast0 = field(default=0, metadata={
        "help": "the logit column that is the score: 0 for a 1-label reward head, the 'good' class of a classifier"})
    reward_direction: Literal["higher", "lower"] = field(default="higher", metadata={
        "help": "higher (a larger score is better) or lower (the score is negated before ranking)"})
    reward_input: Literal["prompt+response", "response"] = field(default="prompt+response", metadata={
        "help": "prompt+response (one user turn and one assistant turn through the reward model's chat template, "
                "else prompt + newline + response) or response (the response text alone)"})
    unfinished: Literal["keep", "last"] = field(default="keep", metadata={
        "help": "keep (rank by the score alone) or last (samples that hit sample.max_new_tokens without a stop "
                "token rank below every finished sample of their input, by score among themselves)"})

    def __post_init__(self) -> None:
        if self.metric == "reward_model" and not self.reward_model:
            raise ValueError(f"metric reward_model needs reward_model, a model folder; got {self.reward_model!r}")


@params_dataclass
class FitGuidanceParams(FitConfig):
    head_hidden: AtLeast1 = field(default=2048, metadata={"help": "hidden width of the MLP head"})
    squash: SquashMode = field(default="soft_clamp", metadata={"help": "soft_clamp (reference) or sigmoid"})
    head_init_gain: Positive = field(default=1e-4, metadata={
        "help": "Xavier gain of the head's layers when round 1 creates it (the reference's 1e-4: every token starts "
                "at the same reward); larger starts the head with per-token differences"})

    def fit_config(self) -> FitConfig:
        """The library's FitConfig part of these params (without the stage-only head keys)."""
        return FitConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FitConfig)})


@params_dataclass
class LoraParams:
    """LoRA adapters (``peft``) instead of full fine-tuning: each round trains fresh adapters on the previous round's
    merged LM and saves both (the adapters under ``lm/adapter``; sampling, evaluation and the next round use the
    merged model). The baseline trains with the same setup."""

    rank: AtLeast0 = field(default=0, metadata={"help": "adapter rank r; 0 = full fine-tuning (no adapters)"})
    alpha: Positive = field(default=16.0, metadata={"help": "scaling numerator: updates are scaled by alpha / rank"})
    dropout: Annotated[float, Field(ge=0, lt=1)] = field(default=0.0, metadata={
        "help": "dropout on the adapters' input"})
    target_modules: str | None = field(default=None, metadata={
        "help": "comma-separated module names (e.g. q_proj,v_proj), all-linear, or null for peft's default of the "
                "architecture (q_proj,v_proj for Llama, q,v for T5)"})

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@params_dataclass
class TrainLMParams(TrainConfig):
    lora: LoraParams = field(default_factory=LoraParams, metadata={"help": "LoRA adapters (rank 0 = off)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora.enabled and self.carry_optimizer:
            raise ValueError("carry_optimizer needs full fine-tuning (lora.rank: 0): every round's LoRA adapters "
                             "are new parameters, so there is no optimizer state to carry")


def reference_baseline(cfg: TrainLMParams, params: Params) -> TrainLMParams:
    """The baseline of a task with references (summarisation, copy): the same preference without the guidance.
    Policy-gradient objectives (pg, grpo): ``pg`` with sequence-level credit (RLOO), everything else as PTG's;
    otherwise uniform MLE (no guidance weights, no policy-gradient term)."""
    if cfg.objective in ("pg", "grpo"):
        return dataclasses.replace(cfg, objective="pg", pg_credit="sequence")
    return dataclasses.replace(cfg, contrast=None, pg_coeff=0.0)


ClassifierKind = Literal["causal", "masked"]
CLASSIFIER_KINDS = get_args(ClassifierKind)
TASKS_FOLDER = Path(__file__).parent / "tasks"  # one folder per task (``ptg.tasks``)


def task_names() -> tuple[str, ...]:
    """The tasks ptg has: the folders of ``ptg/tasks`` with an ``__init__.py``."""
    return tuple(sorted(p.parent.name for p in TASKS_FOLDER.glob("*/__init__.py")))


@params_dataclass
class TaskParams:
    """What the pipeline learns (``ptg.tasks``): ``summarisation`` (weighted MLE on references, the stages'
    default) or ``prompt`` (discrete prompts for a frozen few-shot classifier, REINFORCE on the guidance; the other
    keys apply); any folder of ``ptg/tasks``."""

    name: str = field(default="summarisation", metadata={
        "help": "a folder of ptg/tasks: summarisation or prompt"})
    classifier: str | None = field(default=None, metadata={
        "help": "prompt: the frozen classifier, null = model.policy (the offline default), or a local causal-LM "
                "or masked-LM folder"})
    classifier_kind: ClassifierKind = field(default="causal", metadata={
        "help": "prompt: causal (the next token after the template) or masked (the template's {mask})"})
    template: str = field(default="{text} {prompt}", metadata={
        "help": "prompt: how a text and a prompt become the classifier's input ({text}, {prompt}; masked: {mask})"})
    labels: Strings = field(default=(), metadata={"help": "prompt: the class names, in verbalizer order"})
    verbalizers: Strings = field(default=(), metadata={
        "help": "prompt: one single-token word per label, read at the classifier's answer position"})
    shots: AtLeast1 = field(default=16, metadata={"help": "prompt: training and validation examples per class"})
    calibrate: bool = field(default=False, metadata={
        "help": "prompt: divide the class probabilities by those of a content-free input (contextual calibration)"})
    correct_coeff: float = field(default=200.0, metadata={"help": "prompt: gap reward scale of a correct example"})
    incorrect_coeff: float = field(default=180.0, metadata={"help": "prompt: gap reward scale of a wrong example"})
    manual_prompt: str = field(default="", metadata={"help": "prompt: the hand-written prompt baseline"})
    head_hidden: AtLeast0 = field(default=2048, metadata={
        "help": "prompt: hidden width of the policy's MLP on the frozen LM's last hidden state (0 = no MLP: the "
                "LM itself is trained, e.g. with train_lm.lora)"})
    candidates: AtLeast1 = field(default=16, metadata={
        "help": "prompt: prompts sampled from the trained policy (with its greedy one) and chosen among on "
                "validation"})
    batch_size: AtLeast1 = field(default=128, metadata={
        "help": "prompt: classifier rows (text x prompt) per forward pass"})
    baseline_budget: Literal["updates", "calls"] = field(default="updates", metadata={
        "help": "prompt: the sequence-level baseline trains as many updates as PTG (updates; it calls the "
                "classifier at every one) or as many as the classifier calls PTG's ranking spent allow (calls)"})

    def __post_init__(self) -> None:
        names = task_names()
        if self.name not in names:
            raise ValueError(f"name {self.name!r}: ptg has no such task (a folder of {TASKS_FOLDER}); the tasks are "
                             f"{', '.join(names)}")
        if (self.labels or self.verbalizers) and (len(self.labels) < 2 or len(self.labels) != len(self.verbalizers)):
            raise ValueError(f"labels and verbalizers must be lists of the same length >= 2 (one verbalizer "
                             f"per label); got labels {list(self.labels)}, verbalizers {list(self.verbalizers)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct; got {list(self.labels)}")


@params_dataclass
class EvaluateParams:
    split: Literal["test", "validation"] = field(default="test", metadata={
        "help": "test (reported results) or validation (for choosing settings: ablations never look at test)"})
    max_new_tokens: AtLeast1 = field(default=48, metadata={"help": "greedy decoding length at most"})
    batch_size: AtLeast1 = field(default=16, metadata={"help": "inputs per decoding batch"})
    subset_items: AtLeast0 = field(default=0, metadata={
        "help": "rounds before the last evaluate only the first this many test items (0 = all); the last round "
                "always evaluates the whole test split"})


@params_dataclass
class PreferencesParams:
    path: str | None = field(default=None, metadata={
        "help": "preference data: a jsonl/csv/parquet file, a folder of them, or a hub dataset id (online); "
                "null = none"})
    layout: PreferenceLayout = field(default="auto", metadata={
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
    prompt_template: str | None = field(default=None, metadata={
        "help": "how an input becomes the prompt the guidance reads; null = data.prompt_template, the prompts the "
                "pipeline itself writes (``load`` fills it in)"})
    heldout_fraction: Annotated[float, Field(ge=0, lt=1)] = field(default=0.2, metadata={
        "help": "share of inputs held out for evaluation when the data has no split column"})
    weight: Annotated[float, Field(ge=0, le=1)] = field(default=0.0, metadata={
        "help": "share of preference groups among the guidance's training groups in every round (0 = the LM's "
                "own samples only, 1 = preferences only)"})
    prior_updates: AtLeast0 = field(default=0, metadata={
        "help": "round 1 first fits this many updates on the preference groups alone (a prior guidance)"})
    seed: int = field(default=0, metadata={"help": "seed of the held-out split and of the mixing draw"})

    def __post_init__(self) -> None:
        if self.prompt_template is not None and "{input}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{input}}; got {self.prompt_template!r}")

    def prompt(self, text: str) -> str:
        """The prompt the guidance reads for input ``text``; a null template (not yet filled in from
        ``data.prompt_template`` by ``load``) is a ValueError."""
        if self.prompt_template is None:
            raise ValueError("preferences.prompt_template is null: read the params with config.load, "
                             "which fills it in from data.prompt_template")
        return self.prompt_template.format(input=text)


_TYPES = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
          "string_type": "a string", "tuple_type": "a list"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _explain(cls: type, err: ValidationError) -> str:
    """pydantic's errors for ``cls`` as this module's messages: "<key> must be <what>; got <value>", with a hint for
    a number YAML read as a string."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    out = []
    for e in err.errors():
        kind, value, name = e["type"], e["input"], ".".join(map(str, e["loc"]))
        if kind == "value_error":  # raised by a __post_init__
            out.append(str(e["ctx"]["error"]))
        elif kind == "literal_error":
            choices = ", ".join(re.findall(r"'([^']*)'", e["ctx"]["expected"]))
            out.append(f"{name} must be one of {choices}; got {value!r}")
        elif kind in _BOUNDS:
            bound = next(iter(e["ctx"].values()))
            bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
            out.append(f"{name} must be {_BOUNDS[kind]} {bound}; got {value!r}")
        elif kind in _TYPES:
            null = " or null" if "None" in annotations.get(name.split(".")[0], "") else ""
            out.append(f"{name} must be {_TYPES[kind]}{null}; got {value!r} ({type(value).__name__}){_hint(value)}")
        else:
            out.append(f"{name}: {e['msg']}; got {value!r}")
    return "; ".join(out)


def _hint(value: Any) -> str:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            float(value)
            return (" (YAML reads an exponent without a dot as a string: write 5.0e-4, not 5e-4)"
                    if "e" in value.lower() else " (quoted, it is a string: write it without quotes)")
    return ""


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
    try:
        return cls(**values)
    except ValidationError as e:
        raise ParamsError(f"{where}: {_explain(cls, e)}") from None


_NESTED: dict[str, type] = {"LoraParams": LoraParams}  # a group's sub-mapping, built and checked like a group
LogModels = Literal["best", "all", "none"]
LOG_MODELS = get_args(LogModels)


@params_dataclass
class TrackingParams:
    """What MLflow keeps (not a DVC param: changing it reruns nothing)."""

    log_models: LogModels = field(default="all", metadata={
        "help": "all (every train_lm, fit_guidance and baseline folder logged and registered, weights kept: a "
                "registry's usual contract), best (only the best-evaluated PTG LM, transformers flavour in bf16, "
                "and the guidance that trained it hold weights; a superseded version keeps its record and lineage, "
                "tagged weights: deleted) or none (runs, metrics and artifacts only); the models always stay in "
                "DVC"})


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


def load_group(name: str, path: str | Path, params: dict[str, Any]) -> Any:
    """The group ``name`` of the values ``params`` (read from ``path``, which errors name) as its frozen dataclass;
    ``run`` collects the top-level keys."""
    if name == "run":
        return _build(RunParams, {k: params[k] for k in RUN_KEYS if k in params}, str(path))
    if name not in params:
        raise ParamsError(f"{path}: missing group {name!r}")
    return _build(GROUPS[name], params[name], f"{path}: {name}")


ROUND_OVERRIDES = ("fit_guidance_updates", "train_lm_updates")


def _rounds(items: Any, path: str | Path) -> tuple[dict[str, int | None], ...]:
    """The rounds as ({round: 1, prev: 0, fit_guidance_updates: None, train_lm_updates: None}, ...) from params'
    ``rounds`` mapping ("1": {prev: 0}, ...), checked to be a chain 1..N with string keys (DVC skips integer keys
    silently). An entry may override its round's budgets: ``fit_guidance_updates`` (else
    ``fit_guidance.max_updates``) and ``train_lm_updates`` (else ``train_lm.max_updates``), e.g. a larger LM budget
    in the last round for the spec's LM-only tail after the last guidance round."""
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
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Params:
    """A params file, read and checked once (``load``): every group as its frozen dataclass. A stage loads it at
    its start and carries it on its context (``ptg.pipeline.Context.params``); library functions take it, or the
    groups they use, never a path."""

    path: Path
    run: RunParams
    task: TaskParams
    data: DataConfig
    model: ModelParams
    sample: SampleParams
    rank: RankParams
    fit_guidance: FitGuidanceParams
    train_lm: TrainLMParams
    evaluate: EvaluateParams
    preferences: PreferencesParams  # prompt_template filled in: null reads as data.prompt_template
    tracking: TrackingParams
    rounds: tuple[dict[str, int | None], ...]

    @property
    def last_round(self) -> int:
        return len(self.rounds)

    def budget(self, stage: Literal["fit_guidance", "train_lm"], r: int) -> Any:
        """The params group of ``stage`` (fit_guidance or train_lm) with round r's ``max_updates`` override."""
        cfg = getattr(self, stage)
        override = self.rounds[r - 1][f"{stage}_updates"]
        return cfg if override is None else dataclasses.replace(cfg, max_updates=override)


def load(path: str | Path = "params.yaml", values: dict[str, Any] | None = None) -> Params:
    """The params file ``path``, every group checked (``values``: check these instead of the file's, named as
    ``path`` in errors, before writing them). A missing ``tracking`` group is its defaults (it is no DVC param);
    ``preferences.prompt_template`` null is ``data.prompt_template``, the prompts the pipeline writes, so the two
    cannot drift apart."""
    values = read_params(path) if values is None else values
    groups = {name: load_group(name, path, values) for name in ("run", *GROUPS) if name != "tracking"}
    groups["tracking"] = load_group("tracking", path, values) if "tracking" in values else TrackingParams()
    if groups["preferences"].prompt_template is None:
        groups["preferences"] = dataclasses.replace(groups["preferences"],
                                                    prompt_template=groups["data"].prompt_template)
    return Params(path=Path(path), rounds=_rounds(values.get("rounds"), path), **groups)
