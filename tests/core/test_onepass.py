"""compute_policy_loss's one-pass evaluation (analytic derivative, metrics from shared terms) equals plain
autograd through the public per-token surrogates, and the compiled fast path equals both."""

import math

import pytest
import torch

from cfpo_loss import AGG_MODES, aggregate_loss, cfpo_surrogate, clipped_surrogate, compute_policy_loss


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


def autograd_reference(
    lp,
    olp,
    adv,
    mask,
    *,
    objective="cfpo",
    agg="token-mean",
    ratio_level="token",
    eps_low=0.2,
    eps_high=None,
    dual_clip=None,
    weights=None,
    **info,
):
    """The loss written with plain torch ops and the public surrogates; autograd differentiates it."""
    lp32, olp32, a = lp.float(), olp.float(), adv.float()[:, None].expand(mask.shape)
    log_ratio = torch.where(mask, lp32 - olp32, 0.0).clamp(-20, 20)
    if ratio_level == "sequence":
        seq = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        ratio = seq.exp().expand(mask.shape)
    else:
        ratio = log_ratio.exp()
    a = torch.where(mask, a, 0.0)
    if objective == "cfpo":
        j = cfpo_surrogate(ratio, a, eps_low, eps_high)
    else:
        j = clipped_surrogate(ratio, a, eps_low, eps_high, dual_clip)
    per_token = -j if weights is None else -j * torch.where(mask, weights, 0.0)
    return aggregate_loss(per_token, mask, agg, **info)


def compare(fast=False, **kw):
    lp, olp, adv, mask = batch()
    olp_dirty = torch.where(mask, olp, torch.tensor(float("nan")))  # garbage at masked positions
    ref = autograd_reference(lp, olp, adv, mask, **kw)
    out = compute_policy_loss(lp, olp_dirty, adv, mask, compile=fast, **kw)
    g_ref = torch.autograd.grad(ref, lp)[0]
    g_out = torch.autograd.grad(out.loss, lp)[0]
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss, ref, rtol=1e-6, atol=1e-7)
    # fp32: the two evaluations round differently; differences stay below 1e-6 of the largest gradient
    assert torch.allclose(g_out, g_ref, rtol=1e-5, atol=1e-6 * g_ref.abs().max().item())
    assert g_out[0, 1].item() == 0.0 and torch.equal(g_out[~mask], torch.zeros_like(g_out[~mask]))
    return out


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_one_pass_equals_autograd(objective, agg, ratio_level):
    compare(objective=objective, agg=agg, ratio_level=ratio_level, eps_low=0.2, eps_high=0.28)


def test_one_pass_with_dual_clip_weights_and_global_counts():
    w = torch.rand(6, 11)
    compare(objective="clip", dual_clip=3.0, weights=w, dp_size=2, batch_num_tokens=50)
    compare(objective="cfpo", weights=w, dp_size=2, global_batch_size=9, agg="seq-mean-token-mean")
    compare(objective="cfpo", weights=w, ratio_level="sequence", agg="seq-mean-token-sum")


def test_per_token_loss_backpropagates_for_callers_that_aggregate_themselves():
    # OpenRLHF / fused callers aggregate per_token_loss themselves: its gradient must be right alone too
    lp, olp, adv, mask = batch()
    coef = torch.rand(6, 11)
    for level in ("token", "sequence"):
        out = compute_policy_loss(lp, olp, adv, mask, ratio_level=level)
        ref_tok = torch.where(
            mask,
            -cfpo_surrogate(
                torch.exp(torch.where(mask, lp - olp, 0.0).clamp(-20, 20))
                if level == "token"
                else (
                    torch.where(mask, lp - olp, 0.0).clamp(-20, 20).sum(-1, keepdim=True)
                    / mask.sum(-1, keepdim=True).clamp(min=1)
                )
                .exp()
                .expand(6, 11),
                torch.where(mask, adv[:, None], 0.0),
            ),
            0.0,
        )
        g = torch.autograd.grad((out.per_token_loss * coef).sum(), lp)[0]
        g_ref = torch.autograd.grad((ref_tok * coef).sum(), lp)[0]
        assert torch.allclose(out.per_token_loss, ref_tok.detach(), atol=1e-6)
        assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_bf16_inputs():
    lp, olp, adv, mask = batch(dtype=torch.bfloat16)
    ref = autograd_reference(lp, olp, adv, mask)
    out = compute_policy_loss(lp, olp, adv, mask)
    g_ref, g_out = (torch.autograd.grad(x, lp)[0] for x in (ref, out.loss))
    assert out.loss.dtype == torch.float32 and g_out.dtype == torch.bfloat16
    assert torch.allclose(out.loss, ref, rtol=1e-6)
    assert torch.allclose(g_out.float(), g_ref.float(), rtol=1e-2, atol=1e-6)  # one bf16 rounding apart at most


def test_compile_flag_is_validated_and_fast_is_its_deprecated_alias():
    lp, olp, adv, mask = batch()
    with pytest.raises(ValueError, match="unknown compile"):
        compute_policy_loss(lp, olp, adv, mask, compile="yes")
    with pytest.warns(DeprecationWarning, match="fast=.*deprecated.*compile="):
        old_name = compute_policy_loss(lp, olp, adv, mask, fast=True)
    new_name = compute_policy_loss(lp, olp, adv, mask, compile=True)
    assert old_name.per_token_loss is None is new_name.per_token_loss  # fast=True took the compiled path
    torch.testing.assert_close(old_name.loss, new_name.loss)
    with pytest.raises(ValueError, match="not both"):
        compute_policy_loss(lp, olp, adv, mask, compile=True, fast=False)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["cfpo", "clip"])
def test_compiled_fast_path_equals_default(objective):
    kw = dict(objective=objective, eps_low=0.2, eps_high=0.28)
    out = compare(fast=True, **kw)
    lp, olp, adv, mask = batch()
    default = compute_policy_loss(lp, olp, adv, mask, **kw)
    assert out.metrics.keys() == default.metrics.keys()
    for k in default.metrics:
        assert torch.allclose(out.metrics[k], default.metrics[k], rtol=1e-6, atol=1e-7), k
    assert torch.allclose(out.ratio, default.ratio, rtol=1e-6)
    with pytest.raises(ValueError, match="old_log_prob holds"):
        compute_policy_loss(lp, olp.clone().fill_(float("nan")), adv, mask, compile=True, **kw)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("objective", ["cfpo", "clip"])
def test_gradient_scales_with_the_upstream_gradient(objective, ratio_level):
    """d(c·loss)/dlog π = c·dloss/dlog π for c != 1 (a loss scaler, gradient accumulation's 1/k, a weighted sum of
    losses), on the compiled path, whose backward multiplies a precomputed gradient by the incoming one, and the
    eager one; against autograd through the public surrogates."""
    lp, olp, adv, mask = batch()
    kw = dict(objective=objective, ratio_level=ratio_level, eps_low=0.2, eps_high=0.28)
    (g_ref,) = torch.autograd.grad(autograd_reference(lp, olp, adv, mask, **kw), lp)
    for fast in (True, False):
        for c in (3.0, -0.5):
            (g,) = torch.autograd.grad(c * compute_policy_loss(lp, olp, adv, mask, compile=fast, **kw).loss, lp)
            assert torch.allclose(g, c * g_ref, rtol=1e-5, atol=1e-6 * abs(c) * g_ref.abs().max().item()), (fast, c)
        leaf = lp.detach().clone().requires_grad_()
        compute_policy_loss(leaf, olp, adv, mask, compile=fast, **kw).loss.backward(torch.tensor(0.25))
        assert torch.allclose(leaf.grad, 0.25 * g_ref, rtol=1e-5, atol=1e-6 * g_ref.abs().max().item()), fast


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("objective", ["cfpo", "clip"])
def test_sequence_ratio_with_per_token_advantages_weights_and_a_one_token_row(objective, fast):
    """At sequence level every token of a row shares one ratio, so with per-row advantages and no weights each
    token's dL/dr is the same and a per-token gradient would pass unnoticed; per-token advantages and weights
    make them differ. A row with one valid token has the ratio exp(log r) of that token. Against autograd through
    the public surrogates; the returned ratio is detached."""
    lp, olp, _, mask = batch()
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(6, 11, generator=g)
    weights = torch.rand(6, 11, generator=g) + 0.5
    mask[4] = False
    mask[4, 3] = True  # one valid token
    kw = dict(objective=objective, ratio_level="sequence", eps_low=0.2, eps_high=0.28, dual_clip=None)
    log_ratio = torch.where(mask, lp - olp, 0.0).clamp(-20, 20)
    ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).exp().expand(6, 11)
    a = torch.where(mask, adv, 0.0)
    j = cfpo_surrogate(ratio, a, 0.2, 0.28) if objective == "cfpo" else clipped_surrogate(ratio, a, 0.2, 0.28)
    ref = aggregate_loss(-j * torch.where(mask, weights, 0.0), mask, "seq-mean-token-mean")
    (g_ref,) = torch.autograd.grad(ref, lp)
    out = compute_policy_loss(lp, olp, adv, mask, weights=weights, agg="seq-mean-token-mean", compile=fast, **kw)
    (g_out,) = torch.autograd.grad(out.loss, lp)
    assert torch.allclose(out.loss, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(g_out, g_ref, rtol=1e-5, atol=1e-6 * g_ref.abs().max().item())
    assert out.ratio[4, 3].item() == pytest.approx(math.exp(log_ratio[4, 3].item()), rel=1e-6)
    assert not out.ratio.requires_grad


def test_gpu_select_equals_cpu_bit_select():
    """On CUDA (and under compile) Select is plain torch.where; on CPU integer bit operations. Both must put
    exactly the same bits everywhere, NaN / inf at masked positions included."""
    from cfpo_loss.onepass import Select

    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5, 7, dtype=dtype)
        x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -float("inf")
        mask = torch.rand(5, 7) > 0.5
        mask[0, 0] = mask[1, 1] = mask[2, 2] = False
        bit = Select(mask, dtype)
        where = Select(mask, dtype)
        where.bitwise = False
        assert bit.bitwise
        for a, b in (
            (bit.zero(x), where.zero(x)),
            (bit.fill(x, 1.0), where.fill(x, 1.0)),
            (bit.fill(x, -torch.inf), where.fill(x, -torch.inf)),
        ):
            assert torch.equal(a, b)
            assert torch.equal(a[mask], x[mask])
