"""ptg.guidance.model and ptg.lm.train on tiny models: alignment, causality, fitting a synthetic preference, the
guided LM objectives and bit-for-bit reproducibility."""

import random

import pytest
import torch
from conftest import EOS, PAD, tiny_llama, tiny_t5

from ptg.guidance.model import FitConfig, Guidance, RankedGroup, fit_guidance, load_guidance, save_guidance
from ptg.lm.models import collate, response_logits
from ptg.lm.train import Example, TrainConfig, train_lm

CPU = torch.device("cpu")
X = 5  # the preferred token of the synthetic preference


def guidance_for(lm) -> Guidance:
    backbone = lm.model if not lm.config.is_encoder_decoder else _t5_backbone(lm)
    return Guidance(backbone, head_hidden=64)


def _t5_backbone(lm):
    from transformers import T5Model

    backbone = T5Model(lm.config)
    backbone.load_state_dict(lm.state_dict(), strict=False)
    return backbone.eval()


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_rewards_are_causal(make):
    """Changing response token t + 1 leaves the rewards of tokens <= t unchanged."""
    g = guidance_for(make()).eval()
    for layer in (g.head[0], g.head[2]):  # make the head sensitive, so a leak would show
        torch.nn.init.normal_(layer.weight, std=0.2)
    base = [4, 6, 8, 10, 12, EOS]
    for t in range(len(base) - 1):
        changed = base.copy()
        changed[t + 1] = 3 if base[t + 1] != 3 else 7
        r = g(collate([[2, 9, 9]] * 2, [base, changed], PAD))
        torch.testing.assert_close(r[0, : t + 1], r[1, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(r[0, t + 1:], r[1, t + 1:])


def test_initial_rewards_are_the_reference_constant():
    g = guidance_for(tiny_llama()).eval()
    r = g(collate([[2, 3]], [[4, 5, EOS], [6, EOS]], PAD))
    torch.testing.assert_close(r, torch.tensor([[0.5487, 0.5487, 0.5487], [0.5487, 0.5487, 0.0]]), atol=1e-4, rtol=0)


def synthetic_groups(n: int, k: int, seed: int) -> list[RankedGroup]:
    """Responses of random tokens; the preference is the fraction of token X ("more X is better")."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n):
        prompt = [2] + [rng.randrange(3, 20) for _ in range(rng.randrange(2, 5))]
        responses, scores = [], []
        for _ in range(k):
            length = rng.randrange(3, 8)
            p_x = rng.random()
            resp = [X if rng.random() < p_x else rng.randrange(6, 20) for _ in range(length)] + [EOS]
            responses.append(resp)
            scores.append(resp.count(X) / len(resp))
        groups.append(RankedGroup(prompt, responses, scores))
    return groups


FIT = FitConfig(agg="avg", lr=1e-3, batch_groups=8, max_updates=60, eval_every=20, seed=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_fit_guidance_learns_a_synthetic_preference(make):
    g = guidance_for(make())
    train, val = synthetic_groups(96, 4, seed=1), synthetic_groups(32, 4, seed=2)
    before = fit_guidance(guidance_for(make()), train, val, FitConfig(max_updates=1, eval_every=1), PAD, CPU,
                          progress=False).history[0]["val_accuracy"]
    result = fit_guidance(g, train, val, FIT, PAD, CPU, progress=False)
    assert result.best_val_accuracy >= 0.9 > before
    assert result.best_val_loss < result.history[0]["val_loss"]
    # The reward of the preferred token is now above the others'.
    r = g(collate([[2, 7]], [[X, 9, X, 11, EOS]], PAD))[0]
    assert r[0] > r[1] and r[2] > r[3]


def test_fit_is_reproducible_bit_for_bit_and_checkpoints_round_trip(tmp_path):
    train, val = synthetic_groups(32, 3, seed=1), synthetic_groups(8, 3, seed=2)
    cfg = FitConfig(lr=1e-3, batch_groups=4, max_updates=8, eval_every=4)
    runs = []
    for _ in range(2):
        g = guidance_for(tiny_llama())
        fit_guidance(g, train, val, cfg, PAD, CPU, progress=False)
        runs.append(g.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    save_guidance(g, tmp_path / "g")
    loaded = load_guidance(tmp_path / "g")
    assert {p.name for p in (tmp_path / "g").rglob("*") if p.suffix in (".bin", ".pt", ".pth")} == set()
    batch = collate([[2, 3]], [[X, 7, EOS]], PAD)
    torch.testing.assert_close(loaded.eval()(batch), g.eval()(batch))


def test_fit_guidance_rejects_bad_groups():
    g = guidance_for(tiny_llama())
    good = synthetic_groups(4, 3, seed=0)
    with pytest.raises(ValueError, match="K"):
        fit_guidance(g, [RankedGroup([2], [[4, EOS]], [1.0])], good, FIT, PAD, CPU, progress=False)
    with pytest.raises(ValueError, match="agg"):
        fit_guidance(g, good, good, FitConfig(agg="mean"), PAD, CPU, progress=False)
    with pytest.raises(ValueError, match="empty"):
        fit_guidance(g, [], good, FIT, PAD, CPU, progress=False)


def _logp(model, examples, token):
    batch = collate([e.prompt for e in examples], [e.response for e in examples], PAD)
    with torch.no_grad():
        logp = response_logits(model, batch).log_softmax(-1)
    picked = logp.gather(-1, batch.response_ids[..., None])[..., 0]
    is_x = (batch.response_ids == token) & batch.response_mask.bool()
    other = (batch.response_ids != token) & batch.response_mask.bool()
    return picked[is_x].mean().item(), picked[other].mean().item()


def test_a_fitted_guidance_favours_high_reward_tokens_more_than_uniform_weights():
    train = synthetic_groups(64, 4, seed=1)
    g = guidance_for(tiny_llama())
    fit_guidance(g, train, synthetic_groups(16, 4, seed=2), FIT, PAD, CPU, progress=False)
    examples = [Example(grp.prompt, grp.responses[0]) for grp in synthetic_groups(32, 1, seed=5)]
    gains = {}
    for name, guidance in (("uniform", None), ("guided", g)):
        lm = tiny_llama(seed=3)
        x0, o0 = _logp(lm, examples, X)
        cfg = TrainConfig(objective="wmle", lr=1e-3, batch_size=8, max_updates=4)
        hist = train_lm(lm, examples, cfg, PAD, CPU, guidance=guidance, progress=False)
        assert len(hist) == 4 and all(h["loss"] > 0 for h in hist)
        x1, o1 = _logp(lm, examples, X)
        gains[name] = (x1 - x0) - (o1 - o0)  # how much more the preferred token gained than the others
    assert gains["guided"] > gains["uniform"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_reinforce_reports_the_reward_nll_and_entropy_of_its_samples(make):
    """An LM whose logits are all zero (uniform over V tokens) and a guidance with one raw reward z everywhere: the
    first update's row has reward exactly squash(z) (1 - softplus(1 - z), then 1e-8 + softplus(. - 1e-8)), nll and
    entropy exactly log V, and the loss mean(r_t nll_t) - 0.125 H."""
    import math

    from ptg.lm.sampling import SamplingConfig

    lm = make()
    with torch.no_grad():
        lm.get_output_embeddings().weight.zero_()
    g = guidance_for(make())
    z = 0.3
    with torch.no_grad():
        g.head[2].weight.zero_()
        g.head[2].bias.fill_(z)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    reward = 1e-8 + softplus(1 - softplus(1 - z) - 1e-8)
    log_v = math.log(lm.config.vocab_size)
    examples = [Example([2, 4, 5]), Example([2, 7])]
    cfg = TrainConfig(objective="reinforce", lr=1e-3, batch_size=2, max_updates=2)
    hist = train_lm(lm, examples, cfg, PAD, CPU, guidance=g, sampling=SamplingConfig(max_new_tokens=4),
                    eos_ids=[EOS], progress=False)
    first = hist[0]
    assert first["reward"] == pytest.approx(reward, rel=1e-6)
    assert first["nll"] == pytest.approx(log_v, rel=1e-5) and first["entropy"] == pytest.approx(log_v, rel=1e-5)
    assert first["loss"] == pytest.approx(reward * log_v - 0.125 * log_v, rel=1e-5)
    assert len(hist) == 2 and hist[1]["entropy"] < log_v  # the update moved the LM off uniform


def test_train_lm_rejects_bad_arguments():
    lm = tiny_llama()
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="mle")
    with pytest.raises(ValueError, match="normalize"):
        TrainConfig(normalize="token")
    with pytest.raises(ValueError, match="reference"):
        train_lm(lm, [Example([2])], TrainConfig(objective="wmle"), PAD, CPU, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        from ptg.lm.sampling import SamplingConfig

        train_lm(lm, [Example([2])], TrainConfig(objective="reinforce"), PAD, CPU,
                 sampling=SamplingConfig(temperature=0.0), eos_ids=[EOS], progress=False)


def test_pairwise_accuracy_counts_ties_as_half_and_skips_equal_preferences():
    from ptg.guidance.model import pairwise_accuracy

    prefs = torch.tensor([[0.9, 0.5, 0.1, 0.1]])
    assert pairwise_accuracy(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), prefs) == (5.0, 5)
    assert pairwise_accuracy(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), prefs) == (2.5, 5)
    assert pairwise_accuracy(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), prefs) == (0.0, 5)


@pytest.mark.parametrize("guided", [False, True])
def test_accumulated_micro_batches_make_the_update_of_one_batch(guided):
    """grad_accum = 2 micro-batches of 2 references is one update of the 4 (per-sequence normalisation: the batch's
    loss is the mean of its sequences' losses): the same loss, the same pre-clipping gradient norm (Adam's step alone
    would hide a gradient off by a constant factor) and the same weights. Keeping only the last micro-batch's
    gradient, or not dividing by grad_accum, fails it."""
    examples = [Example([2, 4, 5], [4, 6, 7, EOS]), Example([2, 7], [9, EOS]), Example([2, 8, 9, 10], [5, 5, EOS]),
                Example([2, 11], [12, 13, 14, 15, EOS])]
    guidance = guidance_for(tiny_llama(seed=7)) if guided else None
    if guided:
        torch.nn.init.normal_(guidance.head[-1].weight, std=0.5)  # token weights that differ within a reference
    runs = {}
    for batch_size, accum in ((4, 1), (2, 2)):
        lm = tiny_llama(seed=3)
        cfg = TrainConfig(objective="wmle", lr=1e-3, batch_size=batch_size, grad_accum=accum, max_updates=1,
                          clip_norm=1e9)
        history = train_lm(lm, examples, cfg, PAD, CPU, guidance=guidance, progress=False)
        runs[accum] = (history[0], lm.state_dict())
    (one, w1), (two, w2) = runs[1], runs[2]
    assert two["tokens"] == one["tokens"] == 14
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("objective", ["wmle", "reinforce"])
def test_gradient_checkpointing_takes_the_same_updates(objective):
    """train_lm.gradient_checkpointing recomputes activations in the backward pass (and runs the prompts with their
    responses, not in a shared pass): the same losses, gradient norms and weights as keeping them, to fp32
    rounding, and the model is left without checkpointing."""
    from ptg.lm.sampling import SamplingConfig

    prefix = [2, 3, 4, 5, 6, 7, 8, 9]  # a prompt prefix the shared pass would run once
    examples = [Example(prefix + [10 + i], [4 + i % 5, 6, 7 + i % 3, EOS][: 2 + i % 3]) for i in range(6)]
    guidance = guidance_for(tiny_llama(seed=7))
    torch.nn.init.normal_(guidance.head[-1].weight, std=0.5)
    runs = {}
    for checkpointing in (False, True):
        lm = tiny_llama(seed=3)
        cfg = TrainConfig(objective=objective, lr=0.5, batch_size=3, max_updates=3, seed=1,
                          gradient_checkpointing=checkpointing)
        history = train_lm(lm, examples, cfg, PAD, CPU, guidance=guidance, sampling=SamplingConfig(max_new_tokens=4),
                           eos_ids=[EOS], progress=False, optimizer=torch.optim.SGD(lm.parameters(), lr=cfg.lr))
        assert not lm.is_activation_checkpointing
        runs[checkpointing] = (history, lm.state_dict())
    (plain, w1), (recomputed, w2) = runs[False], runs[True]
    for r1, r2 in zip(plain, recomputed, strict=True):
        for key in ("loss", "nll", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(w1[k], tiny_llama(seed=3).state_dict()[k]) for k in w1)


# The peak is the process's own high-water mark (VmHWM, KiB), not getrusage's ru_maxrss: that one survives fork and
# exec, so a child of a large test process (an xdist worker at 2.1 GB) reported its parent's peak, the same both ways.
PEAK_SCRIPT = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from ptg.lm.train import Example, TrainConfig, train_lm
torch.manual_seed(0)
torch.set_num_threads(1)
cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
lm = LlamaForCausalLM(cfg)
examples = [Example([5 + i] + [7] * 15, [(11 * i + 3 * t) % 1000 + 2 for t in range(495)] + [1]) for i in range(8)]
history = train_lm(lm, examples, TrainConfig(batch_size=8, max_updates=1, gradient_checkpointing=sys.argv[1] == "1"),
                   0, torch.device("cpu"), progress=False)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(history[0]["seconds"], history[0]["loss"], hwm)
"""


@pytest.mark.slow
def test_gradient_checkpointing_lowers_the_peak_memory_of_an_update():
    """One update of a 12-layer random Llama (hidden 256, 8 sequences of 512 tokens, fp32, one thread) with and
    without gradient checkpointing, each in a fresh process: the peak resident memory of the process falls by the
    activations no longer kept (measured: docs/performance.md, "Gradient checkpointing")."""
    import subprocess
    import sys

    peaks, seconds, loss = {}, {}, {}
    for flag in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, flag], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        seconds[flag], loss[flag], rss = map(float, done.stdout.split()[-3:])
        peaks[flag] = rss / 1024  # MiB
    print(f"one update: peak RSS {peaks['0']:.0f} MiB kept, {peaks['1']:.0f} MiB recomputed; "
          f"{seconds['0']:.2f} s and {seconds['1']:.2f} s")
    assert loss["1"] == pytest.approx(loss["0"], rel=1e-5)
    assert peaks["1"] < peaks["0"] - 250, peaks  # measured 640-700 MiB less; RSS varies by about 100
