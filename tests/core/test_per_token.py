"""compute_policy_loss's one-pass evaluation (analytic derivative, metrics from shared terms) equals plain
autograd through the public per-token surrogates, and the compiled fast path equals both."""

import math

import pytest
import torch
from core_helpers import make_batch

from cfpo_loss import AGG_MODES, aggregate_loss, compute_policy_loss, reference

pytestmark = pytest.mark.rounding


def batch(dtype=torch.float32):
    """make_batch's (6, 11) batch, plus what these tests need: a valid token beyond the ±20 log-ratio clamp (no
    gradient there), and an empty row (no valid first token forced)."""
    lp, olp, adv, mask = make_batch(b=6, t=11, seed=0, spread=0.5, dtype=dtype, first_token_valid=False)
    olp[0, 1] = lp[0, 1].item() + 30.0  # beyond the ±20 log-ratio clamp: no gradient there
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
    """The loss in float64 from cfpo_loss.reference (the objective written apart from the library), aggregated by
    aggregate_loss (held to hand-written loops in test_loss.py) for the global-batch arguments; autograd
    differentiates it."""
    r = reference.ratio(lp.double(), olp.double(), mask, ratio_level)
    a = torch.where(mask, adv.double().reshape(mask.shape[0], -1).expand(mask.shape), 0.0)
    if objective == "cfpo":
        j = reference.cfpo_objective(r, a, eps_low, eps_high)
    else:
        j = reference.clip_objective(r, a, eps_low, eps_high, dual_clip)
    per_token = -j if weights is None else -j * torch.where(mask, weights.double(), 0.0)
    return aggregate_loss(per_token, mask, agg, **info)


def fp32_bound(lp, olp, adv, mask, *, agg="token-mean", dual_clip=None, weights=None, **kw):
    """The rounding bound of an fp32 evaluation against autograd_reference (reference.policy_loss_bound), each
    token weighted as aggregate_loss weighs it with the global-batch arguments in ``kw``."""
    info = {k: kw.pop(k) for k in ("dp_size", "batch_num_tokens", "global_batch_size") if k in kw}
    probe = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
    (coef,) = torch.autograd.grad(aggregate_loss(probe, mask, agg, **info), probe)
    return reference.policy_loss_bound(lp, olp, adv, mask, coef=coef, weights=weights, **kw)


def compare(fast=False, **kw):
    lp, olp, adv, mask = batch()
    olp_dirty = torch.where(mask, olp, torch.tensor(float("nan")))  # garbage at masked positions
    ref = autograd_reference(lp, olp, adv, mask, **kw)
    out = compute_policy_loss(lp, olp_dirty, adv, mask, compile=fast, **kw)
    g_ref = torch.autograd.grad(ref, lp)[0]
    g_out = torch.autograd.grad(out.loss, lp)[0]
    assert out.loss.dtype == torch.float32
    bound = fp32_bound(lp, olp, adv, mask, **kw)  # fp32 against float64: the derived rounding bound
    reference.assert_within(out.loss, ref, bound.loss, "loss")
    reference.assert_within(g_out, g_ref, bound.grad, "dloss/dlog pi")
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
        r = reference.ratio(lp.double(), olp.double(), mask, level)
        ref_tok = torch.where(mask, -reference.cfpo_objective(r, torch.where(mask, adv.double()[:, None], 0.0)), 0.0)
        g = torch.autograd.grad((out.per_token_loss * coef).sum(), lp)[0]
        g_ref = torch.autograd.grad((ref_tok * coef).sum(), lp)[0]
        bound = reference.policy_loss_bound(lp, olp, adv, mask, ratio_level=level, coef=coef)  # fp32 vs float64
        reference.assert_within(out.per_token_loss, ref_tok, bound.objective, f"{level} per-token loss")
        reference.assert_within(g, g_ref, bound.grad, f"{level} dloss/dlog pi")


def test_bf16_inputs():
    lp, olp, adv, mask = batch(dtype=torch.bfloat16)
    ref = autograd_reference(lp, olp, adv, mask)
    out = compute_policy_loss(lp, olp, adv, mask)
    g_ref, g_out = (torch.autograd.grad(x, lp)[0] for x in (ref, out.loss))
    assert out.loss.dtype == torch.float32 and g_out.dtype == torch.bfloat16
    # computed in fp32 from bf16 inputs (exact in fp32): fp32's bound; the gradient is then stored in bf16, one
    # more rounding of at most u_bf16 = 2^-8 relative
    bound = reference.policy_loss_bound(lp, olp, adv, mask)
    reference.assert_within(out.loss, ref, bound.loss, "loss")
    u_bf16 = reference.UNIT_ROUNDOFF[torch.bfloat16]
    reference.assert_within(g_out, g_ref, bound.grad + reference.SAFETY * u_bf16 * g_ref.abs(), "bf16 dloss/dlog pi")


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
    # two fp32 evaluations of each metric: within twice the rounding bound of either
    bounds = reference.policy_metric_bounds(lp, olp, adv, mask, eps_low=0.2, eps_high=0.28)
    bounds["dual_clip_frac"] = 0.0  # no dual clip: exactly 0 on both paths
    for k in default.metrics:
        reference.assert_within(out.metrics[k], default.metrics[k], 2 * bounds[k], k)
    ratio_bound = reference.policy_loss_bound(lp, olp, adv, mask, **kw).ratio
    reference.assert_within(out.ratio.masked_fill(~mask, 1), default.ratio.masked_fill(~mask, 1), 2 * ratio_bound, "r")
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
    bound = fp32_bound(lp, olp, adv, mask, **kw).grad  # fp32 vs float64; scaling by c adds one rounding (in SAFETY)
    for fast in (True, False):
        for c in (3.0, -0.5):
            (g,) = torch.autograd.grad(c * compute_policy_loss(lp, olp, adv, mask, compile=fast, **kw).loss, lp)
            reference.assert_within(g, c * g_ref, abs(c) * bound, f"fast={fast} c={c}")
        leaf = lp.detach().clone().requires_grad_()
        compute_policy_loss(leaf, olp, adv, mask, compile=fast, **kw).loss.backward(torch.tensor(0.25))
        reference.assert_within(leaf.grad, 0.25 * g_ref, 0.25 * bound, f"fast={fast} backward(0.25)")


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
    ref = autograd_reference(lp, olp, adv, mask, weights=weights, agg="seq-mean-token-mean", **kw)
    (g_ref,) = torch.autograd.grad(ref, lp)
    out = compute_policy_loss(lp, olp, adv, mask, weights=weights, agg="seq-mean-token-mean", compile=fast, **kw)
    (g_out,) = torch.autograd.grad(out.loss, lp)
    kw.pop("dual_clip")
    bound = reference.policy_loss_bound(lp, olp, adv, mask, weights=weights, agg="seq-mean-token-mean", **kw)
    reference.assert_within(out.loss, ref, bound.loss, "loss")
    reference.assert_within(g_out, g_ref, bound.grad, "dloss/dlog pi")
    # one valid token: the row's ratio is that token's, exp of one fp32 subtraction (bound: exp's and the store's)
    reference.assert_within(out.ratio[4, 3], math.exp(log_ratio[4, 3].item()), bound.ratio[4, 3], "one-token r")
    assert not out.ratio.requires_grad


def test_gpu_select_equals_cpu_bit_select():
    """On CUDA (and under compile) Select is plain torch.where; on CPU integer bit operations. Both must put
    exactly the same bits everywhere, NaN / inf at masked positions included."""
    from cfpo_loss._per_token import Select

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
