"""compute_policy_loss end to end: values, gradients, aggregation, metrics, precision, masking.

Expected values are written out here from the equations (per-token J, then the reduction written as
plain Python loops), never taken from the library.
"""

import math

import pytest
import torch
from core_helpers import make_batch

from cfpo_loss import AGG_MODES, aggregate_loss, compute_policy_loss
from cfpo_loss.reference import SAFETY, UNIT_ROUNDOFF

#: float64 inputs: the metrics' arithmetic is float64 (sums of <= 54 terms of magnitude <= e^2: < 1e-13 absolute),
#: then each metric is stored as fp32, one rounding of u_fp32 relative; x SAFETY (cfpo_loss.reference)
FP32_STORE = SAFETY * UNIT_ROUNDOFF[torch.float32]
FP64_SUMS = SAFETY * 55 * UNIT_ROUNDOFF[torch.float64] * math.exp(2.0)


def paper_token_objective(r, a, objective, eps_low, eps_high, c=None):
    if objective == "cfpo":
        eps = eps_high if a > 0 else eps_low
        return r * a - abs(a) / (2 * eps) * (r - 1) ** 2
    j = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    return max(j, c * a) if (c is not None and a < 0) else j


def reference_loss(
    log_prob,
    old_log_prob,
    adv,
    mask,
    objective,
    agg,
    eps_low=0.2,
    eps_high=0.2,
    c=None,
    ratio_level="token",
    weights=None,
):
    """Loop-by-loop reference of −aggregate(J) with verl's agg_loss definitions."""
    b, t = mask.shape
    lp, olp = log_prob.tolist(), old_log_prob.tolist()
    rows = []
    for i in range(b):
        valid = [j for j in range(t) if mask[i, j]]
        a = float(adv[i])
        if ratio_level == "sequence":
            s = math.exp(sum(lp[i][j] - olp[i][j] for j in valid) / max(len(valid), 1))
        row = []
        for j in valid:
            r = s if ratio_level == "sequence" else math.exp(max(-20, min(20, lp[i][j] - olp[i][j])))
            w = 1.0 if weights is None else float(weights[i, j])
            row.append(-paper_token_objective(r, a, objective, eps_low, eps_high, c) * w)
        rows.append(row)
    n_tok = sum(len(r) for r in rows)
    n_seq = sum(1 for r in rows if r)
    if agg == "token-mean":
        return sum(map(sum, rows)) / n_tok
    if agg == "token-sum":
        return sum(map(sum, rows))
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / n_seq
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows if r) / n_seq
    if agg == "seq-mean-token-sum-norm":
        return sum(sum(r) for r in rows) / n_seq / t
    raise AssertionError(agg)


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_loss_matches_reference(objective, agg, ratio_level):
    lp, olp, adv, mask = make_batch()
    out = compute_policy_loss(
        lp, olp, adv, mask, objective=objective, agg=agg, eps_low=0.2, eps_high=0.28, ratio_level=ratio_level
    )
    ref = reference_loss(lp, olp, adv, mask, objective, agg, 0.2, 0.28, ratio_level=ratio_level)
    assert out.loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_dual_clip_and_weights_match_reference():
    lp, olp, adv, mask = make_batch(spread=2.0)
    w = torch.rand(mask.shape, dtype=torch.float64) * 2
    out = compute_policy_loss(lp, olp, adv, mask, objective="clip", dual_clip=3.0, weights=w)
    ref = reference_loss(lp, olp, adv, mask, "clip", "token-mean", c=3.0, weights=w)
    assert out.loss.item() == pytest.approx(ref, rel=1e-10)


def test_cfpo_gradient_matches_analytic_formula():
    # dL/d logp_t = −(1/N)·r_t·(A − |A|/ε·(r_t − 1)) for token-mean, with dr/dlogp = r.
    lp, olp, adv, mask = make_batch(spread=0.6)
    out = compute_policy_loss(lp, olp, adv, mask, objective="cfpo", eps_low=0.2, eps_high=0.3)
    (grad,) = torch.autograd.grad(out.loss, lp)
    r = torch.exp(lp.detach() - olp)
    a = adv[:, None].expand_as(r)
    eps = torch.where(a > 0, 0.3, 0.2)
    expected = -r * (a - a.abs() / eps * (r - 1)) / mask.sum()
    expected = torch.where(mask, expected, 0.0)
    assert torch.allclose(grad, expected, atol=1e-12)


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_gradcheck_float64(objective, ratio_level):
    lp, olp, adv, mask = make_batch(b=3, t=4, spread=0.1)
    # keep ratios away from clip kinks where a finite difference is not a derivative
    f = lambda x: (
        compute_policy_loss(
            x, olp, adv, mask, objective=objective, ratio_level=ratio_level, agg="seq-mean-token-mean"
        ).loss
    )
    assert torch.autograd.gradcheck(f, (lp,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_on_policy_cfpo_equals_clip(agg, ratio_level):
    lp, _, adv, mask = make_batch()
    old = lp.detach().clone()  # r = 1 exactly: on-policy
    losses, grads = [], []
    for objective in ("cfpo", "clip"):
        out = compute_policy_loss(lp, old, adv, mask, objective=objective, agg=agg, ratio_level=ratio_level)
        losses.append(out.loss)
        grads.append(torch.autograd.grad(out.loss, lp)[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-14)
    assert torch.allclose(grads[0], grads[1], atol=1e-14)
    # and both are plain advantage maximisation: loss = −aggregate(A)
    ref = reference_loss(lp, old, adv, mask, "clip", agg, ratio_level=ratio_level)
    assert losses[0].item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("a,r", [(1.0, 1.6), (2.0, 1.3), (-1.0, 0.5), (-0.5, 0.7)])
def test_outside_the_trust_region_clip_is_blind_and_cfpo_pulls_back(a, r):
    lp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    old = torch.full((1, 1), -math.log(r), dtype=torch.float64)
    adv = torch.tensor([a], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    g_clip = torch.autograd.grad(compute_policy_loss(lp, old, adv, mask, objective="clip").loss, lp)[0].item()
    out = compute_policy_loss(lp, old, adv, mask, objective="cfpo")
    g_cfpo = torch.autograd.grad(out.loss, lp)[0].item()
    assert g_clip == 0.0
    assert g_cfpo != 0.0
    # gradient descent on the loss moves log π by −g: it must move r back towards 1 ± ε
    assert (-g_cfpo < 0) == (r > 1)
    assert out.metrics["tr_exit_frac"].item() == 1.0


def test_metrics_match_hand_computation():
    lp, olp, adv, mask = make_batch(b=6, t=9, spread=0.5)
    out = compute_policy_loss(lp, olp, adv, mask, objective="cfpo", eps_low=0.2, eps_high=0.28)
    r = torch.exp(lp.detach() - olp)[mask]
    a = adv[:, None].expand(mask.shape)[mask]
    high = ((a > 0) & (r > 1.28)).double().mean()
    low = ((a < 0) & (r < 0.8)).double().mean()
    eps = torch.where(a > 0, 0.28, 0.2)
    expected = {
        "ratio_mean": r.mean(),
        "ratio_min": r.min(),
        "ratio_max": r.max(),
        "ratio_dev": (r - 1).abs().mean(),
        "tr_exit_high": high,
        "tr_exit_low": low,
        "tr_exit_frac": high + low,
        "approx_kl_k1": (-(r.log())).mean(),
        "approx_kl_k3": (r - 1 - r.log()).mean(),
        "penalty": (a.abs() / (2 * eps) * (r - 1) ** 2).mean(),
    }
    assert set(expected) <= set(out.metrics)
    for k, v in expected.items():
        assert out.metrics[k].item() == pytest.approx(v.item(), rel=FP32_STORE, abs=FP64_SUMS), k
        assert not out.metrics[k].requires_grad
    assert "penalty" not in compute_policy_loss(lp, olp, adv, mask, objective="clip").metrics


def test_dual_clip_fraction_counts_negative_advantages_beyond_c():
    lp = torch.zeros(1, 4, requires_grad=True)
    old = -torch.log(torch.tensor([[4.0, 2.0, 5.0, 4.0]]))
    adv = torch.tensor([[-1.0, -1.0, -1.0, 1.0]])
    out = compute_policy_loss(lp, old, adv, torch.ones(1, 4, dtype=torch.bool), objective="clip", dual_clip=3.0)
    assert out.metrics["dual_clip_frac"].item() == pytest.approx(0.5)


def test_masked_positions_may_hold_nan_and_inf():
    lp, olp, adv, mask = make_batch()
    clean = compute_policy_loss(lp, olp, adv, mask)
    g_clean = torch.autograd.grad(clean.loss, lp)[0]
    dirty_lp = torch.where(mask, lp, torch.tensor(float("nan"), dtype=lp.dtype))
    dirty_old = torch.where(mask, olp, torch.tensor(float("-inf"), dtype=lp.dtype))
    dirty_adv = adv[:, None].expand(mask.shape).clone()
    dirty_adv[~mask] = float("inf")
    out = compute_policy_loss(dirty_lp, dirty_old, dirty_adv, mask)
    g = torch.autograd.grad(out.loss, lp)[0]
    assert out.loss.item() == clean.loss.item()
    assert torch.equal(g, g_clean)
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("objective", ["cfpo", "clip"])
def test_all_masked_is_a_finite_zero_with_zero_gradient(agg, objective):
    lp = torch.full((3, 4), float("nan"), requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = compute_policy_loss(lp, torch.zeros(3, 4), torch.ones(3), mask, objective=objective, agg=agg)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert out.loss.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("agg", AGG_MODES)
def test_fully_masked_rows_are_ignored(agg):
    lp, olp, adv, mask = make_batch()
    mask[2] = False
    out = compute_policy_loss(lp, olp, adv, mask, agg=agg)
    keep = [0, 1, 3, 4]
    ref = compute_policy_loss(lp[keep], olp[keep], adv[keep], mask[keep], agg=agg)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    assert torch.equal(torch.autograd.grad(out.loss, lp)[0][2], torch.zeros(lp.shape[1], dtype=lp.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_fp32(dtype):
    lp, olp, adv, mask = make_batch(dtype=torch.float32)
    lp_lo = lp.detach().to(dtype).requires_grad_()
    out = compute_policy_loss(lp_lo, olp.to(dtype), adv.to(dtype), mask)
    ref = compute_policy_loss(lp_lo.detach().float(), olp.to(dtype).float(), adv.to(dtype).float(), mask)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == ref.loss.item()  # same fp32 math on the same (rounded) inputs
    (g,) = torch.autograd.grad(out.loss, lp_lo)
    assert g.dtype == dtype and torch.isfinite(g).all()


def test_float_zero_one_mask_equals_bool_mask():
    lp, olp, adv, mask = make_batch()
    a = compute_policy_loss(lp, olp, adv, mask).loss
    b = compute_policy_loss(lp, olp, adv, mask.double()).loss
    c = compute_policy_loss(lp, olp, adv, mask.long()).loss
    assert a.item() == b.item() == c.item()


def test_global_batch_info_makes_the_loss_shard_invariant():
    # Two data-parallel shards, each scaled by dp_size and the global counts, average to the full-batch loss.
    lp, olp, adv, mask = make_batch(b=6, t=5)
    for agg in AGG_MODES:
        full = compute_policy_loss(lp, olp, adv, mask, agg=agg).loss
        info = dict(dp_size=2, batch_num_tokens=mask.sum(), global_batch_size=int(mask.any(-1).sum()))
        shards = [
            compute_policy_loss(lp[s], olp[s], adv[s], mask[s], agg=agg, **info).loss
            for s in (slice(0, 3), slice(3, 6))
        ]
        if agg == "seq-mean-token-sum-norm":
            continue  # its normaliser is the padded length, the same for both shards: checked below
        assert ((shards[0] + shards[1]) / 2).item() == pytest.approx(full.item(), rel=1e-12), agg


def test_aggregate_loss_requires_global_counts_when_sharded():
    x, m = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        aggregate_loss(x, m, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        aggregate_loss(x, m, "seq-mean-token-mean", dp_size=2)
    assert aggregate_loss(x, m, "seq-mean-token-sum-norm", loss_scale_factor=6).item() == pytest.approx(0.5)


# ---- metrics read in one device-to-host transfer ---------------------------------------------------


@pytest.mark.parametrize("dual_clip,objective", [(None, "cfpo"), (3.0, "clip"), (None, "clip")])
def test_metrics_share_one_buffer_and_read_as_floats(dual_clip, objective):
    from cfpo_loss import read_metrics

    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g)
    old = lp + 0.4 * torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    out = compute_policy_loss(lp, old, torch.randn(4, generator=g), mask, objective=objective, dual_clip=dual_clip)
    bases = {v._base.data_ptr() for v in out.metrics.values()}
    assert len(bases) == 1  # one buffer: one transfer reads all of them
    floats = out.metric_floats()
    assert floats == read_metrics(out.metrics) == {k: v.item() for k, v in out.metrics.items()}
    assert list(floats) == list(out.metrics)
    # a dict that is not one buffer (an adapter added its own entry) still reads right
    mixed = {**out.metrics, "extra": torch.tensor(2.5)}
    assert read_metrics(mixed) == {**floats, "extra": 2.5}
    assert read_metrics({}) == {}


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("objective,dual_clip", [("cfpo", None), ("clip", 1.5), ("clip", None)])
def test_every_metric_by_hand_with_padding(objective, dual_clip, ratio_level, fast):
    """Each metric from loops over valid tokens (float64, plain Python), with NaN garbage at padding and a fully
    masked row; the ratio is the one the objective uses (per sequence at sequence level, where the KL estimates
    stay per token). Held for the eager and the compiled paths."""
    lp, olp, adv, mask = make_batch(b=6, t=9, spread=0.6, seed=3)
    olp = olp + 0.4 * torch.randn(6, 1, generator=torch.Generator().manual_seed(4), dtype=olp.dtype)  # row offsets
    mask[2] = False
    olp_dirty = torch.where(mask, olp, torch.tensor(float("nan"), dtype=olp.dtype))
    eps_low, eps_high = 0.2, 0.28
    out = compute_policy_loss(
        lp,
        olp_dirty,
        adv,
        mask,
        objective=objective,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        ratio_level=ratio_level,
        compile=fast,
    )
    rows = []
    for b in range(6):
        logr = [(lp[b, t] - olp[b, t]).item() for t in range(9) if mask[b, t]]
        if not logr:
            continue
        seq_r = math.exp(sum(logr) / len(logr))
        for lr in logr:
            rows.append((math.exp(lr) if ratio_level == "token" else seq_r, lr, adv[b].item()))
    n = len(rows)
    high = sum(1 for r, _, a in rows if a > 0 and r > 1 + eps_high) / n
    low = sum(1 for r, _, a in rows if a < 0 and r < 1 - eps_low) / n
    expected = {
        "ratio_mean": sum(r for r, _, _ in rows) / n,
        "ratio_min": min(r for r, _, _ in rows),
        "ratio_max": max(r for r, _, _ in rows),
        "ratio_dev": sum(abs(r - 1) for r, _, _ in rows) / n,
        "tr_exit_high": high,
        "tr_exit_low": low,
        "tr_exit_frac": high + low,
        "approx_kl_k1": sum(-lr for _, lr, _ in rows) / n,
        "approx_kl_k3": sum(math.exp(lr) - 1 - lr for _, lr, _ in rows) / n,
    }
    if objective == "cfpo":
        expected["penalty"] = (
            sum(abs(a) / (2 * (eps_high if a > 0 else eps_low)) * (r - 1) ** 2 for r, _, a in rows) / n
        )
    if dual_clip is not None:
        expected["dual_clip_frac"] = sum(1 for r, _, a in rows if a < 0 and r > dual_clip) / n
    assert set(out.metrics) == set(expected)
    floats = out.metric_floats()
    for k, v in expected.items():
        assert floats[k] == pytest.approx(v, rel=FP32_STORE, abs=FP64_SUMS), k
    assert expected["tr_exit_low"] > 0 and expected["tr_exit_high"] > 0  # the cases are exercised
    if dual_clip is not None and ratio_level == "token":
        assert expected["dual_clip_frac"] > 0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_loss_by_hand_with_one_token_rows_and_global_counts(agg):
    """aggregate_loss itself (the public function frameworks call on per_token_loss), in float64, from loops: rows with
    one valid token (a normaliser clamped at 1 is no different there, one clamped at 2 is), an empty row, garbage at
    padding, and the data-parallel form: dp_size x the loss with the global token / sequence counts passed in."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    dirty = torch.where(mask, x, torch.tensor(float("nan"), dtype=torch.float64))
    rows = [[x[b, t].item() for t in range(4) if mask[b, t]] for b in range(5)]
    rows = [r for r in rows if r]

    def by_hand(n_tok, n_seq, dp=1, t=4):
        if agg == "token-mean":
            return dp * sum(map(sum, rows)) / n_tok
        if agg == "token-sum":
            return dp * sum(map(sum, rows))
        if agg == "seq-mean-token-sum":
            return dp * sum(map(sum, rows)) / n_seq
        if agg == "seq-mean-token-mean":
            return dp * sum(sum(r) / len(r) for r in rows) / n_seq
        return dp * sum(map(sum, rows)) / n_seq / t

    n_tok, n_seq = sum(map(len, rows)), len(rows)  # 9 tokens, 4 sequences
    out = aggregate_loss(dirty, mask, agg)
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(by_hand(n_tok, n_seq), rel=1e-12)
    info = dict(dp_size=2, batch_num_tokens=torch.tensor(23.0), global_batch_size=7.0)
    out = aggregate_loss(dirty, mask, agg, **info)
    assert out.item() == pytest.approx(by_hand(23.0, 7.0, dp=2), rel=1e-12)
    out = aggregate_loss(dirty.float(), mask.long(), agg, loss_scale_factor=3.0)  # a 0/1 mask, fp32
    assert out.dtype == torch.float32
    # fp32 sums of 9 terms and up to 3 divisions: (9 + 3)·u_fp32 relative to the terms' magnitude, x SAFETY
    assert out.item() == pytest.approx(by_hand(n_tok, n_seq, t=3.0), rel=SAFETY * 12 * UNIT_ROUNDOFF[torch.float32])
    # one valid token in the whole batch: every mean is that token's value (a count clamped at 2 would halve it)
    one = torch.zeros(5, 4, dtype=torch.bool)
    one[3, 2] = True
    expected = x[3, 2].item() / (0.5 if agg == "seq-mean-token-sum-norm" else 1.0)
    assert aggregate_loss(dirty, one, agg, loss_scale_factor=0.5).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("fp64", ["log_prob", "old_log_prob", "advantages", "weights"])
def test_any_float64_input_makes_the_loss_float64(fp64):
    """compute_dtype: float64 as soon as any input is (gradcheck, float64 references), else float32."""
    lp, olp, adv, mask = make_batch(dtype=torch.float32)
    inputs = dict(log_prob=lp, old_log_prob=olp, advantages=adv, weights=torch.ones(mask.shape))
    inputs[fp64] = inputs[fp64].double()
    out = compute_policy_loss(
        inputs["log_prob"], inputs["old_log_prob"], inputs["advantages"], mask, weights=inputs["weights"]
    )
    assert out.loss.dtype == torch.float64 and out.per_token_loss.dtype == torch.float64


def test_fast_path_returns_no_per_token_loss_and_aggregate_loss_defaults_to_token_mean():
    lp, olp, adv, mask = make_batch()
    assert compute_policy_loss(lp, olp, adv, mask, compile=True).per_token_loss is None
    x = torch.randn(mask.shape, dtype=torch.float64)
    assert aggregate_loss(x, mask).item() == aggregate_loss(x, mask, "token-mean").item()
    assert aggregate_loss(x, mask).item() == pytest.approx(x[mask].mean().item(), rel=1e-12)


def test_loss_scale_factor_reaches_the_aggregation():
    lp, olp, adv, mask = make_batch()
    base = compute_policy_loss(lp, olp, adv, mask, agg="seq-mean-token-sum-norm")  # normaliser: T = 7
    out = compute_policy_loss(lp, olp, adv, mask, agg="seq-mean-token-sum-norm", loss_scale_factor=3.5)
    assert out.loss.item() == pytest.approx(base.loss.item() * 7 / 3.5, rel=1e-12)
