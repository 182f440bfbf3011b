"""cfpo_loss.reference, the one-screen autograd oracle: itself against numbers worked out by hand from the paper's
equations, then every fast path (eager, compiled, fused) against it, value and gradient, with NaN padding."""

from __future__ import annotations

import math

import pytest
import torch

from cfpo_loss import AGG_MODES, compute_policy_loss, fused_linear_policy_loss, reference


def test_reference_objectives_by_hand():
    r = torch.tensor([1.5, 0.5, 1.1, 0.7], dtype=torch.float64)
    a = torch.tensor([2.0, -1.0, -3.0, 0.5], dtype=torch.float64)
    # J_CFPO = r·A − |A|/(2ε)·(r−1)², ε = 0.28 for A > 0, 0.2 for A < 0
    by_hand = [1.5 * 2 - 2 / 0.56 * 0.25, -0.5 - 1 / 0.4 * 0.25, -3.3 - 3 / 0.4 * 0.01, 0.35 - 0.5 / 0.56 * 0.09]
    torch.testing.assert_close(reference.cfpo_objective(r, a, 0.2, 0.28), torch.tensor(by_hand, dtype=torch.float64))
    # J_clip = min(r·A, clip(r, 0.8, 1.28)·A); dual-clip 3: max(·, 3·A) where A < 0
    by_hand = [min(3.0, 1.28 * 2), max(min(-0.5, -0.8), -3.0), max(min(-3.3, -3.3), -9.0), min(0.35, 0.8 * 0.5)]
    torch.testing.assert_close(
        reference.clip_objective(r, a, 0.2, 0.28, dual_clip=3.0), torch.tensor(by_hand, dtype=torch.float64)
    )
    # the maximiser of J_CFPO is r* = 1 + sign(A)·ε
    for adv, eps in ((1.0, 0.28), (-1.0, 0.2)):  # eps_high where A > 0, eps_low where A < 0
        rr = torch.tensor([1.0 + adv * eps], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(
            reference.cfpo_objective(rr, torch.tensor([adv], dtype=torch.float64), 0.2, 0.28), rr
        )
        assert abs(g.item()) < 1e-12, (adv, g)


def test_reference_aggregation_and_sequence_ratio_by_hand():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    per_token = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 0.0]])
    assert reference.aggregate(per_token, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert reference.aggregate(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert reference.aggregate(per_token, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 2 / 3)
    lp = torch.tensor([[0.1, -0.3, float("nan")], [0.2, 0.0, 0.0]])
    r = reference.ratio(lp, torch.zeros(2, 3), mask, "sequence")
    torch.testing.assert_close(r, torch.tensor([[math.exp(-0.1), math.exp(-0.1), 1.0], [math.exp(0.2), 1.0, 1.0]]))


def _batch(seed=0, b=5, t=7):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(b, t, generator=g) * 0.3 - 1).double()
    old = lp + torch.randn(b, t, generator=g).double() * 0.4
    adv = torch.randn(b, generator=g).double()
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0] = False  # an empty row
    mask[1, 0] = True
    old = old.masked_fill(~mask, float("nan"))  # padding holds garbage
    return lp, old, adv, mask


@pytest.mark.parametrize("objective, dual_clip", [("cfpo", None), ("clip", None), ("clip", 3.0)])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize(
    "agg, path",
    [(agg, "eager") for agg in AGG_MODES] + [("token-mean", "compiled"), ("seq-mean-token-mean", "compiled")],
)  # compiling is slow
def test_compute_policy_loss_equals_the_reference(objective, dual_clip, ratio_level, agg, path):
    lp, old, adv, mask = _batch()
    kw = dict(objective=objective, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, agg=agg, ratio_level=ratio_level)
    x = lp.clone().requires_grad_()
    want = reference.policy_loss(x, old, adv, mask, **kw)
    (want_grad,) = torch.autograd.grad(want, x)
    y = lp.clone().requires_grad_()
    got = compute_policy_loss(y, old, adv, mask, compile=path == "compiled", **kw).loss
    (got_grad,) = torch.autograd.grad(got, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_fused_path_equals_the_reference(objective, ratio_level):
    g = torch.Generator().manual_seed(3)
    b, t, h, v = 4, 6, 8, 29
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, v, (b, t), generator=g)
    _, old, adv, mask = _batch(seed=4, b=b, t=t)
    kw = dict(objective=objective, eps_low=0.2, eps_high=0.28, ratio_level=ratio_level, agg="seq-mean-token-mean")
    log_prob = (hidden @ weight.T).log_softmax(-1).gather(-1, target[..., None])[..., 0]
    want = reference.policy_loss(log_prob, old, adv, mask, **kw)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = fused_linear_policy_loss(
        hidden, weight, target.masked_fill(~mask, -100), old, adv, mask, chunk_size=3, **kw
    ).loss
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
