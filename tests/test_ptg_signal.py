"""Tests that would catch a broken PTG: the guidance must change the LM update, in the right direction, and the
baseline must differ from PTG only in its (uniform) token weights. Tiny models built from configs, CPU."""

import copy

import pytest
import torch
from conftest import EOS, PAD, VOCAB, tiny_llama
from test_guidance_train import X, guidance_for, synthetic_groups

from ptg import losses
from ptg.guidance.model import FitConfig, fit_guidance, load_guidance, save_guidance
from ptg.lm.models import collate, response_logits
from ptg.lm.sampling import SamplingConfig
from ptg.lm.train import Example, TrainConfig, load_optimizer, make_optimizer, save_optimizer, train_lm

CPU = torch.device("cpu")


class TokenReward(torch.nn.Module):
    """A frozen guidance that pays ``high`` for token X and ``low`` for every other token."""

    def __init__(self, high: float, low: float) -> None:
        super().__init__()
        self.high, self.low = high, low

    def forward(self, batch):
        r = torch.where(batch.response_ids == X, self.high, self.low)
        return r * batch.response_mask


def _p_first(model, prompts, token):
    """Mean probability of ``token`` as the first response token."""
    with torch.no_grad():
        logits = response_logits(model, collate(prompts, [[token]] * len(prompts), PAD))
    return logits[:, 0].softmax(-1)[:, token].mean().item()


def _entropy_first(model, prompts):
    with torch.no_grad():
        logits = response_logits(model, collate(prompts, [[EOS]] * len(prompts), PAD))
    p = logits[:, 0].softmax(-1)
    return -(p * p.log()).sum(-1).mean().item()


PROMPTS = [[2, 3 + i % 7, 4 + i % 5] for i in range(16)]


@pytest.mark.parametrize(("high", "low", "sign"), [(1.3, 0.01, 1), (0.01, 1.3, -1)])
def test_reinforce_moves_probability_toward_high_reward_tokens(high, low, sign):
    lm = tiny_llama(seed=4)
    before = _p_first(lm, PROMPTS, X)
    cfg = TrainConfig(objective="reinforce", lr=3e-2, batch_size=16, max_updates=15, entropy_coeff=0.0)
    train_lm(lm, [Example(p) for p in PROMPTS], cfg, PAD, CPU, guidance=TokenReward(high, low),
             sampling=SamplingConfig(max_new_tokens=3), eos_ids=[EOS], progress=False)
    after = _p_first(lm, PROMPTS, X)
    # Probability moves toward the rewarded token: up by a margin, or down to under half (a sign error in the
    # policy-gradient term moves it the other way).
    assert (after > before + 0.05) if sign > 0 else (after < 0.5 * before), (before, after)


def test_entropy_bonus_raises_entropy():
    lm = tiny_llama(seed=4)
    with torch.no_grad():
        lm.lm_head.weight.mul_(20.0)  # a peaked policy, far from the maximum entropy log V
    before = _entropy_first(lm, PROMPTS)
    cfg = TrainConfig(objective="reinforce", lr=1e-2, batch_size=16, max_updates=10, entropy_coeff=1.0)
    train_lm(lm, [Example(p) for p in PROMPTS], cfg, PAD, CPU, guidance=TokenReward(1e-6, 1e-6),
             sampling=SamplingConfig(max_new_tokens=3), eos_ids=[EOS], progress=False)
    assert _entropy_first(lm, PROMPTS) > before + 0.1, before
    assert before < torch.log(torch.tensor(float(VOCAB))).item()


def test_reinforce_scores_samples_under_the_distribution_they_were_drawn_from():
    """With top-k = 1 the sampling distribution is a point mass: on-policy NLL and entropy are both 0 (scoring
    under the unfiltered softmax, the reference's prompt-task bug, gives NLL ~ log V)."""
    lm = tiny_llama(seed=4)
    cfg = TrainConfig(objective="reinforce", lr=1e-3, batch_size=4, max_updates=2)
    hist = train_lm(lm, [Example(p) for p in PROMPTS[:4]], cfg, PAD, CPU, guidance=TokenReward(1.0, 0.5),
                    sampling=SamplingConfig(max_new_tokens=3, top_k=1), eos_ids=[EOS], progress=False)
    assert all(h["nll"] == pytest.approx(0.0, abs=1e-6) and h["entropy"] == pytest.approx(0.0, abs=1e-5)
               for h in hist)


def _references(n: int = 24):
    return [Example(g.prompt, g.responses[0]) for g in synthetic_groups(n, 1, seed=7)]


@pytest.mark.parametrize("normalize", ["sequence", "batch"])
def test_constant_guidance_gives_exactly_the_baseline_update(normalize):
    """The baseline (no guidance: uniform weights) and PTG see the same examples in the same order with the same
    optimizer: with a constant guidance the two runs are the same run."""
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_updates=3, normalize=normalize, seed=11)
    runs = []
    for guidance in (None, TokenReward(0.5, 0.5)):  # 0.5: normalising by it is exact
        lm = tiny_llama(seed=3)
        hist = train_lm(lm, _references(), cfg, PAD, CPU, guidance=guidance, progress=False)
        runs.append((lm, hist))
    (a, ha), (b, hb) = runs
    assert [h["tokens"] for h in ha] == [h["tokens"] for h in hb]
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)


def test_guidance_changes_the_update_and_weights_high_reward_tokens_more():
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_updates=4, seed=11)
    gains = {}
    for name, guidance in (("uniform", None), ("guided", TokenReward(1.3, 0.05))):
        lm = tiny_llama(seed=3)
        examples = _references(32)
        x0 = _logp_of(lm, examples)
        train_lm(lm, examples, cfg, PAD, CPU, guidance=guidance, progress=False)
        x1 = _logp_of(lm, examples)
        gains[name] = (x1[0] - x0[0]) - (x1[1] - x0[1])
    assert gains["guided"] > gains["uniform"] + 0.05, gains


def _logp_of(model, examples):
    """Mean log-probability of token X and of the other tokens in the references."""
    batch = collate([e.prompt for e in examples], [e.response for e in examples], PAD)
    with torch.no_grad():
        logp = response_logits(model, batch).log_softmax(-1).gather(-1, batch.response_ids[..., None])[..., 0]
    valid = batch.response_mask.bool()
    return logp[valid & (batch.response_ids == X)].mean().item(), logp[valid & (batch.response_ids != X)].mean().item()


def test_batch_normalisation_with_uniform_weights_is_token_mean_nll():
    nll = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    ones = mask.float()
    assert losses.weighted_mle(nll, ones, mask, normalize="batch").item() == pytest.approx(10 / 4)
    assert losses.weighted_mle(nll, ones, mask, normalize="sequence").item() == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="normalize"):
        losses.weighted_mle(nll, ones, mask, normalize="token")


FIT = FitConfig(lr=1e-3, batch_groups=8, max_updates=4, eval_every=2, seed=0)


def test_round_one_never_keeps_the_constant_guidance():
    g = guidance_for(tiny_llama())
    frozen = dataclass_replace(FIT, lr=0.0)  # no update can improve on the start
    result = fit_guidance(g, synthetic_groups(16, 3, 1), synthetic_groups(8, 3, 2), frozen, PAD, CPU,
                          progress=False)
    assert result.best_update > 0 and not result.kept_start and g.fitted
    assert result.val_pairs > 0


def test_a_warm_started_round_starts_from_the_previous_guidance_and_says_when_it_keeps_it(tmp_path, caplog):
    train, val = synthetic_groups(48, 3, 1), synthetic_groups(16, 3, 2)
    g = guidance_for(tiny_llama())
    first = fit_guidance(g, train, val, dataclass_replace(FIT, max_updates=20, eval_every=10), PAD, CPU,
                         progress=False)
    save_guidance(g, tmp_path / "g")
    warm = load_guidance(tmp_path / "g")
    assert warm.fitted
    second = fit_guidance(warm, train, val, dataclass_replace(FIT, lr=0.0), PAD, CPU, progress=False)
    assert second.history[0]["val_loss"] == pytest.approx(first.best_val_loss, abs=1e-5)
    assert second.kept_start and second.best_update == 0
    assert "keeps its starting guidance" in caplog.text


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    lm = tiny_llama(seed=3)
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_updates=2)
    opt = make_optimizer(lm, cfg)
    train_lm(lm, _references(), cfg, PAD, CPU, progress=False, optimizer=opt)
    save_optimizer(opt, tmp_path / "opt.safetensors")
    fresh = make_optimizer(lm, cfg)
    load_optimizer(fresh, tmp_path / "opt.safetensors", lr=5e-3)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k])), (i, k)
    assert all(g["lr"] == 5e-3 for g in fresh.param_groups)
    # A carried state changes the next update (Adam's moments), so the option is not inert.
    lm2 = copy.deepcopy(lm)
    train_lm(lm, _references(), cfg, PAD, CPU, progress=False, optimizer=fresh)
    train_lm(lm2, _references(), cfg, PAD, CPU, progress=False)
    assert not torch.allclose(lm.lm_head.weight, lm2.lm_head.weight)


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
