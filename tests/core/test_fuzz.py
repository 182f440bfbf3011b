"""Hypothesis fuzzing: any shape, mask and values (garbage allowed at masked positions) gives a
finite loss and finite gradients, and masked garbage never changes the result."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cfpo_loss import AGG_MODES, compute_policy_loss

GARBAGE = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30, -1e30])


@st.composite
def batches(draw):
    b = draw(st.integers(1, 6))
    t = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 0.3, 3.0, 50.0]))  # 50: log-ratios beyond the ±20 clamp
    lp = -torch.rand(b, t, generator=g) * 5
    olp = lp + scale * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    mask = torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0))
    junk = draw(GARBAGE)
    return lp, olp, adv, mask, junk


@settings(max_examples=150, deadline=None)
@given(
    batches(),
    st.sampled_from(["cfpo", "clip"]),
    st.sampled_from(AGG_MODES),
    st.sampled_from(["token", "sequence"]),
    st.floats(0.01, 0.99),
    st.floats(0.01, 5.0),
)
def test_finite_loss_and_gradients(batch, objective, agg, ratio_level, eps_low, eps_high):
    lp, olp, adv, mask, junk = batch
    leaf = lp.clone().requires_grad_()
    dirty = [torch.where(mask, x, torch.full_like(x, junk)) for x in (leaf, olp, adv)]
    out = compute_policy_loss(
        *dirty, mask, objective=objective, agg=agg, ratio_level=ratio_level, eps_low=eps_low, eps_high=eps_high
    )
    (g,) = torch.autograd.grad(out.loss, leaf)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(g).all()
    assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))
    assert all(torch.isfinite(v) for v in out.metrics.values())
    clean = compute_policy_loss(
        leaf, olp, adv, mask, objective=objective, agg=agg, ratio_level=ratio_level, eps_low=eps_low, eps_high=eps_high
    )
    assert torch.equal(out.loss, clean.loss)
