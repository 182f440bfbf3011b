"""The opt-in fast path equals the autograd reference path: loss, gradient, metrics, ratio."""

import pytest
import torch

from cfpo_loss import AGG_MODES, compute_policy_loss


def batch(b=6, t=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(b, t, generator=g) * 3).to(dtype).requires_grad_()
    olp = (lp.detach().float() + 0.5 * torch.randn(b, t, generator=g)).to(dtype)
    olp[0, 1] = lp[0, 1].item() + 30.0  # beyond the ±20 log-ratio clamp: no gradient there
    adv = torch.randn(b, generator=g).to(dtype)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 1] = True
    mask[3] = False
    return lp, olp, adv, mask


def compare(fast, **kw):
    lp, olp, adv, mask = batch()
    garbage = torch.tensor(float("nan"))
    olp_dirty = torch.where(mask, olp, garbage)
    ref = compute_policy_loss(lp, olp, adv, mask, **kw)
    out = compute_policy_loss(lp, olp_dirty, adv, mask, fast=fast, **kw)
    g_ref = torch.autograd.grad(ref.loss, lp)[0]
    g_out = torch.autograd.grad(out.loss, lp)[0]
    assert out.loss.dtype == ref.loss.dtype
    assert torch.allclose(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    # fp32: the two paths round differently; differences stay below 1e-6 of the largest gradient
    assert torch.allclose(g_out, g_ref, rtol=1e-5, atol=1e-6 * g_ref.abs().max().item())
    assert g_out[0, 1].item() == 0.0
    assert out.metrics.keys() == ref.metrics.keys()
    for k in ref.metrics:
        assert torch.allclose(out.metrics[k], ref.metrics[k], rtol=1e-6, atol=1e-7), k
    assert torch.allclose(out.ratio, ref.ratio, rtol=1e-6)


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_fast_eager_equals_reference(objective, agg, ratio_level):
    compare("eager", objective=objective, agg=agg, ratio_level=ratio_level, eps_low=0.2, eps_high=0.28)


def test_fast_eager_with_dual_clip_weights_and_global_counts():
    lp, olp, adv, mask = batch()
    w = torch.rand(mask.shape)
    compare("eager", objective="clip", dual_clip=3.0, weights=w, dp_size=2, batch_num_tokens=50)
    compare("eager", objective="cfpo", weights=w, dp_size=2, global_batch_size=9, agg="seq-mean-token-mean")


def test_fast_eager_bf16_matches_reference():
    lp, olp, adv, mask = batch(dtype=torch.bfloat16)
    ref = compute_policy_loss(lp, olp, adv, mask)
    out = compute_policy_loss(lp, olp, adv, mask, fast="eager")
    g_ref, g_out = (torch.autograd.grad(o.loss, lp)[0] for o in (ref, out))
    assert out.loss.dtype == torch.float32 and g_out.dtype == torch.bfloat16
    assert torch.allclose(out.loss, ref.loss, rtol=1e-6)
    assert torch.equal(g_out, g_ref)  # both fp32 inside, rounded once to bf16


def test_fast_path_checks_inputs_like_the_reference():
    lp, olp, adv, mask = batch()
    with pytest.raises(ValueError, match="old_log_prob holds"):
        compute_policy_loss(lp, olp.fill_(float("nan")), adv, mask, fast="eager")
    with pytest.raises(ValueError, match="unknown fast"):
        compute_policy_loss(lp, lp.detach(), adv, mask, fast="yes")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["cfpo", "clip"])
def test_compiled_fast_path_equals_reference(objective):
    compare(True, objective=objective, eps_low=0.2, eps_high=0.28)
