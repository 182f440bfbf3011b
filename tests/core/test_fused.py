"""fused_linear_policy_loss against the unfused path and against the paper's equations.

The reference is the plain eager path a trainer would write — logits = (h @ W.T + b) / temperature,
log_softmax, gather, then the core's compute_policy_loss — differentiated by autograd through the full
(B, T, V) logits. One test writes the CFPO objective out from the paper instead, so the fused path is
also checked against something that shares no code with the library. Only torch, pytest and
hypothesis are needed (no liger, no framework).

Tolerances (cfpo_loss.reference's rounding bounds; the suite prints the largest error/bound it saw):
* float32: each path computes log π from the LM head in fp32 (lm_head_log_prob_error: the logits' dot products,
  logsumexp), then the loss, the metrics and the gradients w.r.t. hidden, weight and bias (fp32_loss_bound,
  fp32_grad_bounds: the per-token gradient's error through the softmax and the three GEMMs); the two paths differ
  by at most twice that bound.
* float64: 1e-10 (hypothesis sweep over shapes / chunk sizes / masks; u_fp64 = 1.1e-16 times the same
  conditioning is below 1e-12).
* bfloat16: see test_bf16_within_the_unfused_paths_own_error.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from cfpo_loss import AGG_MODES, aggregate_loss, compute_policy_loss
from cfpo_loss.fused import default_chunk_size, fused_linear_policy_loss
from cfpo_loss.reference import SAFETY, UNIT_ROUNDOFF, assert_within, policy_loss_bound, policy_metric_bounds

pytestmark = pytest.mark.rounding

OBJECTIVES = ("cfpo", "clip")


def make_inputs(b=4, t=9, h=24, v=97, *, seed=0, dtype=torch.float32, bias=True, spread=0.3, fully_masked_row=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h) * 2
    bias_t = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    target = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[:, 0] = True
    if fully_masked_row and b > 1:
        mask[1] = False
    with torch.no_grad():
        logits = hidden @ weight.T + (bias_t if bias else 0)
        lp = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    old = (lp + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(b, generator=g) + 0.3  # not mean-zero, so the loss is not a cancellation residue
    # padding holds garbage, as real batches do
    target = target.masked_fill(~mask, -100)
    old = old.masked_fill(~mask, float("nan"))
    ref = ref.masked_fill(~mask, float("inf"))
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()
    return dict(
        hidden=cast(hidden), weight=cast(weight), bias=cast(bias_t), target=target, old=old, ref=ref, adv=adv, mask=mask
    )


def unfused(inp, *, temperature=1.0, beta=0.0, **kw):
    """The eager path: full logits -> log_softmax -> gather -> compute_policy_loss (+ TRL's k3 KL)."""
    logits = torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"])
    logits = logits.float() / temperature
    lp = logits.log_softmax(-1).gather(-1, inp["target"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    out = compute_policy_loss(lp, inp["old"], inp["adv"], inp["mask"], **kw)
    loss = out.loss
    if beta:
        # TRL GRPOTrainer: per_token_kl = exp(ref - logp) - (ref - logp) - 1; per_token_loss += beta * kl
        delta = torch.where(inp["mask"], inp["ref"] - lp, 0)
        kl = torch.exp(delta) - delta - 1
        agg_kw = {
            k: v
            for k, v in kw.items()
            if k in ("agg", "dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
        }
        mode = agg_kw.pop("agg", "token-mean")
        loss = aggregate_loss(out.per_token_loss + beta * kl, inp["mask"], mode, **agg_kw)
    return loss, out, lp


def fused(inp, **kw):
    return fused_linear_policy_loss(
        inp["hidden"],
        inp["weight"],
        inp["target"],
        inp["old"],
        inp["adv"],
        inp["mask"],
        lm_head_bias=inp["bias"],
        ref_log_prob=inp["ref"] if kw.get("beta") else None,
        **kw,
    )


def params(inp):
    return [p for p in (inp["hidden"], inp["weight"], inp["bias"]) if p is not None]


def assert_grads_close(got, want, rtol=1e-5):
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # the floor: entries that cancel to ~0 have no meaningful relative error (error/bound recorded)
        assert_within(a, b, rtol * (b.abs() + b.abs().max()), f"grad {name}")


def lm_head_log_prob_error(inp, temperature=1.0):
    """A first-order bound on the error of log π = z_y − logsumexp(z), z = (h·Wᵀ + b) / temperature, computed in
    fp32 (either path: blocked or whole GEMMs): each logit is a dot product of H terms plus the bias, so its error
    is <= (H + 2)·u·(|h|·|W|ᵀ + |b|) (Higham 3.5); logsumexp moves by at most the largest logit error, and adds
    (V + 4)·u·(|z_y| + |lse|) of its own (the sum over V exponentials, the log, the subtraction)."""
    u = UNIT_ROUNDOFF[torch.float32]
    h, w = inp["hidden"].detach().double(), inp["weight"].detach().double()
    b = 0.0 if inp["bias"] is None else inp["bias"].detach().double()
    z = (h @ w.T + b) / temperature
    z_err = (w.shape[1] + 2) * u * (h.abs() @ w.abs().T + (b.abs() if inp["bias"] is not None else 0.0)) / temperature
    target = inp["target"].clamp(min=0).unsqueeze(-1)
    z_y, lse = z.gather(-1, target).squeeze(-1), z.logsumexp(-1)
    return z_err.gather(-1, target).squeeze(-1) + z_err.amax(-1) + (w.shape[0] + 4) * u * (z_y.abs() + lse.abs())


def fp32_loss_bound(inp, kw, log_prob):
    """reference.policy_loss_bound for the loss on LM-head log-probs (their error: lm_head_log_prob_error), each
    token weighted as aggregate_loss weighs it with kw's global-batch arguments; with beta, the KL term's
    β·Σ coef·k3 adds its error: |dk3/dlog π| = |e^d − 1| times log π's error, and four roundings of k3's terms."""
    u = UNIT_ROUNDOFF[torch.float32]
    info = {k: kw[k] for k in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor") if k in kw}
    mask = inp["mask"]
    probe = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
    (coef,) = torch.autograd.grad(aggregate_loss(probe, mask, kw.get("agg", "token-mean"), **info), probe)
    error = lm_head_log_prob_error(inp, kw.get("temperature", 1.0))
    pick = {k: kw[k] for k in ("objective", "eps_low", "eps_high", "ratio_level") if k in kw}
    bound = policy_loss_bound(log_prob, inp["old"], inp["adv"], mask, coef=coef, log_prob_error=error, **pick).loss
    if kw.get("beta"):
        d = torch.where(mask, inp["ref"].double() - log_prob.detach().double(), 0.0)
        k3_error = (d.exp() - 1).abs() * error + 4 * u * (d.exp() + 1 + d.abs())
        bound += SAFETY * kw["beta"] * float((coef.abs() * torch.where(mask, k3_error, 0.0)).sum())
    return bound


def fp32_grad_bounds(inp, kw):
    """First-order bounds on the error of one fp32 evaluation of the gradients w.r.t. hidden, weight and bias:
    g = dloss/dlog π carries policy_loss_bound's error (log π's own included) and, with beta, the KL term's
    β·coef·|e^d|·(log π's error); dz = g·(onehot − softmax)/temperature adds |g|·p·(its logit's error + the largest)
    and two roundings; then the GEMMs dz·W (V terms), dzᵀ·h and Σ_t dz (N tokens) add (terms + 1)·u·|dz|·|·|."""
    u = UNIT_ROUNDOFF[torch.float32]
    temperature = kw.get("temperature", 1.0)
    loss, _, log_prob = unfused(inp, **kw)
    (g,) = torch.autograd.grad(loss, log_prob)
    g, mask = g.double(), inp["mask"]
    info = {k: kw[k] for k in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor") if k in kw}
    probe = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
    (coef,) = torch.autograd.grad(aggregate_loss(probe, mask, kw.get("agg", "token-mean"), **info), probe)
    error = lm_head_log_prob_error(inp, temperature)
    pick = {k: kw[k] for k in ("objective", "eps_low", "eps_high", "ratio_level") if k in kw}
    d_g = policy_loss_bound(log_prob, inp["old"], inp["adv"], mask, coef=coef, log_prob_error=error, **pick).grad
    if kw.get("beta"):
        d = torch.where(mask, inp["ref"].double() - log_prob.detach().double(), 0.0)
        d_g = d_g + SAFETY * kw["beta"] * coef.abs() * torch.where(mask, d.exp() * error + 4 * u * (d.exp() + 1), 0.0)
    h, w = inp["hidden"].detach().double(), inp["weight"].detach().double()
    z = (h @ w.T + (0.0 if inp["bias"] is None else inp["bias"].detach().double())) / temperature
    p = z.softmax(-1)
    onehot = torch.nn.functional.one_hot(inp["target"].clamp(min=0), w.shape[0]).double()
    bias_abs = 0.0 if inp["bias"] is None else inp["bias"].detach().double().abs()
    z_err = (w.shape[1] + 2) * u * (h.abs() @ w.abs().T + bias_abs) / temperature
    dz = g[..., None] * (onehot - p) / temperature
    d_dz = (d_g[..., None] * (onehot - p).abs() + g.abs()[..., None] * p * (z_err + z_err.amax(-1, keepdim=True))
            * SAFETY) / temperature + SAFETY * 2 * u * dz.abs()  # fmt: skip
    d_dz, dz = d_dz.reshape(-1, w.shape[0]), dz.reshape(-1, w.shape[0])
    n, hf = dz.shape[0], h.reshape(-1, w.shape[1])
    grad_h = d_dz @ w.abs() + SAFETY * (w.shape[0] + 1) * u * (dz.abs() @ w.abs())
    grad_w = d_dz.T @ hf.abs() + SAFETY * (n + 1) * u * (dz.abs().T @ hf.abs())
    grad_b = d_dz.sum(0) + SAFETY * (n + 1) * u * dz.abs().sum(0)
    return grad_h.reshape(h.shape), grad_w, grad_b


def k3_bound(ref, log_prob, error, mask):
    """Per valid token, a first-order bound (x SAFETY) on one fp32 evaluation of TRL's k3 = e^d − d − 1,
    d = ref − log π, from a log π carrying ``error``: |dk3/dlog π| = |e^d − 1|, and four roundings of its terms."""
    u = UNIT_ROUNDOFF[torch.float32]
    d = (ref.double() - log_prob.detach().double())[mask]
    return SAFETY * ((d.exp() - 1).abs() * error[mask] + 4 * u * (d.exp() + 1 + d.abs()))


def entropy_bound(logits, logit_error):
    """Per row of ``logits`` (float64, already / temperature), a first-order bound (x SAFETY) on one fp32 evaluation
    of H = lse(z) − Σ p·z from logits carrying ``logit_error``: ∂H/∂z_j = −p_j·(z_j − Σ p·z), plus the roundings
    of the V-term sums (exp, the log, the products): (V + 4)·u·(|lse| + Σ p·|z|)."""
    u = UNIT_ROUNDOFF[torch.float32]
    p, lse = logits.softmax(-1), logits.logsumexp(-1)
    mean_z = (p * logits).sum(-1, keepdim=True)
    first = (p * (logits - mean_z).abs() * logit_error).sum(-1)
    return SAFETY * (first + (logits.shape[-1] + 4) * u * (lse.abs() + (p * logits.abs()).sum(-1)))


def mean_bound(values, per_value_bounds):
    """The bound on a masked mean of values each within its bound, plus the fp32 sum and division (x SAFETY)."""
    u = UNIT_ROUNDOFF[torch.float32]
    n = values.numel()
    return float(per_value_bounds.mean() + SAFETY * (n + 1) * u * values.double().abs().mean())


def logit_error(inp, temperature=1.0):
    """(B, T, V) the error of fp32 logits z = (h·Wᵀ + b) / temperature: (H + 2)·u·(|h|·|W|ᵀ + |b|) (Higham 3.5)."""
    u = UNIT_ROUNDOFF[torch.float32]
    h, w = inp["hidden"].detach().double(), inp["weight"].detach().double()
    b = 0.0 if inp["bias"] is None else inp["bias"].detach().double().abs()
    return (w.shape[1] + 2) * u * (h.abs() @ w.abs().T + b) / temperature


def assert_fp32_loss_and_grads(inp, kw, loss, grads, what):
    """One fp32 fused evaluation against the fp32 unfused path with the same arguments: within twice the derived
    bounds (fp32_loss_bound, fp32_grad_bounds), two evaluations."""
    loss_u, _, log_prob_u = unfused(inp, **kw)
    assert_within(loss, loss_u.detach(), 2 * fp32_loss_bound(inp, kw, log_prob_u), f"{what} loss")
    if grads is not None:
        for name, a, b, bound in zip(("hidden", "weight", "bias"), grads, torch.autograd.grad(loss_u, params(inp)),
                                     fp32_grad_bounds(inp, kw)):  # fmt: skip
            assert_within(a, b, 2 * bound, f"{what} grad {name}")


def assert_same(inp, f_kw, u_kw=None, rtol=1e-5):
    u_kw = f_kw if u_kw is None else u_kw
    loss_u, out_u, log_prob_u = unfused(inp, **u_kw)
    grads_u = torch.autograd.grad(loss_u, params(inp))
    out_f = fused(inp, **f_kw)
    grads_f = torch.autograd.grad(out_f.loss, params(inp))
    assert out_f.loss.dtype == loss_u.dtype and out_f.loss.dim() == 0
    loss_bound = rtol * loss_u.abs() + 1e-7
    if inp["hidden"].dtype == torch.float32:
        loss_bound = 2 * fp32_loss_bound(inp, u_kw, log_prob_u)  # two fp32 evaluations
    assert_within(out_f.loss, loss_u, loss_bound, "fused loss")
    if inp["hidden"].dtype == torch.float32:
        for name, a, b, bound in zip(("hidden", "weight", "bias"), grads_f, grads_u, fp32_grad_bounds(inp, u_kw)):
            assert_within(a, b, 2 * bound, f"grad {name}")  # two fp32 evaluations
    else:
        assert_grads_close(grads_f, grads_u, rtol)
    assert set(out_f.metrics) >= set(out_u.metrics)
    m = inp["mask"]
    if inp["hidden"].dtype == torch.float32:
        # each path computes log π in fp32 from the LM head (lm_head_log_prob_error), then the metrics: within
        # twice the derived bound of either
        kw = {k: u_kw[k] for k in ("eps_low", "eps_high", "ratio_level") if k in u_kw}
        error = lm_head_log_prob_error(inp, u_kw.get("temperature", 1.0))
        bounds = policy_metric_bounds(log_prob_u, inp["old"], inp["adv"], m, log_prob_error=error, **kw)
        for k, v in out_u.metrics.items():
            assert_within(out_f.metrics[k], v, 2 * bounds.get(k, 0.0), f"metric {k}")
        ratio_bound = policy_loss_bound(log_prob_u, inp["old"], inp["adv"], m, log_prob_error=error, **kw).ratio
        assert_within(out_f.ratio[m], out_u.ratio[m], 2 * ratio_bound[m], "fused r")
    assert not out_f.per_token_loss.requires_grad
    assert torch.all(out_f.per_token_loss[~m] == 0)
    return out_f


# ---- float32 against the unfused path ----------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("chunk_size,temperature,bias", [(5, 1.0, True), (7, 0.7, False), (1000, 1.3, True)])
def test_float32_matches_unfused(objective, agg, chunk_size, temperature, bias):
    # N = 36 tokens, 24 valid (a fully masked row): chunk sizes 5 and 7 divide neither
    inp = make_inputs(bias=bias)
    kw = dict(objective=objective, agg=agg, temperature=temperature)
    assert_same(inp, dict(kw, chunk_size=chunk_size), kw)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("chunk_size", [1, 4, 9, 11, 64])
def test_sequence_ratio_blocks_of_whole_rows(objective, chunk_size):
    # GSPO: a token's gradient depends on its whole row; blocks smaller than a row must still be right
    inp = make_inputs(b=5, t=9, seed=3)
    kw = dict(objective=objective, ratio_level="sequence", agg="seq-mean-token-mean")
    assert_same(inp, dict(kw, chunk_size=chunk_size), kw)


def test_weights_dual_clip_eps_high_and_global_batch_info():
    inp = make_inputs(seed=4, spread=0.8)
    w = torch.rand(4, 9, generator=torch.Generator().manual_seed(9)) + 0.5
    for kw in (
        dict(
            objective="clip",
            dual_clip=3.0,
            eps_low=0.2,
            eps_high=0.28,
            weights=w,
            agg="token-mean",
            dp_size=2,
            batch_num_tokens=50,
        ),
        dict(
            objective="cfpo",
            eps_low=0.1,
            eps_high=0.3,
            weights=w,
            agg="seq-mean-token-sum-norm",
            dp_size=4,
            global_batch_size=7,
            loss_scale_factor=16,
        ),
        dict(objective="cfpo", agg="seq-mean-token-sum", global_batch_size=torch.tensor(5.0)),
        dict(objective="cfpo", ratio_level="sequence", weights=w, agg="seq-mean-token-mean"),  # blocks of rows
        dict(objective="clip", beta=0.05, agg="token-mean", dp_size=2, batch_num_tokens=50),  # KL + global count
    ):
        assert_same(inp, dict(kw, chunk_size=6), kw)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_on_policy_and_check_finite_off(ratio_level):
    """old_log_prob=None at sequence level too (blocks of whole rows); check_finite=False reaches the final loss
    call: NaN at a valid old_log_prob gives a NaN loss instead of an error, as in compute_policy_loss."""
    inp = make_inputs(seed=17)
    kw = dict(objective="cfpo", ratio_level=ratio_level, chunk_size=5)
    out = fused_linear_policy_loss(
        inp["hidden"], inp["weight"], inp["target"], None, inp["adv"], inp["mask"], lm_head_bias=inp["bias"], **kw
    )
    assert out.metrics["ratio_min"].item() == out.metrics["ratio_max"].item() == 1.0
    assert torch.isfinite(out.loss)
    old = inp["old"].clone()
    old[0, 0] = float("nan")  # a valid position
    with pytest.raises(ValueError, match="old_log_prob holds"):
        fused(dict(inp, old=old), **kw)
    assert torch.isnan(fused(dict(inp, old=old), check_finite=False, **kw).loss)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_kl_term_matches_trl_k3(agg):
    inp = make_inputs(seed=5)
    kw = dict(objective="cfpo", agg=agg, beta=0.04)
    out = assert_same(inp, dict(kw, chunk_size=7), kw)
    m = inp["mask"]
    lp = unfused(inp)[2].detach()
    delta = inp["ref"][m] - lp[m]
    k3 = delta.exp() - delta - 1
    # two fp32 evaluations of the mean k3, each from a log π within lm_head_log_prob_error
    bound = 2 * mean_bound(k3, k3_bound(inp["ref"], lp, lm_head_log_prob_error(inp), m))
    assert_within(out.metrics["kl"], k3.mean(), bound, "kl metric")


@pytest.mark.parametrize(
    "kw",
    [
        dict(agg="seq-mean-token-sum-norm", dp_size=4, global_batch_size=7, loss_scale_factor=16),
        dict(agg="seq-mean-token-mean", global_batch_size=torch.tensor(5.0)),
    ],
)
def test_kl_term_is_aggregated_with_the_global_batch(kw):
    """With beta > 0 the fused path re-aggregates policy + beta·k3 itself: every global-batch argument must reach
    that aggregation too (the unfused reference aggregates the same sum with verl's agg_loss semantics)."""
    inp = make_inputs(seed=23)
    kw = dict(kw, objective="cfpo", beta=0.05)
    assert_same(inp, dict(kw, chunk_size=5), kw)


def test_kl_and_entropy_metrics_of_a_single_valid_token():
    """One valid token: the masked means are that token's k3 and entropy (the count is 1, not a clamp floor)."""
    inp = make_inputs(seed=29)
    only = torch.zeros_like(inp["mask"])
    only[2, 3] = True
    inp = dict(inp, mask=only, old=inp["old"].nan_to_num(0.0), ref=inp["ref"].nan_to_num(0.0, posinf=0.0))
    inp["target"] = inp["target"].clamp(min=0)
    out = fused(inp, chunk_size=4, beta=0.1, compute_entropy=True)
    logits = (torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"])).double()[2, 3]
    logp = logits.log_softmax(-1)
    delta = inp["ref"][2, 3].double() - logp[inp["target"][2, 3]]
    # one fp32 evaluation against float64 (of the same fp32 logits: the fused GEMM's own rounding is the error)
    only_lp = torch.zeros(inp["mask"].shape, dtype=torch.float64)
    only_lp[2, 3] = logp[inp["target"][2, 3]]
    error = lm_head_log_prob_error(inp)
    kl_bound = k3_bound(inp["ref"], only_lp, error, only)[0]
    assert_within(out.metrics["kl"], delta.exp() - delta - 1, kl_bound, "kl 1 token")
    want = -(logp.exp() * logp).sum()
    assert_within(out.metrics["entropy"], want, entropy_bound(logits, logit_error(inp)[2, 3]), "entropy 1 token")


def test_advantages_per_token_and_int_mask_and_2d_hidden():
    inp = make_inputs(seed=6)
    adv_bt = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    inp["adv"] = adv_bt
    out = fused_linear_policy_loss(
        inp["hidden"].reshape(36, -1),
        inp["weight"],
        inp["target"],
        inp["old"],
        adv_bt,
        inp["mask"].long(),
        objective="clip",
        lm_head_bias=inp["bias"],
        chunk_size=8,
    )
    gf = torch.autograd.grad(out.loss, params(inp))
    assert_fp32_loss_and_grads(inp, dict(objective="clip"), out.loss, gf, "per-token A, int mask, 2-D hidden")


def test_upstream_gradient_scales_and_frozen_weight():
    inp = make_inputs(seed=7)
    loss_u, _, _ = unfused(inp)
    gu = torch.autograd.grad(3.0 * loss_u, [inp["hidden"]])
    inp["weight"].requires_grad_(False)
    inp["bias"].requires_grad_(False)
    out = fused(inp, chunk_size=10)
    gf = torch.autograd.grad(3.0 * out.loss + inp["hidden"].sum() * 0, [inp["hidden"]])
    assert_grads_close(gf, gu)
    # and .backward() fills .grad of a leaf, accumulating like any other loss
    inp["hidden"].grad = torch.ones_like(inp["hidden"])
    fused(inp, chunk_size=10).loss.backward()
    assert_grads_close([inp["hidden"].grad - 1], [gu[0] / 3])


def test_all_masked_batch_is_zero_loss_zero_grad():
    inp = make_inputs(seed=8)
    inp["mask"] = torch.zeros_like(inp["mask"])
    out = fused(inp, chunk_size=4)
    grads = torch.autograd.grad(out.loss, params(inp))
    assert out.loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert out.metrics["tr_exit_frac"].item() == 0.0


def test_no_grad_inputs_give_loss_and_metrics():
    inp = make_inputs(seed=9)
    with torch.no_grad():
        out = fused(inp, objective="clip", chunk_size=5)
    assert_fp32_loss_and_grads(inp, dict(objective="clip"), out.loss, None, "no_grad")
    assert not out.loss.requires_grad


def test_on_policy_old_log_prob_none_is_detached_current_policy():
    # TRL: old_per_token_logps absent => per_token_logps.detach(); r = 1 and the gradient is A·∇log π
    inp = make_inputs(seed=14)
    for objective in OBJECTIVES:
        logits = torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"]).float()
        lp = logits.log_softmax(-1).gather(-1, inp["target"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out = fused_linear_policy_loss(
            inp["hidden"],
            inp["weight"],
            inp["target"],
            None,
            inp["adv"],
            inp["mask"],
            objective=objective,
            lm_head_bias=inp["bias"],
            chunk_size=7,
        )
        gf = torch.autograd.grad(out.loss, params(inp))
        # r = 1 on both sides: the unfused path with old = its own detached log π is what fused computes
        assert_fp32_loss_and_grads(dict(inp, old=lp.detach()), dict(objective=objective), out.loss, gf, "old None")
        assert out.metrics["ratio_max"].item() == out.metrics["ratio_min"].item() == 1.0


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_entropy_metric(temperature):
    inp = make_inputs(seed=15)
    with torch.no_grad():
        logits = torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"]) / temperature
        logp = logits.log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1)[inp["mask"]].mean()
    out = fused(inp, chunk_size=5, temperature=temperature, compute_entropy=True)
    m = inp["mask"]
    logits64 = logits.double()[m]
    per_token = entropy_bound(logits64, logit_error(inp, temperature)[m])
    assert_within(out.metrics["entropy"], ent, 2 * mean_bound(ent.expand(int(m.sum())), per_token), "entropy")
    assert "entropy" not in fused(inp, chunk_size=5).metrics


def test_second_backward_through_the_same_graph_raises():
    inp = make_inputs(seed=16)
    out = fused(inp, chunk_size=5)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice"):
        out.loss.backward()


def test_default_chunk_size():
    assert default_chunk_size(32768) == 1024
    assert default_chunk_size(151936) == 220
    assert default_chunk_size(10) == 4096
    assert 64 <= default_chunk_size(10**7) <= 4096


# ---- against the paper's equation, sharing no code with the library ----------------------------------


def test_cfpo_from_the_paper_equation_float64():
    """J = r·A − |A|/(2ε)·(r−1)², ε = eps_high (A>0) / eps_low (A<0); loss = −token-mean J."""
    inp = make_inputs(seed=10, dtype=torch.float64)
    eps_low, eps_high = 0.2, 0.3
    logits = inp["hidden"] @ inp["weight"].T + inp["bias"]
    lp = logits.log_softmax(-1).gather(-1, inp["target"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    m = inp["mask"]
    r = torch.exp(lp[m] - inp["old"][m].double())
    a = inp["adv"].double().unsqueeze(1).expand_as(lp)[m]
    eps = torch.where(a > 0, torch.full_like(a, eps_high), torch.full_like(a, eps_low))
    want = -(r * a - a.abs() / (2 * eps) * (r - 1) ** 2).mean()
    gw = torch.autograd.grad(want, params(inp))
    out = fused(inp, objective="cfpo", eps_low=eps_low, eps_high=eps_high, chunk_size=5)
    gf = torch.autograd.grad(out.loss, params(inp))
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-10, atol=1e-12)
    assert_grads_close(gf, gw, rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    t=st.integers(1, 6),
    h=st.integers(1, 8),
    v=st.integers(2, 40),
    chunk=st.integers(1, 30),
    seed=st.integers(0, 10_000),
    objective=st.sampled_from(OBJECTIVES),
    agg=st.sampled_from(AGG_MODES),
    ratio_level=st.sampled_from(["token", "sequence"]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_float64_sweep(b, t, h, v, chunk, seed, objective, agg, ratio_level, temperature):
    inp = make_inputs(b, t, h, v, seed=seed, dtype=torch.float64, fully_masked_row=seed % 2 == 0)
    kw = dict(objective=objective, agg=agg, ratio_level=ratio_level)
    loss_u, _, lp32 = unfused(inp, temperature=temperature, **kw)
    out = fused(inp, chunk_size=chunk, temperature=temperature, **kw)
    # the unfused reference casts logits to fp32 (as trainers do), so compare the float64 fused path to
    # a float64 unfused path instead: same code with the .float() removed
    logits = torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"]) / temperature
    lp = logits.log_softmax(-1).gather(-1, inp["target"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want = compute_policy_loss(lp, inp["old"].double(), inp["adv"].double(), inp["mask"], **kw).loss
    gw = torch.autograd.grad(want, params(inp))
    gf = torch.autograd.grad(out.loss, params(inp))
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-10, atol=1e-12)
    assert_grads_close(gf, gw, rtol=1e-10)
    # the fp32 unfused path (its logits rounded to fp32, log_softmax in fp32) within one fp32 evaluation's bound
    bound = fp32_loss_bound(inp, dict(kw, temperature=temperature), lp32)
    assert_within(out.loss, loss_u.detach(), bound, "fp64 vs fp32")


# ---- bfloat16 ----------------------------------------------------------------------------------------


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_bf16_within_the_unfused_paths_own_error(objective):
    """bf16 inputs: both paths round the lm_head output to bf16 (the fused tile comes out of the same
    bf16 matmul) and compute everything after it in fp32; the gradient tile goes back to bf16 for the
    two gradient matmuls in both. So the fused path is held to the unfused bf16 path's own error
    against an fp32 ground truth (same bf16-representable inputs, computed in fp32): at most 1.5× that
    error plus half a bf16 ulp (2**-9), for the loss and every gradient. The direct fused-vs-unfused
    bf16 difference is then bounded by ~2 bf16 ulps (1e-2 relative in norm)."""
    inp16 = make_inputs(b=4, t=16, h=32, v=300, seed=11, dtype=torch.bfloat16)
    inp32 = {
        k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v)
        for k, v in inp16.items()
    }
    kw = dict(objective=objective, agg="token-mean")
    loss32, _, _ = unfused(inp32, **kw)
    g32 = torch.autograd.grad(loss32, params(inp32))
    loss_u, _, _ = unfused(inp16, **kw)
    gu = torch.autograd.grad(loss_u, params(inp16))
    out = fused(inp16, chunk_size=13, **kw)
    gf = torch.autograd.grad(out.loss, params(inp16))
    assert out.loss.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in gf)
    half_ulp = 2.0**-9
    assert _rel(out.loss, loss32) <= 1.5 * _rel(loss_u, loss32) + half_ulp
    for a, b, c in zip(gf, gu, g32):
        assert _rel(a, c) <= 1.5 * _rel(b, c) + half_ulp
        assert _rel(a, b) <= 1e-2


# ---- it never holds the full logits -----------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_largest_intermediate_is_one_tile():
    b, t, h, v, chunk = 4, 32, 16, 512, 8
    inp = make_inputs(b, t, h, v, seed=12)
    with _LargestTensor() as probe:
        out = fused(inp, chunk_size=chunk)
        out.loss.backward()
    # one (chunk, V) tile, or the (V, H) weight gradient — never (B·T, V)
    assert probe.largest <= max(chunk * v, v * h)
    assert probe.largest < b * t * v // 4


# ---- bad inputs -------------------------------------------------------------------------------------


def _call(**over):
    inp = make_inputs(seed=13)
    args = dict(
        hidden=inp["hidden"],
        lm_head_weight=inp["weight"],
        target_ids=inp["target"],
        old_log_prob=inp["old"],
        advantages=inp["adv"],
        mask=inp["mask"],
        lm_head_bias=inp["bias"],
    )
    args.update(over)
    return fused_linear_policy_loss(**args)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(hidden=torch.randn(4, 9)), ValueError, "hidden"),
        (dict(hidden=torch.randn(4, 8, 24)), ValueError, "hidden"),
        (dict(hidden=torch.zeros(4, 9, 24, dtype=torch.long)), TypeError, "hidden"),
        (dict(lm_head_weight=torch.randn(97, 23)), ValueError, "hidden"),
        (dict(lm_head_weight=torch.randn(97)), ValueError, "lm_head_weight"),
        (dict(lm_head_weight=torch.randn(97, 24, dtype=torch.float64)), TypeError, "lm_head_weight"),
        (dict(lm_head_bias=torch.randn(96)), ValueError, "lm_head_bias"),
        (dict(lm_head_bias=torch.randn(97, dtype=torch.float64)), TypeError, "lm_head_bias"),
        (dict(target_ids=torch.zeros(4, 9)), TypeError, "target_ids"),
        (dict(target_ids=torch.zeros(4, 8, dtype=torch.long)), ValueError, "hidden"),
        (dict(target_ids=torch.full((4, 9), 97)), ValueError, "target_ids"),
        (dict(target_ids=torch.full((4, 9), -1)), ValueError, "target_ids"),
        (dict(old_log_prob=torch.randn(4, 8)), ValueError, "old_log_prob"),
        (dict(advantages=torch.randn(3)), ValueError, "advantages"),
        (dict(mask=torch.ones(4, 8, dtype=torch.bool)), ValueError, "mask"),
        (dict(mask=torch.full((4, 9), 2)), ValueError, "mask must be bool or hold only 0 and 1"),
        (dict(old_log_prob=[[0.0] * 9] * 4), TypeError, "old_log_prob must be a torch.Tensor"),
        (dict(objective="spo"), ValueError, "objective"),
        (dict(agg="mean"), ValueError, "agg"),
        (dict(ratio_level="seq"), ValueError, "ratio_level"),
        (dict(eps_low=1.5), ValueError, "eps_low"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), ValueError, "chunk_size"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(beta=0.1), ValueError, "ref_log_prob"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(beta=0.1, ref_log_prob=torch.randn(4, 8)), ValueError, "ref_log_prob"),
        (dict(beta=0.1, ref_log_prob=torch.full((4, 9), float("nan"))), ValueError, "ref_log_prob"),
        (dict(old_log_prob=torch.full((4, 9), float("nan"))), ValueError, "old_log_prob"),
        (dict(dp_size=2), ValueError, "batch_num_tokens"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


# ---- the GPU design, exercised on CPU: compiled folds on an input-dtype tile, fp32 accumulation --------

from cfpo_loss import fused as fused_mod  # noqa: E402


@pytest.fixture
def compiled_fold(monkeypatch, request):
    """Run the fused path with the fold CUDA uses (``CompiledFold``): compiled by inductor (C++ on CPU) or
    its eager torch twin."""
    fold = fused_mod.CompiledFold(compile=request.param)
    monkeypatch.setattr(fused_mod, "default_fold", lambda device: fold)
    return fold


@pytest.mark.parametrize("compiled_fold", [False, True], ids=["twin", "compiled"], indirect=True)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gpu_fold_float32_matches_unfused(compiled_fold, objective):
    inp = make_inputs(seed=21)
    for kw in (
        dict(objective=objective, temperature=0.7, beta=0.05, compute_entropy=True),
        dict(objective=objective, ratio_level="sequence", agg="seq-mean-token-mean", eps_high=0.28),
    ):
        u_kw = {k: v for k, v in kw.items() if k != "compute_entropy"}
        out = assert_same(inp, dict(kw, chunk_size=5), u_kw)
        if kw.get("compute_entropy"):
            logits = torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"]).double() / 0.7
            m = inp["mask"]
            per_token_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)[m]
            per_token = entropy_bound(logits[m], logit_error(inp, 0.7)[m])
            bound = 2 * mean_bound(per_token_ent, per_token)  # the oracle's logits are fp32 GEMM output as well
            assert_within(out.metrics["entropy"], per_token_ent.mean(), bound, "entropy (fold)")


@pytest.mark.parametrize("compiled_fold", [False, True], ids=["twin", "compiled"], indirect=True)
def test_gpu_fold_bf16_within_the_unfused_paths_own_error(compiled_fold):
    """The bf16 tile (the GPU design) is held to the same bound as the fp32-tile CPU fold above."""
    test_bf16_within_the_unfused_paths_own_error("cfpo")


def test_fold_twins_agree_on_one_tile():
    """CompiledFold's folds (fp32 math on an input-dtype tile, written back in place) against the in-place fp32
    fold, both against log_softmax in float64: forward statistics and the tile's gradient."""
    g = torch.Generator().manual_seed(5)
    z64 = torch.randn(7, 53, generator=g, dtype=torch.float64) * 3
    tgt = torch.randint(0, 53, (7,), generator=g)
    upstream = torch.randn(7, generator=g, dtype=torch.float64)
    zz = z64.clone().requires_grad_()
    lp_ref = (zz / 1.3).log_softmax(-1).gather(-1, tgt[:, None])[:, 0]
    (dz_ref,) = torch.autograd.grad((lp_ref * upstream).sum(), zz)
    # first-order bounds (x SAFETY) of one fp32 fold: z rounded to fp32, times 1/T (itself rounded): 3u·|z|/T per
    # logit; log π as in lm_head_log_prob_error; dz_j = up·(δ_jy − p_j)/T: p_j moves by p_j·(its logit's error + the
    # largest + (V + 4)·u·(|lse| + |z_j/T|)), and six roundings of |up·(δ_jy − p_j)/T| (the upstream's cast, the
    # difference, the product, 1/T and its product, the store)
    u, temp, v = UNIT_ROUNDOFF[torch.float32], 1.3, z64.shape[-1]
    zt, z_err = z64 / temp, 3 * u * z64.abs() / temp
    lse, p = zt.logsumexp(-1, keepdim=True), zt.softmax(-1)
    z_y, err_y = zt.gather(-1, tgt[:, None])[:, 0], z_err.gather(-1, tgt[:, None])[:, 0]
    lp_bound = SAFETY * (err_y + z_err.amax(-1) + (v + 4) * u * (z_y.abs() + lse[:, 0].abs()))
    onehot = torch.nn.functional.one_hot(tgt, v).double()
    d_p = p * (z_err + z_err.amax(-1, keepdim=True) + (v + 4) * u * (lse.abs() + zt.abs()))
    dz_bound = SAFETY * upstream.abs()[:, None] * (d_p + 6 * u * (onehot - p).abs()) / temp
    for fold in (fused_mod.InPlaceFold(), fused_mod.CompiledFold(compile=False), fused_mod.CompiledFold(compile=True)):
        z = z64.float()
        stats = fold.forward(z, tgt, 1.3, False)
        assert_within(stats.log_prob, lp_ref.detach(), lp_bound, f"{type(fold).__name__} log π")
        dz = fold.backward_(z, tgt, stats, upstream.float(), 1.3)
        assert dz.data_ptr() == z.data_ptr()  # written over the tile
        assert_within(dz, dz_ref, dz_bound, f"{type(fold).__name__} dz")


def test_fp32_accumulation_of_low_precision_products():
    """accumulate_fp32: the CPU twin of the GPU's out_dtype addmm. Summing many bf16 products must keep the
    fp32 sum (a bf16 accumulator would round every block's contribution away)."""
    g = torch.Generator().manual_seed(0)
    acc = torch.zeros(8, 16)
    exact = torch.zeros(8, 16, dtype=torch.float64)
    acc_bf16 = torch.zeros(8, 16, dtype=torch.bfloat16)
    for _ in range(64):
        a = torch.randn(8, 32, generator=g).bfloat16()
        b = torch.randn(32, 16, generator=g).bfloat16()
        fused_mod.accumulate_fp32(acc, a, b)
        exact += a.double() @ b.double()
        acc_bf16 += a @ b
    assert acc.dtype == torch.float32
    assert not fused_mod.has_out_dtype_addmm("cpu", torch.bfloat16)  # CPU takes the fp32-copy branch
    assert fused_mod.has_out_dtype_addmm("cpu", torch.float32) is False
    assert _rel(acc, exact) < 1e-6 < _rel(acc_bf16.float(), exact)


@pytest.mark.parametrize("fold", ["in_place", "gpu_twin"])
def test_bf16_weight_and_bias_gradients_do_not_depend_on_the_number_of_blocks(monkeypatch, fold):
    """bf16 inputs: the weight and bias gradients are sums over blocks, accumulated in fp32 and cast to bf16 once,
    so one block per token (chunk_size=1) and one block for the whole batch agree to fp32 rounding, at most one
    final bf16 rounding apart in a few entries: <= 1e-3 relative in norm. A bf16 accumulator rounds every
    block's contribution (~2**-9 each) and lands several times above that. The hidden gradient is per token.
    Both folds: the CPU's fp32 tile and the GPU design's bf16 tile (its eager twin)."""
    if fold == "gpu_twin":
        monkeypatch.setattr(fused_mod, "default_fold", lambda device: fused_mod.CompiledFold(compile=False))
    inp = make_inputs(b=8, t=32, h=32, v=300, seed=12, dtype=torch.bfloat16)  # 164 valid tokens
    n_valid = int(inp["mask"].sum())
    grads = {}
    for chunk_size in (1, n_valid):
        out = fused(inp, chunk_size=chunk_size, objective="cfpo")
        grads[chunk_size] = torch.autograd.grad(out.loss, params(inp))
    for name, many, one in zip(("hidden", "weight", "bias"), grads[1], grads[n_valid]):
        assert many.dtype == torch.bfloat16
        assert _rel(many, one) <= 1e-3, (name, _rel(many, one))


def test_default_chunk_size_on_cuda_follows_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    assert default_chunk_size(151936, torch.bfloat16, "cuda") == 4096  # capped: 4096 × V bf16 = 1.2 GB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 10**9, 80 * 2**30))
    # 1/16 of 8 GB = 500 MB = 1645 rows of 151936 bf16 -> 1536 (a multiple of 128)
    assert default_chunk_size(151936, torch.bfloat16, "cuda") == 1536
    assert default_chunk_size(151936, torch.float32, "cuda") == 768
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**6, 80 * 2**30))
    assert default_chunk_size(151936, torch.bfloat16, "cuda") == 128


# ---- no host round-trip per block -------------------------------------------------------------------------


class _HostSyncs(TorchDispatchMode):
    """Counts what .item() / int() / bool() / .tolist() / nonzero dispatch to: each is a device-to-host wait."""

    SYNCS = frozenset({"_local_scalar_dense", "nonzero", "item"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fold", ["inplace", "gpu-twin"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_host_syncs_do_not_grow_with_the_number_of_blocks(monkeypatch, fold, ratio_level):
    chosen = fused_mod.InPlaceFold() if fold == "inplace" else fused_mod.CompiledFold(compile=False)
    monkeypatch.setattr(fused_mod, "default_fold", lambda device: chosen)
    counts = {}
    for chunk in (10_000, 9, 3):  # one block, a few, many
        inp = make_inputs(b=6, t=9, seed=30)
        with _HostSyncs() as probe:
            out = fused(inp, chunk_size=chunk, ratio_level=ratio_level, beta=0.1, compute_entropy=True)
            out.loss.backward()
        counts[chunk] = probe.count
    assert counts[10_000] == counts[9] == counts[3], counts
    assert counts[3] <= 6, counts  # the layout (count, nonzero), one check, the row counts, the finite check


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_the_logits_tile_is_freed_before_the_final_loss(monkeypatch, ratio_level):
    """The pass's buffers, the (chunk_size × V) logits tile above all, are gone when the final loss (and its metrics)
    allocate: the peak is one tile, not a tile plus the loss. A pass state that outlived the loop (a local of the
    entry point, or one kept by a reference cycle) held it: +128 MiB at V = 32768 in benchmarks/bench_fused.py."""
    tiles, alive = [], []
    allocate, loss_and_metrics = fused_mod.allocate, fused_mod.loss_and_metrics

    def allocate_and_watch(*args):
        buffers = allocate(*args)
        tiles.append(weakref.ref(buffers.tile))
        return buffers

    def check_then_loss(*args):
        alive.append([t() is not None for t in tiles])
        return loss_and_metrics(*args)

    monkeypatch.setattr(fused_mod, "allocate", allocate_and_watch)
    monkeypatch.setattr(fused_mod, "loss_and_metrics", check_then_loss)
    out = fused(make_inputs(), chunk_size=5, ratio_level=ratio_level, beta=0.1)
    out.loss.backward()
    assert alive == [[False]]


# ---- two holes a mutation run found: an unused reference, and the sequence-level block layout ------------------


def test_a_reference_with_beta_zero_is_ignored():
    """beta = 0: ref_log_prob plays no part (TRL passes one whenever it has a reference model). Even one holding
    NaN at valid positions changes nothing: no error, no `kl` metric, the same loss, gradients and metrics as
    without it."""
    inp = make_inputs()
    base = fused(inp, objective="cfpo")
    grads_base = torch.autograd.grad(base.loss, params(inp))
    nan_ref = torch.full_like(inp["old"], float("nan"))
    out = fused_linear_policy_loss(
        inp["hidden"], inp["weight"], inp["target"], inp["old"], inp["adv"], inp["mask"],
        lm_head_bias=inp["bias"], ref_log_prob=nan_ref, beta=0.0, objective="cfpo",
    )  # fmt: skip
    grads = torch.autograd.grad(out.loss, params(inp))
    assert "kl" not in out.metrics and out.metrics.keys() == base.metrics.keys()
    assert torch.equal(out.loss, base.loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_base))
    assert all(torch.equal(out.metrics[k], base.metrics[k]) for k in base.metrics)


def test_sequence_level_blocks_hold_whole_rows_and_fill_chunk_size():
    """At sequence level a block holds whole rows (a row's ratio needs all its tokens) and takes rows in order
    until the next would overflow chunk_size; a row longer than chunk_size gets a block of its own. Rows of
    lengths 3, 0, 5, 2, 4, 1, 9 with chunk_size 6, worked out by that rule: [rows 0-1: 3 tokens], [row 2: 5],
    [rows 3-4: 6], [row 5: 1], [row 6: 9]. One row per block would give the same numbers with more, smaller GEMMs;
    token level cuts the 24 valid tokens into blocks of 6."""
    from cfpo_loss.aggregation import GlobalBatch
    from cfpo_loss.fused import FusedConfig, make_layout, make_plan

    lengths = [3, 0, 5, 2, 4, 1, 9]
    bsz, seq, vocab, width = len(lengths), 10, 16, 4
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    targets = torch.zeros(bsz, seq, dtype=torch.long)

    def blocks(ratio_level):
        config = FusedConfig.build(
            objective="cfpo", eps_low=0.2, eps_high=None, dual_clip=None, agg="token-mean", ratio_level=ratio_level,
            temperature=1.0, beta=0.0, check_finite=True, compute_entropy=False,
            global_batch=GlobalBatch(),
        )  # fmt: skip
        plan = make_plan(config, torch.zeros(bsz, seq, width), torch.zeros(vocab, width), None, targets,
                         torch.zeros(bsz, seq), torch.ones(bsz), mask, None, None, 6)  # fmt: skip
        return [(b.start, b.end, None if b.rows is None else (b.rows.start, b.rows.stop))
                for b in make_layout(plan, targets, vocab).blocks]  # fmt: skip

    assert blocks("sequence") == [(0, 3, (0, 2)), (3, 8, (2, 3)), (8, 14, (3, 5)), (14, 15, (5, 6)), (15, 24, (6, 7))]
    assert blocks("token") == [(0, 6, None), (6, 12, None), (12, 18, None), (18, 24, None)]
