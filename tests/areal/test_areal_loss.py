"""``policy_loss_fn`` against the installed AReaL's own ``ppo_actor_loss_fn`` (clip) and against the paper's equation
computed here in float64 (cfpo), over AReaL's options: the decoupled loss on / off, rejection sampling (mask and
clamp, token and sequence level), ``eps_clip_higher``, ``c_clip``, token and sequence importance sampling, the padded
2-D and the packed 1-D (``cu_seqlens``) layouts.

Reference values never come from the adapter or the core: the clip reference is AReaL's function, the cfpo
reference is the equation below written out with autograd in float64 on π_θ / π_prox times AReaL's behaviour weight
(AReaL's ``apply_rejection_sampling`` decides which tokens survive and their weight π_prox / π_behave: that is
AReaL's definition of the filter, not CFPO math).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from areal.api.cli_args import RejectionSamplingConfig
from areal.utils.functional.functional import apply_rejection_sampling, ppo_actor_loss_fn
from areal_helpers import loss_batch, packed

from cfpo_loss import reference
from cfpo_loss.adapters.areal import policy_loss_fn

EPS32 = torch.finfo(torch.float32).eps
U32 = reference.SAFETY * reference.UNIT_ROUNDOFF[torch.float32]
REJECTION = {
    "none": None,
    "token-mask": RejectionSamplingConfig(level="token", action="mask", metric="ratio", upper=1.6, lower=0.6),
    "seq-clamp": RejectionSamplingConfig(level="sequence", action="clamp", metric="ratio", upper=1.1),
    "seq-mask-k3": RejectionSamplingConfig(level="sequence", action="mask", metric="kl_k3", agg="max", upper=0.23),
}


def make_inputs(seed, *, decoupled, layout, garbage=False):
    batch = loss_batch(seed, garbage=garbage)
    if not decoupled:  # without the decoupled loss AReaL passes π_old as the proximal policy too
        batch["proximal_logprobs"] = batch["old_logprobs"].clone()
    if layout == "packed":
        batch, cu = packed(batch)
        return batch, cu
    return batch, None


def call(fn, batch, cu_seqlens, **options):
    """Call a ppo_actor_loss_fn-shaped function as grpo_loss_fn does; (loss, d loss / d logprobs, stat)."""
    logprobs = batch["logprobs"].clone().requires_grad_(True)
    tensors = {k: batch[k] for k in ("proximal_logprobs", "old_logprobs", "advantages", "loss_mask")}
    loss, stat = fn(logprobs=logprobs, cu_seqlens=cu_seqlens, **tensors, **options)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.detach(), grad, stat


CASES = list(itertools.product(["token", "sequence"], ["padded", "packed"], [True, False], sorted(REJECTION)))


def clip_bound(batch, eps_low, eps_high, level, rs):
    """``cfpo_loss.reference.policy_loss_bound`` for the clipped objective on what both implementations evaluate:
    AReaL's surviving mask and behaviour weight, the per-sequence mean advantage at sequence level, each valid token
    weighted 1/N with N the count before rejection. Two fp32 evaluations lie within twice it."""
    mask0 = batch["loss_mask"].bool()
    mask, weight = mask0, None
    if rs is not None:
        out = apply_rejection_sampling(batch["proximal_logprobs"], batch["old_logprobs"], batch["loss_mask"], None, rs)
        mask, weight = out.loss_mask.bool(), out.behave_imp_weight
    adv, adv_error = batch["advantages"].double(), None
    if level == "sequence":  # each evaluation takes the row's mean advantage in fp32: n additions and a division
        n = mask.sum(-1, keepdim=True).clamp(min=1)
        total = torch.where(mask, adv, 0.0).sum(-1, keepdim=True)
        adv = (total / n).expand_as(adv)
        adv_error = (n + 1) * reference.UNIT_ROUNDOFF[torch.float32] * torch.where(
            mask, batch["advantages"].double().abs(), 0.0).sum(-1, keepdim=True) / n  # fmt: skip
    coef = torch.full(mask.shape, 1.0, dtype=torch.float64) / mask0.sum().clamp(min=1)
    bound = reference.policy_loss_bound(batch["logprobs"], batch["proximal_logprobs"], adv, mask, objective="clip",
                                        eps_low=eps_low, eps_high=eps_high, ratio_level=level, weights=weight,
                                        coef=coef, advantage_error=adv_error)  # fmt: skip
    return bound, (torch.ones(mask.shape) if weight is None else weight).double()


@pytest.mark.rounding
@pytest.mark.parametrize("level,layout,decoupled,rs", CASES)
@pytest.mark.parametrize("eps_clip_higher", [None, 0.28])
@pytest.mark.parametrize("c_clip", [None, 3.0])
def test_clip_reproduces_ppo_actor_loss_fn(level, layout, decoupled, rs, eps_clip_higher, c_clip):
    padded, _ = make_inputs(1, decoupled=decoupled, layout="padded")
    bound, weight = clip_bound(padded, 0.2, eps_clip_higher, level, REJECTION[rs])
    batch, cu = (padded, None) if layout == "padded" else packed(padded)
    options = dict(eps_clip=0.2, eps_clip_higher=eps_clip_higher, c_clip=c_clip, rejection_sampling=REJECTION[rs],
                   importance_sampling_level=level)  # fmt: skip
    loss_ref, grad_ref, stat_ref = call(ppo_actor_loss_fn, batch, cu, **options)
    loss, grad, stat = call(policy_loss_fn, batch, cu, objective="clip", **options)
    shape, what = padded["loss_mask"].shape, f"areal clip {level} {layout} {decoupled} {rs}"
    # two fp32 evaluations of the same loss in a different order: within twice the derived bound (the dual clip only
    # flattens the objective, which the clip bound already covers)
    reference.assert_within(loss, loss_ref, 2 * bound.loss, f"{what} loss")
    reference.assert_within(grad.reshape(shape), grad_ref.reshape(shape), 2 * bound.grad, f"{what} grad")
    assert set(stat) == set(stat_ref)
    valid = batch["loss_mask"]  # what AReaL's stats tracker reads (its n_valid_tokens denominator)
    per_token = {  # the derived bound of each float stat, per token (2-D), twice: two fp32 evaluations
        "importance_weight": 2 * bound.ratio,
        "loss": 2 * (weight * bound.objective + U32 * stat_ref["loss"].reshape(shape).double().abs()),
    }
    for key, ref in stat_ref.items():
        ours = stat[key]
        if not torch.is_tensor(ref):
            assert ours == ref, key
        elif key in per_token:  # AReaL's per-token loss holds junk at masked positions (its tracker never reads them)
            sel = valid.reshape(shape)
            got, want = ours.reshape(shape)[sel], ref.reshape(shape)[sel]
            reference.assert_within(got, want, per_token[key][sel], f"{what} {key}")
        else:  # masks, and log-ratios / weights computed by the same formula from the same inputs: exact
            assert torch.equal(ours, ref), key
    # the data exercises what is compared
    assert stat_ref["clip_mask"].any() and not stat_ref["clip_mask"].all()
    if c_clip is not None and level == "token" and rs == "none":  # rejection may filter the dual-clipped tokens
        assert stat_ref["dual_clip_mask"].any()
    if rs in ("token-mask", "seq-mask-k3") and decoupled:  # without it π_prox = π_behave: nothing to filter
        assert 0.0 < stat_ref["filtered_fraction"] < 1.0


def test_clip_with_dual_clip_differs_from_without():
    """c_clip reaches the core's dual clip (a translation that dropped it would still pass without c_clip)."""
    batch, _ = make_inputs(1, decoupled=True, layout="padded")
    _, with_dual, _ = call(policy_loss_fn, batch, None, objective="clip", eps_clip=0.2, c_clip=3.0)
    _, without, _ = call(policy_loss_fn, batch, None, objective="clip", eps_clip=0.2)
    assert not torch.equal(with_dual, without)


# ---- cfpo: the paper's equation in float64 ---------------------------------------------------------------------


def cfpo_oracle(batch, eps_low, eps_high, level, rs):
    """J = r·A − |A|/(2ε)·(r − 1)², ε = eps_high where A > 0 and eps_low where A < 0, r = π_θ / π_prox (token) or
    exp(mean_t log r_t) per sequence with the sequence's mean advantage (GSPO); per-token loss −J · w (w: AReaL's
    behaviour weight π_prox / π_behave under rejection sampling, 0 for rejected tokens); loss = Σ_valid / N with N
    the valid tokens before rejection. Returns (loss, gradient, and the float64 pieces the error bound needs)."""
    mask0 = batch["loss_mask"].bool()
    mask, w = mask0, torch.ones(mask0.shape, dtype=torch.float64)
    if rs is not None:
        out = apply_rejection_sampling(batch["proximal_logprobs"], batch["old_logprobs"], batch["loss_mask"], None, rs)
        mask, w = out.loss_mask.bool(), out.behave_imp_weight.double()
    lp = batch["logprobs"].double().requires_grad_(True)
    prox, adv = batch["proximal_logprobs"].double(), batch["advantages"].double()
    d = torch.where(mask, lp - prox, 0.0)
    n_row = mask.sum(-1, keepdim=True).clamp(min=1)
    if level == "sequence":
        ratio = (d.sum(-1, keepdim=True) / n_row).exp().expand_as(d)
        adv = (torch.where(mask, adv, 0.0).sum(-1, keepdim=True) / n_row).expand_as(d)
    else:
        ratio = d.exp()
    eps = torch.where(adv > 0, eps_high, eps_low)
    objective = ratio * adv - adv.abs() / (2 * eps) * (ratio - 1) ** 2
    n = mask0.sum().clamp(min=1)
    loss = torch.where(mask, -objective * w, 0.0).sum() / n
    (grad,) = torch.autograd.grad(loss, lp)
    pieces = dict(r=ratio.detach(), a=adv.abs(), eps=eps, w=torch.where(mask, w, 0.0), d=d.detach().abs(), n=n,
                  n_row=n_row, j=objective.detach().abs(), valid=mask)  # fmt: skip
    return loss.detach(), grad, pieces


def fp32_error_bound(p, level):
    """How far an fp32 evaluation of the equation can be from the float64 one, derived term by term (ε = 2^-23):

    - the ratio: fl(log π_θ − log π_prox) is exact to ε·|d|, exp adds ε: |Δr| <= r·δ with δ = ε·(1 + |d|) (token);
      for the sequence ratio the mean of |y| log-ratios adds ε·Σ_t|d_t| (the summation bound): δ = ε·(2 + Σ|d|).
    - J = rA − |A|/(2ε_)(r−1)²: its own roundings, <= 4ε·(|A|r + |A|/(2ε_)(r−1)²), plus |dJ/dr|·|Δr| with
      |dJ/dr| <= |A|(1 + |r−1|/ε_) (conditioning: r and |A|/ε_);
    - the loss: Σ over N_valid tokens adds N_valid·ε·Σ|w J| (the naive summation bound), then / N.
    - the gradient d loss / d log π_t = −w·(dJ/dr)·r/N (token), −(r/|y|)·Σ_s w_s (dJ/dr)_s / N (sequence): its own
      roundings <= (6 + |y|)ε·|A| r (1 + (|r−1| + r)/ε_) per term, plus |d(r·dJ/dr)/dr|·|Δr| <= |A|(1 + (2r+1)/ε_)·r·δ.
    """
    r, a, eps, w, n = p["r"], p["a"], p["eps"], p["w"], p["n"]
    if level == "sequence":
        delta = EPS32 * (2 + p["d"].sum(-1, keepdim=True))
        length = p["n_row"]
    else:
        delta = EPS32 * (1 + p["d"])
        length = torch.ones_like(p["n_row"])
    slope = a * (1 + (r - 1).abs() / eps)
    per_token = 4 * EPS32 * (a * r + a / (2 * eps) * (r - 1) ** 2) + slope * r * delta
    n_valid = p["valid"].sum()
    loss_bound = ((w * per_token).sum() + n_valid * EPS32 * (w * p["j"]).sum()) / n
    grad_terms = w * ((6 + length) * EPS32 * a * r * (1 + ((r - 1).abs() + r) / eps)
                      + a * (1 + (2 * r + 1) / eps) * r * delta)  # fmt: skip
    if level == "sequence":
        grad_bound = (r / length) * grad_terms.sum(-1, keepdim=True) / n
    else:
        grad_bound = grad_terms / n
    return loss_bound, torch.where(p["valid"], grad_bound, 0.0) + 1e-30


@pytest.mark.rounding
@pytest.mark.parametrize("level,layout,decoupled,rs", CASES)
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_cfpo_equals_the_paper_equation_float64(level, layout, decoupled, rs, eps):
    batch, _ = make_inputs(2, decoupled=decoupled, layout="padded")
    loss_ref, grad_ref, pieces = cfpo_oracle(batch, eps[0], eps[1], level, REJECTION[rs])
    loss_bound, grad_bound = fp32_error_bound(pieces, level)
    if layout == "packed":
        batch, cu = packed(batch)
    else:
        cu = None
    loss, grad, stat = call(policy_loss_fn, batch, cu, objective="cfpo", eps_clip=eps[0], eps_clip_higher=eps[1],
                            rejection_sampling=REJECTION[rs], importance_sampling_level=level)  # fmt: skip
    grad = grad.reshape(grad_ref.shape).double()
    # bounds: fp32_error_bound (derived above); the largest error seen was 0.066 of it, so a wrong term (a dropped
    # weight, a wrong ε side) cannot hide under it
    what = f"areal cfpo {level} {layout} {decoupled} {rs} {eps}"
    reference.assert_within(loss.double(), loss_ref, loss_bound, f"{what} loss")
    reference.assert_within(grad, grad_ref, grad_bound, f"{what} grad")
    assert torch.isfinite(loss) and stat["clip_mask"].any()  # ratios really leave the trust region


def test_cfpo_departs_from_clip_where_ratios_leave_the_trust_region():
    batch, _ = make_inputs(2, decoupled=True, layout="padded")
    _, g_cfpo, _ = call(policy_loss_fn, batch, None, objective="cfpo", eps_clip=0.2)
    _, g_clip, _ = call(policy_loss_fn, batch, None, objective="clip", eps_clip=0.2)
    assert not torch.allclose(g_cfpo, g_clip)


def test_masked_garbage_never_leaks():
    """NaN / -inf at masked positions (padding) give the same loss and gradient as finite values there."""
    clean, _ = make_inputs(3, decoupled=True, layout="padded")
    dirty, _ = make_inputs(3, decoupled=True, layout="padded", garbage=True)
    rs = REJECTION["token-mask"]
    for objective in ("cfpo", "clip"):
        a = call(policy_loss_fn, clean, None, objective=objective, eps_clip=0.2, rejection_sampling=rs)
        b = call(policy_loss_fn, dirty, None, objective=objective, eps_clip=0.2, rejection_sampling=rs)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- refusals ----------------------------------------------------------------------------------------------------


def test_c_clip_with_cfpo_is_refused_by_name():
    batch, _ = make_inputs(1, decoupled=True, layout="padded")
    with pytest.raises(ValueError, match="c_clip"):
        call(policy_loss_fn, batch, None, objective="cfpo", eps_clip=0.2, c_clip=3.0)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(objective="spo"), "objective"),
        (dict(importance_sampling_level="tokens"), "importance_sampling_level"),
        (dict(eps_clip=1.5), "eps_clip"),
        (dict(eps_clip_higher=-0.1), "eps_clip_higher"),
    ],
)
def test_bad_options_are_refused_by_name(options, match):
    batch, _ = make_inputs(1, decoupled=True, layout="padded")
    with pytest.raises(ValueError, match=match):
        call(policy_loss_fn, batch, None, **{"eps_clip": 0.2, **options})


def test_packed_sequence_level_needs_cu_seqlens():
    batch, _ = make_inputs(1, decoupled=True, layout="packed")
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(policy_loss_fn, batch, None, eps_clip=0.2, importance_sampling_level="sequence")


def test_bad_tensors_get_the_core_errors():
    batch, _ = make_inputs(1, decoupled=True, layout="padded")
    nan = dict(batch, proximal_logprobs=batch["proximal_logprobs"].clone())
    nan["proximal_logprobs"][0, 0] = torch.nan  # a valid position
    with pytest.raises(ValueError, match="non-finite"):
        call(policy_loss_fn, nan, None, eps_clip=0.2)
    short = dict(batch, advantages=batch["advantages"][:, :-1])
    with pytest.raises(ValueError, match="advantages"):
        call(policy_loss_fn, short, None, eps_clip=0.2)
