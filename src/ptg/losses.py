"""Pure tensor math of PTG: reward squashing, sequence aggregation, the listwise loss and the LM objectives.

Every function here is a plain function of tensors: no file access, no logging, no device moves. Shapes are in
the docstrings; equations refer to Yang et al., "Preference-grounded Token-level Guidance for Language Model
Fine-tuning" (NeurIPS 2023) and to ``ptg-spec.md`` (§2-§3). All functions work in float32, float64 and
bfloat16 (they compute in the dtype they are given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from ptg.config import AGG_METHODS, NORMALIZATIONS, SQUASH_MODES

SquashMode = Literal["soft_clamp", "sigmoid"]
AggMethod = Literal["avg", "sum", "soft_max", "soft_min"]


_CLAMP_MAX = 1.0  # M of the reference's soft clamp
_CLAMP_MIN = 1e-8  # m of the reference's soft clamp
_LISTMLE_EPS = 1e-10  # added inside the log of the Plackett-Luce denominators, as the reference
_ENTROPY_EPS = 1e-8  # added to probabilities inside p log p, as the reference


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


def _check_ndim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(t.shape)}")


def _check_nonempty_rows(name: str, mask: torch.Tensor) -> None:
    empty = (mask.sum(-1) == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{name} has rows with no valid token (rows {empty[:8].tolist()}); drop empty sequences first")


def squash(raw: torch.Tensor, mode: SquashMode = "soft_clamp") -> torch.Tensor:
    """Map raw head outputs ``z`` (any shape) to positive token rewards ``r`` (same shape).

    ``soft_clamp`` is the reference's double softplus (spec §2.2): ``y = M - softplus(M - z)``,
    ``r = m + softplus(y - m)`` with M = 1, m = 1e-8, so ``r`` lies in (1e-8, 1.3132617); ``sigmoid`` is
    ``sigmoid(z)``. NaNs become 0, as in the reference.
    """
    _check_choice("mode", mode, SQUASH_MODES)
    if mode == "sigmoid":
        r = torch.sigmoid(raw)
    else:
        y = _CLAMP_MAX - F.softplus(_CLAMP_MAX - raw)
        r = _CLAMP_MIN + F.softplus(y - _CLAMP_MIN)
    return torch.nan_to_num(r, nan=0.0)


def aggregate(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    method: AggMethod,
    group_size: int,
    temperature: float = 2.0,
) -> torch.Tensor:
    """Aggregate token rewards into one evaluation per sequence, e_phi (spec §2.3).

    rewards, mask: (N, T), rows input-major: the ``group_size`` = K samples of one input are contiguous.
    Returns (N // K, K).

    - ``avg``: T_bar * sum_t m_t r_t / T_k
    - ``sum``: sum_t m_t r_t
    - ``soft_max``: T_bar * beta * log sum_{t valid} exp(r_t / beta)
    - ``soft_min``: T_bar * (-beta) * log sum_{t valid} exp(-r_t / beta)

    T_k is the number of valid tokens of sample k and T_bar the mean T_k over the K samples of the same input:
    a factor shared within a group, so it rescales the Plackett-Luce logits without changing which sample the
    average prefers.
    """
    _check_choice("method", method, AGG_METHODS)
    _check_ndim("rewards", rewards, 2)
    _check_same_shape(rewards=rewards, mask=mask)
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size must be a positive divisor of the number of rows {n}; got {group_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive; got {temperature}")
    _check_nonempty_rows("mask", mask)
    valid = mask.bool()
    m = valid.to(rewards.dtype)
    lengths = m.sum(-1)  # (N,)
    mean_len = lengths.view(-1, group_size).mean(-1, keepdim=True)  # (B, 1)
    if method == "sum":
        return (rewards * m).sum(-1).view(-1, group_size)
    if method == "avg":
        per_seq = (rewards * m).sum(-1) / lengths
    else:
        sign = 1.0 if method == "soft_max" else -1.0
        scaled = (sign * rewards / temperature).masked_fill(~valid, float("-inf"))
        per_seq = sign * temperature * torch.logsumexp(scaled, dim=-1)
    return mean_len * per_seq.view(-1, group_size)


def tie_break_permutation(k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The random permutation of K columns that ``list_mle`` breaks preference ties with (one draw from
    ``generator``). A data-parallel rank with no rows of a batch draws it too, to keep its generator in step."""
    return torch.randperm(k, generator=generator, device=generator.device if generator else "cpu")


def list_mle(
    scores: torch.Tensor,
    preferences: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ListMLE: Plackett-Luce negative log-likelihood of the order given by ``preferences`` (spec §2.4).

    scores, preferences: (B, K); a higher preference is better. Returns a scalar:
    mean over rows of sum_j [log sum_{i>=j} exp(s_i) - s_j], where s is ``scores`` sorted by descending
    preference. Ties in ``preferences`` are broken by one random permutation of the K columns drawn from
    ``generator`` (shared by all rows, as the reference), so a seeded call is reproducible.
    """
    _check_ndim("scores", scores, 2)
    _check_same_shape(scores=scores, preferences=preferences)
    if scores.shape[1] < 2:
        raise ValueError(f"list_mle needs at least 2 items per list; got K = {scores.shape[1]}")
    if not torch.isfinite(preferences).all():
        raise ValueError("preferences contain NaN or infinite values")
    perm = tie_break_permutation(scores.shape[1], generator).to(scores.device)
    scores, preferences = scores[:, perm], preferences[:, perm]
    order = preferences.sort(dim=-1, descending=True, stable=True).indices
    s = scores.gather(1, order)
    s = s - s.max(dim=-1, keepdim=True).values.detach()
    # Reverse cumulative sum: c_j = sum_{i >= j} exp(s_i).
    c = s.exp().flip(-1).cumsum(-1).flip(-1)
    return (torch.log(c + _LISTMLE_EPS) - s).sum(-1).mean()


def _token_weights(rewards: torch.Tensor, mask: torch.Tensor, use_q: bool) -> torch.Tensor:
    """Masked token weights, turned into Q_t = sum_{t' >= t} r_t' when ``use_q`` (spec §3a step 4). (N, T)."""
    w = rewards * mask.to(rewards.dtype)
    if use_q:
        w = w.flip(-1).cumsum(-1).flip(-1)
    return w


def contrast_weights(rewards: torch.Tensor, mask: torch.Tensor, strength: float, w_min: float,
                     w_max: float) -> torch.Tensor:
    """Token weights with a contrast knob (issue #19): w_t = clip(1 + strength * z_t, w_min, w_max), z_t the reward
    standardised within its own sequence (mean 0, population std 1 over its valid tokens).

    rewards, mask: (N, T). Returns (N, T), 0 at padding. A sequence whose rewards are all equal (or with one
    token) has z = 0, so ``strength`` 0 gives every valid token exactly 1.0: the uniform weights of plain MLE, bit
    for bit. Unlike raw rewards, whose spread depends on how far the guidance's head moved from its initial
    constant output, the spread of these weights is set by ``strength`` (about ``strength`` as a coefficient of
    variation before clipping) and only the guidance's *ordering* of a sequence's tokens decides which weigh more.
    """
    _check_same_shape(rewards=rewards, mask=mask)
    if strength < 0 or not 0 <= w_min <= 1 <= w_max:
        raise ValueError(f"contrast needs strength >= 0 and w_min <= 1 <= w_max; got {strength}, {w_min}, {w_max}")
    m = mask.to(torch.float32)
    r = rewards.detach().to(torch.float32) * m
    n = m.sum(-1, keepdim=True).clamp(min=1.0)
    mean = r.sum(-1, keepdim=True) / n
    std = (((r - mean) * m) ** 2).sum(-1, keepdim=True).div(n).sqrt()
    z = torch.where(std > 0, (r - mean) / std.clamp(min=1e-12), torch.zeros_like(r))
    return (1.0 + strength * z).clamp(w_min, w_max) * m


def loo_baseline(scores: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline of each of the K samples of an input (RLOO): the mean of the other K - 1 samples'
    scores. scores: (B, K), K >= 2. Returns (B, K); ``scores - loo_baseline(scores)`` sums to zero over K."""
    _check_ndim("scores", scores, 2)
    k = scores.shape[1]
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs K >= 2 samples per input; got K = {k}")
    return (scores.sum(-1, keepdim=True) - scores) / (k - 1)


def sequence_advantages(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level credit: every token of sample k gets that sample's score minus its leave-one-out baseline.

    scores: (B, K) sequence-level preferences (e.g. METEOR); mask: (B * K, T), rows input-major. Returns (B * K, T),
    0 at padding."""
    _check_ndim("mask", mask, 2)
    if mask.shape[0] != scores.numel():
        raise ValueError(f"mask has {mask.shape[0]} rows for {scores.numel()} scores (B * K)")
    adv = (scores - loo_baseline(scores)).reshape(-1, 1)
    return adv.to(torch.float32) * mask.to(torch.float32)


def token_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Token-level credit (PTG): each token gets its guidance reward minus a per-sample baseline, the leave-one-out
    mean over the other K - 1 samples of their mean token reward (what ``avg`` aggregation ranks samples by).

    rewards, mask: (B * K, T), rows input-major. Returns (B * K, T), 0 at padding. Each sample's mean advantage is
    its mean reward minus the others' mean rewards, so these means sum to zero over the K samples of an input, and
    within a sample the tokens the guidance pays more for get more of the credit."""
    _check_same_shape(rewards=rewards, mask=mask)
    _check_nonempty_rows("mask", mask)
    m = mask.to(torch.float32)
    r = rewards.detach().to(torch.float32) * m
    means = (r.sum(-1) / m.sum(-1)).view(-1, group_size)
    return (r - loo_baseline(means).reshape(-1, 1)) * m


def credit_shares(rewards: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor, temperature: float) -> torch.Tensor:
    """How a sample's credit is shared out over its tokens by the guidance: T_n x softmax over the sample's valid
    tokens of sign_n x z_nt / temperature, z_nt the guidance reward standardised within the sample (mean 0,
    population std 1 over its valid tokens).

    rewards, mask: (N, T); sign: (N,), the sign of each sample's advantage. Returns (N, T), 0 at padding, each row
    summing to its number of valid tokens T_n, so a share of 1 is the uniform share. With sign +1 the tokens the
    guidance rates higher get more; with -1 those it rates lower (they take more of the blame); with 0, or when a
    sample's rewards are all equal, every token gets exactly 1. Standardising first makes the spread of the shares
    depend on ``temperature`` and on the guidance's *ordering* of the tokens, not on the scale of its raw rewards
    (which sit within a few percent of each other when the head has barely left its constant start)."""
    _check_same_shape(rewards=rewards, mask=mask)
    _check_nonempty_rows("mask", mask)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive; got {temperature}")
    valid = mask.bool()
    m = valid.to(torch.float32)
    n = m.sum(-1, keepdim=True)
    r = rewards.detach().to(torch.float32) * m
    mean = r.sum(-1, keepdim=True) / n
    std = (((r - mean) * m) ** 2).sum(-1, keepdim=True).div(n).sqrt()
    z = torch.where(std > 0, (r - mean) / std.clamp(min=1e-12), torch.zeros_like(r))
    logits = (sign.to(torch.float32).reshape(-1, 1) * z / temperature).masked_fill(~valid, float("-inf"))
    return logits.softmax(-1) * n * m


def permuted_within(values: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """``values`` (N, T) with each row's valid entries put in a random order (one seeded permutation per row from
    ``generator``); padding stays 0. Each row keeps its multiset of values: the placebo of a token-level credit,
    which keeps how unevenly a sample's credit is spread and loses which token it goes to."""
    _check_same_shape(values=values, mask=mask)
    out = torch.zeros_like(values)
    valid = mask.bool()
    for i in range(values.shape[0]):
        idx = valid[i].nonzero().flatten()
        perm = torch.randperm(idx.numel(), generator=generator, device=generator.device if generator else "cpu")
        out[i, idx] = values[i, idx[perm.to(idx.device)]]
    return out


def spread_advantages(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, beta: float,
                      temperature: float, placebo: torch.Generator | None = None) -> torch.Tensor:
    """Return-preserving token credit: each sample's real advantage A_k = score_k - leave-one-out baseline (exactly
    ``sequence_advantages``'s) spread over its tokens, c_kt = A_k x ((1 - beta) + beta x share_kt), the shares from
    ``credit_shares`` with the sign of A_k (a sample that beat its siblings credits the tokens the guidance rates
    higher most; one that fell short blames the lower-rated ones most).

    scores: (B, K); rewards, mask: (B * K, T), rows input-major. Returns (B * K, T), 0 at padding. Each sample's
    credit sums to T_k x A_k over its tokens, the sequence-level credit's sum, whatever ``beta`` in [0, 1]; beta 0
    is ``sequence_advantages`` bit for bit. ``placebo``: a generator that permutes each sample's shares within it
    (``permuted_within``): the same unevenness, put on random tokens."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1]; got {beta}")
    seq = sequence_advantages(scores, mask)
    adv = (scores - loo_baseline(scores)).reshape(-1).to(torch.float32)
    shares = credit_shares(rewards, mask, torch.sign(adv), temperature)
    if placebo is not None:
        shares = permuted_within(shares, mask, placebo)
    return seq * ((1.0 - beta) + beta * shares)


def standardized(scores: torch.Tensor, eps: float = 1e-8,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(s - mean) / std over all of ``scores`` (population std): RLPrompt's per-step reward normalisation, the
    sequence-level credit of REINFORCE without references. Constant scores give zeros. ``reduce`` sums a tensor
    over the shards of a batch (``ptg.lm.distributed.all_reduce_sum``): the mean and std are then the whole batch's."""
    reduce = reduce or (lambda t: t)
    s = scores.to(torch.float32)
    n, total = reduce(torch.stack([s.new_tensor(float(s.numel())), s.sum()])).tolist()
    centred = s - total / n
    std = (reduce(centred.pow(2).sum().reshape(1)) / n).sqrt()
    return centred / (std + eps)


def policy_gradient_loss(nll: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         scale_by: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE with advantages: sum_{n,t} (A_nt / rms(S)) nll_nt / sum_{n,t} m_nt, no gradient through A.

    nll, advantages, mask (and ``scale_by``): (N, T); ``nll`` = -log pi(a_t | s_t) of the sampled tokens. The
    advantages are divided by the root mean square over valid tokens of S = ``scale_by``, by default the advantages
    themselves, so the coefficient in front of this term means the same step size whatever the scale of the credit
    (a metric in [0, 1] or guidance rewards). A credit that only moves a sample's advantage between its tokens
    (``spread_advantages``) passes the sequence-level advantages as ``scale_by``: it then takes the very step size
    of sequence-level credit and differs from it in where the credit goes alone. All-zero S gives 0. Minimising it
    raises the log-probability of tokens with a positive advantage. Returns a scalar."""
    return policy_gradient_from_parts(*policy_gradient_parts(nll, advantages, mask, scale_by))


def policy_gradient_parts(nll: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                          scale_by: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``policy_gradient_loss`` as sums: (sum of A x nll over valid tokens, valid tokens, sum of S squared over
    valid tokens). Summed over the shards of a batch and given to ``policy_gradient_from_parts``, they make the
    whole batch's loss (data parallelism, ``ptg.lm.distributed``)."""
    scale_by = advantages if scale_by is None else scale_by
    _check_same_shape(nll=nll, advantages=advantages, mask=mask, scale_by=scale_by)
    m = mask.to(torch.float32)
    a = advantages.detach().to(torch.float32) * m
    squares = (scale_by.detach().to(torch.float32) * m).pow(2).sum()
    return (a * nll.masked_fill(~mask.bool(), 0.0).float()).sum(), m.sum(), squares


def policy_gradient_from_parts(numerator: torch.Tensor, tokens: torch.Tensor, squares: torch.Tensor
                               ) -> torch.Tensor:
    """The policy-gradient loss from ``policy_gradient_parts`` (each summed over shards, or of one batch)."""
    if tokens == 0:
        raise ValueError("mask has no valid token")
    rms = (squares / tokens).sqrt()
    scale = torch.where(rms > 0, 1.0 / rms.clamp(min=1e-12), torch.zeros_like(rms))
    return numerator * scale / tokens


def weighted_mle(
    nll: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    use_q: bool = False,
    exp_rewards: bool = False,
    normalize: str = "sequence",
) -> torch.Tensor:
    """Guidance-weighted MLE (spec §3a; paper: w_t = r(s_t, y_t) / sum_t' r(s_t', y_t')).

    nll, rewards, mask: (N, T); ``nll`` is the per-token negative log-likelihood of the reference tokens,
    ``rewards`` the frozen guidance's token rewards (no gradient is taken through them). Weights are
    optionally exp'd, masked and optionally turned into Q, then normalised:

    - ``sequence`` (the paper's): to sum 1 per sequence; returns the mean over sequences of sum_t w_t nll_t.
      Every sequence weighs the same, so a short reference's tokens (its EOS included) weigh more than a long
      one's; with constant rewards this is the per-sequence mean NLL.
    - ``batch``: sum_{n,t} w_nt nll_nt / sum_{n,t} w_nt; every token weighs its reward, whatever the length of
      its sequence; with constant rewards this is the usual token-mean MLE.

    Returns a scalar.
    """
    total, count = weighted_mle_parts(nll, rewards, mask, use_q, exp_rewards, normalize)
    return total / count


def weighted_mle_parts(
    nll: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    use_q: bool = False,
    exp_rewards: bool = False,
    normalize: str = "sequence",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weighted_mle`` as (total, count), the loss being total / count: for ``batch`` the weighted NLL sum and the
    weight sum, for ``sequence`` the sum of per-sequence weighted NLLs and the number of sequences. Summing both
    over shards of a batch gives the whole batch's parts (data parallelism, ``ptg.lm.distributed``)."""
    _check_ndim("nll", nll, 2)
    _check_same_shape(nll=nll, rewards=rewards, mask=mask)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    _check_nonempty_rows("mask", mask)
    r = rewards.detach()
    if exp_rewards:
        r = r.exp()
    w = _token_weights(r, mask, use_q)
    nll = nll.masked_fill(~mask.bool(), 0.0)
    if normalize == "batch":
        return (w * nll).sum(), w.sum().detach()
    w = w / w.sum(-1, keepdim=True)
    return (w * nll).sum(), torch.tensor(float(nll.shape[0]), device=nll.device)


def reinforce_loss(
    nll: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    use_q: bool = False,
) -> torch.Tensor:
    """REINFORCE with token rewards (spec §3a optional term, §3b): sum_{b,t} w_bt nll_bt / sum_{b,t} m_bt.

    nll, rewards, mask: (N, T); ``nll`` is -log pi(a_t | s_t) of the sampled tokens, ``rewards`` the frozen
    guidance's rewards (or Q with ``use_q``). Minimising it raises the log-probability of each sampled token in
    proportion to its reward. Returns a scalar.
    """
    _check_ndim("nll", nll, 2)
    _check_same_shape(nll=nll, rewards=rewards, mask=mask)
    total = mask.sum()
    if total == 0:
        raise ValueError("mask has no valid token")
    w = _token_weights(rewards.detach(), mask, use_q)
    return (w * nll.masked_fill(~mask.bool(), 0.0)).sum() / total


def neg_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative entropy sum_v p log p, averaged over valid tokens (spec §3a/§3b).

    logits: (N, T, V); mask: (N, T). p = softmax(logits) + 1e-8 inside the log, as the reference. Adding
    ``alpha * neg_entropy`` to a loss is the max-entropy bonus. Returns a scalar.
    """
    _check_ndim("logits", logits, 3)
    if tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, mask {tuple(mask.shape)}")
    total = mask.sum()
    if total == 0:
        raise ValueError("mask has no valid token")
    p = logits.softmax(-1)
    per_token = (p * torch.log(p + _ENTROPY_EPS)).sum(-1)
    return (per_token * mask.to(per_token.dtype)).sum() / total


def token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``targets`` under ``logits``: (N, T, V), (N, T), (N, T) -> (N, T).

    Positions where ``mask`` is 0 get 0. Computed in float32 at least, so bf16 logits do not lose the NLL.
    """
    _check_ndim("logits", logits, 3)
    _check_same_shape(targets=targets, mask=mask)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    nll = F.cross_entropy(logits.to(dtype).transpose(1, 2), targets.masked_fill(~mask.bool(), 0), reduction="none")
    return nll.masked_fill(~mask.bool(), 0.0)
