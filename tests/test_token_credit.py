"""Issue #19's controls: weights of a chosen contrast, the MLE + policy-gradient objective with sequence- or
token-level credit, the guidance scored once per round, and the best validation checkpoint. Tiny models, CPU."""

import copy

import numpy as np
import pytest
import torch
from conftest import EOS, PAD, tiny_llama
from test_guidance_train import X, guidance_for, synthetic_groups
from test_ptg_signal import PROMPTS, TokenReward, _p_first

from ptg import losses
from ptg.guidance.model import spread
from ptg.lm.models import collate
from ptg.lm.sampling import SamplingConfig
from ptg.lm.train import Example, TrainConfig, example_weights, train_lm

CPU = torch.device("cpu")


def _references(n: int = 24) -> list[Example]:
    return [Example(g.prompt, g.responses[0]) for g in synthetic_groups(n, 1, seed=7)]


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- contrast weights ----------------------------------------------------------------------------------------------


def test_contrast_weights_are_one_plus_strength_times_the_within_sequence_z_score_clipped():
    r = torch.tensor([[0.2, 0.4, 0.6, 0.0], [0.5, 0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    z = (torch.tensor([0.2, 0.4, 0.6]) - 0.4) / torch.tensor([0.2, 0.4, 0.6]).std(unbiased=False)  # -1.2247, 0, +
    w = losses.contrast_weights(r, mask, 0.5, 0.1, 5.0)
    torch.testing.assert_close(w[0, :3], 1 + 0.5 * z)
    assert w[0, 3] == 0  # padding
    assert torch.equal(w[1], torch.ones(4))  # constant rewards: uniform, whatever the strength
    clipped = losses.contrast_weights(r, mask, 2.0, 0.5, 2.0)
    torch.testing.assert_close(clipped[0, :3], torch.tensor([0.5, 1.0, 2.0]))  # 1 -/+ 2.449 clipped to the bounds


def test_contrast_gives_the_spread_it_promises_on_a_synthetic_guidance():
    """Rewards a few hundredths apart (the near-uniform guidance of the default run) become weights whose
    within-reference CV is the strength, unclipped; the raw rewards' CV stays tiny."""
    gen = torch.Generator().manual_seed(0)
    rewards = 0.55 + 0.01 * torch.randn(64, 20, generator=gen)
    mask = torch.ones_like(rewards)
    raw = spread(rewards.tolist())
    assert raw["cv"] < 0.03
    for strength in (0.1, 0.2):  # |z| <= sqrt(19) over 20 tokens: 1 + 0.2 z never reaches 0
        w = losses.contrast_weights(rewards, mask, strength, 0.0, 10.0)
        weights = spread(w.tolist(), (0.0, 10.0))
        assert weights["cv"] == pytest.approx(strength, rel=0.02)  # std of 1 + s z is s; its mean is 1
        assert weights["mean"] == pytest.approx(1.0, abs=1e-6) and weights["clipped"] == 0
        assert weights["p90_p10"] > 1 + 2 * strength


def test_spread_reports_cv_percentile_ratio_and_clipped_share():
    s = spread([[1.0, 1.0, 1.0], [1.0, 3.0]], clip=(0.1, 3.0))
    assert s["cv"] == pytest.approx(np.median([0.0, 0.5]))
    assert s["p90_p10"] == pytest.approx(np.median([1.0, 2.8 / 1.2]))
    assert s["clipped"] == pytest.approx(1 / 5) and s["mean"] == pytest.approx(7 / 5)
    with pytest.raises(ValueError, match="empty"):
        spread([[1.0], []])


@pytest.mark.parametrize("normalize", ["sequence", "batch"])
def test_contrast_zero_and_pg_coeff_zero_give_the_baseline_update_bit_for_bit(normalize):
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_updates=3, normalize=normalize, seed=11)
    base = tiny_llama(seed=3)
    hb = train_lm(base, _references(), cfg, PAD, CPU, progress=False)
    guided = tiny_llama(seed=3)
    zero = TrainConfig(**{**cfg.__dict__, "contrast": 0.0, "pg_coeff": 0.0})
    hg = train_lm(guided, _references(), zero, PAD, CPU, guidance=TokenReward(1.3, 0.05), progress=False)
    assert [h["loss"] for h in hg] == [h["loss"] for h in hb]
    for pa, pb in zip(base.parameters(), guided.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_a_positive_contrast_changes_the_update():
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_updates=2, seed=11, contrast=1.0)
    a, b = tiny_llama(seed=3), tiny_llama(seed=3)
    train_lm(a, _references(), cfg, PAD, CPU, progress=False)
    train_lm(b, _references(), cfg, PAD, CPU, guidance=TokenReward(1.3, 0.05), progress=False)
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_weights_scored_once_equal_the_guidance_on_each_micro_batch():
    """The frozen guidance scores every reference once, in batches sorted by length; the weights equal what it
    gives the same references inside a training micro-batch, to fp32 tolerance."""
    torch.manual_seed(0)
    guidance = guidance_for(tiny_llama(2))
    with torch.no_grad():
        for p in guidance.head.parameters():
            p.normal_(0, 0.5)  # a head whose rewards differ per token
    examples = _references(12)
    rewards, weights = example_weights(guidance, examples, TrainConfig(), PAD, CPU, torch.float32)
    assert weights == rewards
    for rows in ([0, 5, 7, 2], [11, 1, 3]):
        batch = collate([examples[i].prompt for i in rows], [examples[i].response for i in rows], PAD)
        with torch.no_grad():
            per_batch = guidance.eval()(batch)
        for j, i in enumerate(rows):
            torch.testing.assert_close(torch.tensor(rewards[i]), per_batch[j, :len(examples[i].response)],
                                       atol=1e-6, rtol=1e-5)
    assert len({round(x, 4) for row in rewards for x in row}) > 5  # not a constant guidance


# --- the policy-gradient term --------------------------------------------------------------------------------------


def test_leave_one_out_advantages_sum_to_zero_over_the_k_samples():
    scores = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.2]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    adv = losses.sequence_advantages(scores, mask)
    per_sample = torch.stack([adv[i, mask[i].bool()][0] for i in range(6)]).view(2, 3)
    torch.testing.assert_close(per_sample.sum(-1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_sample[0], torch.tensor([0.1 - 0.4, 0.5 - 0.2, 0.3 - 0.3]))
    # Sequence-level credit: every token of a sample has that sample's advantage; padding has none.
    for i in range(6):
        valid = adv[i, mask[i].bool()]
        assert torch.equal(valid, valid[:1].expand_as(valid))
        assert (adv[i, ~mask[i].bool()] == 0).all()
    rewards = torch.rand(6, 3, generator=torch.Generator().manual_seed(1))
    tok = losses.token_advantages(rewards, mask, 3)
    means = (tok.sum(-1) / mask.sum(-1)).view(2, 3)
    torch.testing.assert_close(means.sum(-1), torch.zeros(2), atol=1e-6, rtol=0)
    # Token-level credit: within a sample, a token's advantage follows its own reward.
    assert torch.allclose(tok[2, 0] - tok[2, 1], rewards[2, 0] - rewards[2, 1])


def test_policy_gradient_loss_is_scale_free_and_zero_for_zero_advantages():
    nll = torch.tensor([[1.0, 2.0], [0.5, 1.5]])
    adv = torch.tensor([[0.2, 0.2], [-0.2, -0.2]])
    mask = torch.ones(2, 2)
    a = losses.policy_gradient_loss(nll, adv, mask)
    torch.testing.assert_close(a, losses.policy_gradient_loss(nll, 50 * adv, mask))
    torch.testing.assert_close(a, torch.tensor((1 + 2 - 0.5 - 1.5) / 4))  # rms 0.2: advantages +/- 1
    assert losses.policy_gradient_loss(nll, torch.zeros(2, 2), mask) == 0


def _pg_run(credit: str, guidance=None, score=None, sign: int = 1):
    lm = tiny_llama(seed=4)
    before = _p_first(lm, PROMPTS, X)
    examples = [Example(p, [X, EOS]) for p in PROMPTS]
    # A tiny MLE part (lr-scaled by nothing: the references are X, EOS) would push X up by itself; pg_coeff 50
    # makes the policy-gradient term dominate, so its sign decides the direction.
    cfg = TrainConfig(lr=2e-2, batch_size=16, max_updates=12, pg_coeff=50.0, pg_credit=credit, pg_samples=4,
                      seed=3)
    train_lm(lm, examples, cfg, PAD, CPU, guidance=guidance, sampling=SamplingConfig(max_new_tokens=2),
             eos_ids=[EOS], progress=False, score=score)
    return before, _p_first(lm, PROMPTS, X)


def _scores_x(sign: int):
    """A sequence-level metric: 1 for a sample that starts with X, else 0 (negated with sign -1)."""
    def score(references, samples):
        return [[sign * float(s[0] == X) for s in group] for group in samples]
    return score


@pytest.mark.parametrize("sign", [1, -1])
def test_sequence_credit_moves_probability_toward_the_higher_scoring_samples(sign):
    before, after = _pg_run("sequence", score=_scores_x(sign))
    assert (after > before + 0.05) if sign > 0 else (after < 0.5 * before), (before, after)


@pytest.mark.parametrize(("high", "low", "sign"), [(1.3, 0.01, 1), (0.01, 1.3, -1)])
def test_token_credit_moves_probability_toward_tokens_the_guidance_pays_for(high, low, sign):
    before, after = _pg_run("token", guidance=TokenReward(high, low))
    assert (after > before + 0.05) if sign > 0 else (after < 0.5 * before), (before, after)


def test_the_policy_gradient_term_needs_its_credit_source():
    cfg = TrainConfig(pg_coeff=0.1, pg_credit="sequence", max_updates=1)
    with pytest.raises(ValueError, match="sample scorer"):
        train_lm(tiny_llama(), _references(4), cfg, PAD, CPU, sampling=SamplingConfig(max_new_tokens=2),
                 eos_ids=[EOS], progress=False)
    with pytest.raises(ValueError, match="objectives reinforce, pg and grpo"):
        TrainConfig(objective="reinforce", pg_coeff=0.1)


# --- best validation checkpoint ------------------------------------------------------------------------------------


def test_the_best_validation_checkpoint_is_kept():
    """validate() is called at the start and every eval_every updates; the weights it scored highest (the first
    of equal scores) are the ones train_lm leaves in the model."""
    scripted = iter([0.2, 0.1, 0.7, 0.3, 0.7])  # updates 0, 2, 4, 6, 8: the best is update 4
    seen = []

    def validate(model):
        seen.append(copy.deepcopy(model.state_dict()))
        return {"val_score": next(scripted)}

    lm = tiny_llama(seed=3)
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_updates=8, eval_every=2, seed=11)
    hist = train_lm(lm, _references(), cfg, PAD, CPU, progress=False, validate=validate)
    assert [h["update"] for h in hist if "val_score" in h] == [0, 2, 4, 6, 8]
    assert len(seen) == 5
    for name, value in lm.state_dict().items():
        assert torch.equal(value, seen[2][name]), name
    assert any(not torch.equal(v, seen[4][k]) for k, v in lm.state_dict().items())


def test_the_start_is_kept_when_no_update_beats_it():
    scores = iter([0.9, 0.1, 0.2])
    lm = tiny_llama(seed=3)
    start = _params(lm)
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_updates=4, eval_every=2, seed=11)
    train_lm(lm, _references(), cfg, PAD, CPU, progress=False, validate=lambda m: {"val_score": next(scores)})
    assert all(torch.equal(a, b) for a, b in zip(start, _params(lm), strict=True))


# --- return-preserving token credit (spread) and its placebo --------------------------------------------------------


def _credit_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, 4, generator=gen)  # B = 3 inputs, K = 4 samples
    rewards = 0.5 + 0.05 * torch.randn(12, 6, generator=gen)
    lengths = torch.tensor([6, 3, 5, 1, 2, 6, 4, 6, 6, 2, 3, 5])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    return scores, rewards * mask, mask


@pytest.mark.parametrize(("beta", "temperature"), [(1.0, 1.0), (0.3, 0.5), (0.8, 2.0)])
def test_spread_credit_keeps_each_samples_total_the_sequence_credits(beta, temperature):
    scores, rewards, mask = _credit_case()
    spread = losses.spread_advantages(scores, rewards, mask, beta, temperature)
    seq = losses.sequence_advantages(scores, mask)
    torch.testing.assert_close(spread.sum(-1), seq.sum(-1), atol=1e-6, rtol=1e-5)  # T_k x A_k per sample
    assert (spread[~mask.bool()] == 0).all()
    assert not torch.allclose(spread, seq)  # the guidance did move credit between tokens


def test_spread_credit_with_beta_zero_is_sequence_credit_bit_for_bit():
    scores, rewards, mask = _credit_case(1)
    assert torch.equal(losses.spread_advantages(scores, rewards, mask, 0.0, 1.0),
                       losses.sequence_advantages(scores, mask))


def test_a_positive_advantage_goes_to_the_token_the_guidance_rates_high_and_a_negative_one_avoids_it():
    """One input, two samples of 5 tokens; the guidance rates token 2 of each far above the rest. The better
    sample (advantage +0.4) puts most of its credit on token 2; the worse (-0.4) blames token 2 least."""
    scores = torch.tensor([[0.9, 0.5]])
    rewards = torch.full((2, 5), 0.5)
    rewards[:, 2] = 1.2
    mask = torch.ones(2, 5)
    c = losses.spread_advantages(scores, rewards, mask, 1.0, 1.0)
    a = 0.4
    assert c[0].argmax() == 2 and c[0, 2] > a and (c[0, [0, 1, 3, 4]] < a).all()  # praise: on the good token
    assert c[1].argmax() == 2 and -a < c[1, 2] < 0 and (c[1, [0, 1, 3, 4]] < -a).all()  # blame: elsewhere
    shares = losses.credit_shares(rewards, mask, torch.tensor([1.0, -1.0]), 1.0)
    torch.testing.assert_close(shares.sum(-1), torch.full((2,), 5.0))
    assert torch.equal(losses.credit_shares(rewards, mask, torch.zeros(2), 1.0), torch.ones(2, 5))  # A = 0
    sharper = losses.credit_shares(rewards, mask, torch.tensor([1.0, -1.0]), 0.25)
    assert sharper[0, 2] > shares[0, 2] and sharper[1, 2] < shares[1, 2]  # lower temperature: more concentrated


def test_the_placebo_keeps_each_samples_multiset_of_credit_and_moves_it():
    scores, rewards, mask = _credit_case(2)
    spread = losses.spread_advantages(scores, rewards, mask, 1.0, 1.0)
    placebo = losses.spread_advantages(scores, rewards, mask, 1.0, 1.0, torch.Generator().manual_seed(0))
    for i in range(12):
        valid = mask[i].bool()
        torch.testing.assert_close(placebo[i, valid].sort().values, spread[i, valid].sort().values)
        assert (placebo[i, ~valid] == 0).all()
    assert not torch.equal(placebo, spread)
    again = losses.spread_advantages(scores, rewards, mask, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(placebo, again)  # seeded


def test_policy_gradient_loss_scaled_by_the_sequence_credit_takes_its_step_size():
    scores, rewards, mask = _credit_case(3)
    nll = torch.rand(12, 6, generator=torch.Generator().manual_seed(4))
    seq = losses.sequence_advantages(scores, mask)
    same = losses.policy_gradient_loss(nll, seq, mask)
    torch.testing.assert_close(losses.policy_gradient_loss(nll, seq, mask, seq), same)
    spread = losses.spread_advantages(scores, rewards, mask, 1.0, 1.0)
    rms = (seq.pow(2).sum() / mask.sum()).sqrt()
    torch.testing.assert_close(losses.policy_gradient_loss(nll, spread, mask, seq),
                               (spread * nll * mask).sum() / rms / mask.sum())


def _pg_alone(credit: str, sign: int, guidance=None):
    """objective pg from a tiny Llama: K = 4 samples of 2 tokens per prompt, reward 1 for a sample that starts with
    X (negated with sign -1), the guidance (if any) paying most for X."""
    lm = tiny_llama(seed=4)
    before = _p_first(lm, PROMPTS, X)
    cfg = TrainConfig(objective="pg", lr=2e-2, batch_size=16, max_updates=12, pg_credit=credit, pg_samples=4,
                      seed=3)
    hist = train_lm(lm, [Example(p) for p in PROMPTS], cfg, PAD, CPU, guidance=guidance,
                    sampling=SamplingConfig(max_new_tokens=2), eos_ids=[EOS], progress=False, score=_scores_x(sign))
    return before, _p_first(lm, PROMPTS, X), hist


@pytest.mark.parametrize("credit", ["sequence", "spread", "placebo"])
@pytest.mark.parametrize("sign", [1, -1])
def test_policy_gradient_alone_moves_probability_toward_the_rewarded_samples_with_every_credit(credit, sign):
    before, after, hist = _pg_alone(credit, sign, guidance=TokenReward(1.3, 0.01))
    assert (after > before + 0.05) if sign > 0 else (after < 0.5 * before), (before, after)
    assert len(hist) == 12 and all(h["seconds"] > 0 for h in hist)
    assert {"pg_score", "pg_loss", "nll", "tokens"} <= set(hist[0])
    assert hist[0]["reward"] == pytest.approx(hist[0]["pg_score"])  # objective pg: the reward is the mean score


def test_spread_credit_places_what_sequence_credit_spreads_evenly():
    """The same samples (same seed, same first policy): with the guidance paying most for X, spread credit's first
    update raises p(X first) more than sequence-level credit's when X-first samples are rewarded."""
    p = {}
    for credit in ("sequence", "spread"):
        lm = tiny_llama(seed=4)
        cfg = TrainConfig(objective="pg", lr=2e-2, batch_size=16, max_updates=1, pg_credit=credit, pg_samples=4,
                          seed=3)
        train_lm(lm, [Example(q) for q in PROMPTS], cfg, PAD, CPU, guidance=TokenReward(1.3, 0.01),
                 sampling=SamplingConfig(max_new_tokens=2), eos_ids=[EOS], progress=False, score=_scores_x(1))
        p[credit] = _p_first(lm, PROMPTS, X)
    assert p["spread"] > p["sequence"], p


def test_objective_pg_needs_what_its_credit_reads():
    with pytest.raises(ValueError, match="pg_credit 'spread' needs a guidance"):
        _pg_alone("spread", 1)
    with pytest.raises(ValueError, match="sample scorer"):
        train_lm(tiny_llama(), [Example(p) for p in PROMPTS[:4]], TrainConfig(objective="pg", pg_credit="placebo"),
                 PAD, CPU, guidance=TokenReward(1.3, 0.01), sampling=SamplingConfig(max_new_tokens=2),
                 eos_ids=[EOS], progress=False)
    with pytest.raises(ValueError, match="no leave-one-out advantage"):
        TrainConfig(objective="reinforce", pg_credit="spread")
    with pytest.raises(ValueError, match="set pg_credit: sequence"):
        TrainConfig(objective="grpo", pg_credit="token")
