"""ptg.losses against the hand-computed vectors of ptg-spec.md §8 (float64, 1e-6) and finite differences."""

import math

import pytest
import torch

from ptg import losses

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


@pytest.mark.parametrize(
    ("z", "clamp", "sig"),
    [(-50, 1.0e-08, 1.92875e-22), (-5, 0.00669881, 0.00669285), (-1, 0.280678, 0.268941),
     (-1e-4, 0.548702, 0.499975), (0, 0.548733, 0.5), (1, 0.858298, 0.731059), (2, 1.09434, 0.880797),
     (5, 1.30003, 0.993307), (50, 1.31326, 1.0)],
)
def test_squash_matches_spec_8_1(z, clamp, sig):
    assert losses.squash(t([z]), "soft_clamp").item() == pytest.approx(clamp, rel=1e-5, abs=1e-12)
    assert losses.squash(t([z]), "sigmoid").item() == pytest.approx(sig, rel=1e-5, abs=1e-27)


def test_squash_supremum_and_nan():
    assert losses.squash(t([1e6]), "soft_clamp").item() == pytest.approx(1.3132616902, abs=1e-9)
    assert losses.squash(t([float("nan")])).item() == 0.0
    with pytest.raises(ValueError, match="mode"):
        losses.squash(t([0.0]), "relu")


R_82 = [[0.10, 0.50, 0.20, 0.90, 0.30], [0.40, 0.60, 0.80, 0.10, 0.70],
        [0.20, 0.30, 0.40, 0.50, 0.60], [0.90, 0.10, 0.20, 0.30, 0.40]]
M_82 = [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]


@pytest.mark.parametrize(
    ("method", "expected"),
    [("avg", [[1.8666667, 1.925], [1.05, 0.75]]), ("sum", [[1.6, 2.2], [0.7, 1.0]]),
     ("soft_max", [[9.6293027, 11.6898081], [5.2107579, 9.0771378]]),
     ("soft_min", [[-5.8947901, -7.8450265], [-3.1107579, -7.5771378]])],
)
def test_aggregate_matches_spec_8_2(method, expected):
    out = losses.aggregate(t(R_82), t(M_82), method, group_size=2, temperature=2.0)
    assert out.shape == (2, 2)
    torch.testing.assert_close(out, t(expected), atol=1e-6, rtol=0)


def test_aggregate_and_list_mle_second_example_8_2():
    r = t([[0.0, 0.6, 0.4, 0.2], [0.0, 0.9, 0.1, 0.0], [0.0, 0.3, 0.3, 0.3]])
    m = t([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1]])
    y = t([[0.25, 0.40, 0.10]])
    expected = {"avg": ([1.0666667, 1.3333333, 0.8], 1.4241868), "sum": ([1.2, 1.0, 0.9], 1.6941863),
                "soft_max": ([6.9436952, 5.1360813, 6.6592655], 3.0191194),
                "soft_min": ([-4.8103619, -2.4694147, -5.0592655], 0.7345062)}
    for method, (scores, loss) in expected.items():
        e = losses.aggregate(r, m, method, group_size=3)
        torch.testing.assert_close(e, t([scores]), atol=1e-6, rtol=0)
        assert losses.list_mle(e, y).item() == pytest.approx(loss, abs=1e-6)


def test_aggregate_prompt_semantics_8_3():
    r = t([[0.10, 0.50, 0.20, 0.90, 0.30], [0.40, 0.60, 0.80, 0.10, 0.70]])
    ones = torch.ones_like(r)
    torch.testing.assert_close(losses.aggregate(r, ones, "sum", 2), t([[2.0, 2.6]]))
    torch.testing.assert_close(losses.aggregate(r, ones, "avg", 2), t([[2.0, 2.6]]))
    torch.testing.assert_close(losses.aggregate(r, ones, "soft_max", 2), t([[18.1979832, 18.7693129]]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(losses.aggregate(r, ones, "soft_min", 2), t([[-14.1905283, -13.5732542]]), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize(
    ("pred", "true", "loss"),
    [([[1.0, 2.0, 0.5]], [[0.3, 0.1, 0.2]], 3.1657821),
     ([[1.0, 2.0, 0.5], [0, 0, 0]], [[0.3, 0.1, 0.2], [0.9, 0.5, 0.1]], 2.4787708),
     ([[3.0, 2.0, 1.0]], [[0.9, 0.5, 0.1]], 0.7208677),
     ([[1.8666667, 1.925], [1.05, 0.75]], [[0.20, 0.35], [0.50, 0.10]], 0.6093805)],
)
def test_list_mle_matches_spec_8_4(pred, true, loss):
    assert losses.list_mle(t(pred), t(true)).item() == pytest.approx(loss, abs=1e-6)


def test_list_mle_gradient_matches_spec_and_finite_differences():
    pred = t([[1.0, 2.0, 0.5]]).requires_grad_()
    true = t([[0.3, 0.1, 0.2]])
    losses.list_mle(pred, true).backward()
    torch.testing.assert_close(pred.grad, t([[-0.7687761, 1.4461062, -0.6773301]]), atol=1e-6, rtol=0)
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    y = torch.randn(3, 4, dtype=D)
    assert torch.autograd.gradcheck(lambda s: losses.list_mle(s, y), (x,))


def test_list_mle_ties_are_broken_by_the_generator():
    pred, true = t([[1.0, 0.0, 0.5]]), t([[0.4, 0.4, 0.1]])
    seen = set()
    for seed in range(20):
        a = losses.list_mle(pred, true, generator=torch.Generator().manual_seed(seed)).item()
        b = losses.list_mle(pred, true, generator=torch.Generator().manual_seed(seed)).item()
        assert a == b
        seen.add(round(a, 7))
    assert seen == {1.6543467, 2.1543467}


def test_list_mle_bf16_close_to_fp64():
    pred, true = torch.randn(8, 5, dtype=D), torch.randn(8, 5, dtype=D)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    exact = losses.list_mle(pred, true, gen()).item()
    assert losses.list_mle(pred.bfloat16(), true.bfloat16(), gen()).item() == pytest.approx(exact, rel=2e-2)
    assert losses.list_mle(pred.float(), true.float(), gen()).item() == pytest.approx(exact, rel=1e-6)


NLL_85 = [[2.0, 1.0, 0.5, 3.0, 0.0]]
R_85 = [[0.2, 0.8, 0.5, 0.5, 0.9]]
M_85 = [[1, 1, 1, 1, 0]]


@pytest.mark.parametrize(
    ("use_q", "exp_rewards", "loss"),
    [(False, False, 1.475), (True, False, 1.471698), (False, True, 1.547787), (True, True, 1.487588)],
)
def test_weighted_mle_matches_spec_8_5(use_q, exp_rewards, loss):
    out = losses.weighted_mle(t(NLL_85), t(R_85), t(M_85), use_q=use_q, exp_rewards=exp_rewards)
    assert out.item() == pytest.approx(loss, abs=1e-6)


def test_weighted_mle_with_constant_reward_is_per_sequence_mean_nll():
    out = losses.weighted_mle(t(NLL_85), torch.ones(1, 5, dtype=D), t(M_85))
    assert out.item() == pytest.approx(1.625)


def test_reinforce_matches_spec_8_6():
    r = t([[0.5, 0.7, 0.9, 0.1], [0.3, 0.6, 0.0, 0.0]])
    m = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    nll = t([[1.0, 2.0, 0.5, 1.5], [0.2, 0.4, 9, 9]])
    assert losses.reinforce_loss(nll, r, m).item() == pytest.approx(0.4666667, abs=1e-6)
    assert losses.reinforce_loss(nll, r, m, use_q=True).item() == pytest.approx(1.1116667, abs=1e-6)


def test_prompt_task_reinforce_plus_entropy_8_6():
    logits = t([[[2, 1, 0], [0, 0, 0]]])
    ids = torch.tensor([[0, 2]])
    mask = torch.ones(1, 2, dtype=D)
    nll = losses.token_nll(logits, ids, mask)
    torch.testing.assert_close(nll, t([[0.4076060, 1.0986123]]), atol=1e-6, rtol=0)
    loss = losses.reinforce_loss(nll, t([[0.8, 0.3]]), mask) + 0.125 * losses.neg_entropy(logits, mask)
    assert loss.item() == pytest.approx(0.2071462, abs=1e-6)
    assert losses.neg_entropy(logits[:, :1], mask[:, :1]).item() == pytest.approx(-0.8323956, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [(lambda: losses.aggregate(torch.ones(3, 4), torch.ones(3, 4), "avg", 2), "group_size"),
     (lambda: losses.aggregate(torch.ones(2, 4), torch.ones(2, 3), "avg", 2), "shape mismatch"),
     (lambda: losses.aggregate(torch.ones(2, 4), torch.ones(2, 4), "mean", 2), "method"),
     (lambda: losses.aggregate(torch.ones(2, 4), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), "avg", 2), "mask"),
     (lambda: losses.list_mle(torch.ones(2, 3), torch.ones(2, 4)), "shape mismatch"),
     (lambda: losses.list_mle(torch.ones(2, 1), torch.ones(2, 1)), "K"),
     (lambda: losses.list_mle(torch.ones(1, 2), torch.tensor([[0.0, math.nan]])), "preferences"),
     (lambda: losses.weighted_mle(torch.ones(1, 3), torch.ones(1, 3), torch.zeros(1, 3)), "mask"),
     (lambda: losses.reinforce_loss(torch.ones(1, 3), torch.ones(1, 3), torch.zeros(1, 3)), "mask"),
     (lambda: losses.neg_entropy(torch.ones(1, 3, 4), torch.ones(1, 2)), "shape mismatch")],
)
def test_bad_arguments_raise_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
