"""The SkyRL loss path against SkyRL's own losses and against the paper's equation.

Clip mode of the same code path (``make_policy_loss("clip")``) must equal SkyRL's ``ppo_policy_loss``: the same
fp32 ratio (clamp ±20, exp), the same per-token min, the IS weight times the 0/1 rejection mask (tis·m equals
(ℓ·tis)·m exactly for m ∈ {0, 1}): the metrics and the gradient are bit-equal; the loss differs only by the order
of the final fp32 sum (SkyRL sums all B·T products at once, the core sums rows first), bounded below.
"""

from __future__ import annotations

import pytest
import torch
from skyrl_helpers import (
    CORRECTIONS,
    REDUCTIONS,
    U,
    algorithm,
    batch,
    fp32_bounds,
    oracle,
    oracle_weights,
    paper_objective,
    scaled,
)

from cfpo_loss import reference
from cfpo_loss.adapters.skyrl import LOSSES, compute_policy_loss_cfpo, compute_policy_loss_cfpo_seq, make_policy_loss

CLIP = make_policy_loss("clip")
CLIP_SEQ = make_policy_loss("clip", "sequence")
# the rounding-bound comparisons below run again under CI's second rounding (scalar kernels, one thread)
pytestmark = pytest.mark.rounding


def _record(family: str, ratio: float) -> None:
    """Into the suite's error/bound record (the run's summary line prints the largest)."""
    reference._RATIOS.append((ratio, f"skyrl {family}"))


def _sum_bound(per_token_loss: torch.Tensor) -> float:
    """Two fp32 sums of the same n products in different orders differ by at most 2(n − 1)·u·Σ|x|."""
    n = per_token_loss.numel()
    return 2 * (n - 1) * U * per_token_loss.double().abs().sum().item()


@pytest.mark.parametrize("correction", list(CORRECTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_clip_mode_equals_skyrl_regular(reduction, correction):
    from skyrl.backends.skyrl_train.utils.off_policy_correction_utils import apply_off_policy_correction
    from skyrl.backends.skyrl_train.utils.ppo_utils import ppo_policy_loss

    log_probs, old, rollout, advantages, mask = batch(1)
    advantages = scaled(advantages, mask, reduction)
    cfg = algorithm("regular", correction, reduction)
    theirs, their_metrics = ppo_policy_loss(log_probs, old, advantages, cfg, mask, rollout)
    ours, our_metrics = CLIP(log_probs, old, advantages, cfg, mask, rollout)
    (their_grad,) = torch.autograd.grad(theirs, log_probs)
    (our_grad,) = torch.autograd.grad(ours, log_probs)

    assert torch.equal(our_grad, their_grad)
    assert their_metrics == {k: our_metrics[k] for k in their_metrics}  # clip_ratio and every off-policy metric
    assert our_metrics["clip_ratio"] == our_metrics["cfpo/tr_exit_frac"] > 0
    # the per-token products both sums add (SkyRL's, recomputed with its own correction)
    ratio = torch.exp((log_probs.detach() - old).clamp(-20, 20))
    per_token = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.28) * advantages)
    per_token, kept, _ = apply_off_policy_correction(per_token, old, rollout, mask, cfg.off_policy_correction)
    bound = _sum_bound(per_token * kept)
    error = (ours - theirs).abs().item()
    assert error <= bound, (error, bound)
    _record("clip vs SkyRL loss (summation order)", error / bound)
    if correction != "none":
        assert set(their_metrics) > {"clip_ratio"}  # the correction ran and its metrics came through


def test_clip_mode_without_rollout_logprobs_equals_skyrl():
    from skyrl.backends.skyrl_train.utils.ppo_utils import ppo_policy_loss

    log_probs, old, _, advantages, mask = batch(2)
    cfg = algorithm("regular", "tis_token")  # a correction configured, but no rollout log-probs: SkyRL skips it
    theirs, their_metrics = ppo_policy_loss(log_probs, old, advantages, cfg, mask, None)
    ours, our_metrics = CLIP(log_probs, old, advantages, cfg, mask, None)
    assert set(their_metrics) == {"clip_ratio"} and their_metrics["clip_ratio"] == our_metrics["clip_ratio"]
    assert torch.equal(*(torch.autograd.grad(x, log_probs)[0] for x in (ours, theirs)))


@pytest.mark.parametrize("correction", ["none", "tis_sequence+product_mask"])
def test_sequence_clip_mode_equals_skyrl_gspo(correction):
    """cfpo_seq's clip mode against SkyRL's gspo where the two are the same objective: advantages and IS weights
    constant along each sequence (GRPO's outcome advantages, sequence-level TIS); then every token's gradient is the
    same in GSPO-token and in the sequence ratio exp(mean_t log r)."""
    from skyrl.backends.skyrl_train.utils.ppo_utils import gspo_policy_loss

    log_probs, old, rollout, advantages, mask = batch(3, per_token_advantages=False, spread=0.6)
    advantages = scaled(advantages, mask, "sequence_mean")
    cfg = algorithm("gspo", correction, "sequence_mean")
    theirs, their_metrics = gspo_policy_loss(log_probs, old, advantages, cfg, mask, rollout)
    ours, our_metrics = CLIP_SEQ(log_probs, old, advantages, cfg, mask, rollout)
    assert their_metrics == {k: our_metrics[k] for k in their_metrics}
    assert 0 < our_metrics["clip_ratio"] < 1
    (their_grad,) = torch.autograd.grad(theirs, log_probs)
    (our_grad,) = torch.autograd.grad(ours, log_probs)
    # the gradient takes different fp32 routes (GSPO-token: r_t per token; here the row's mean over n tokens)
    scale = their_grad.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=(scale * 64 * U).max().item())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=_sum_bound(theirs.detach().reshape(1)) + 1e-7)


# ---------------------------------------------------------------------------------- CFPO: the paper's equation
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("correction", ["none", "tis_token", "geo_mask"])
def test_cfpo_equals_the_paper_in_float64(reduction, correction):
    """The registered ``cfpo`` on SkyRL's scaled advantages equals −Σ scale·w·J(r, A) computed here in float64 with
    the raw advantages and each reduction's own definition: so the advantage scaling is right for CFPO too. The
    bounds are fp32_bounds' (skyrl_helpers.py: the standard rounding model along each path)."""
    log_probs, old, rollout, advantages, mask = batch(4)
    cfg = algorithm("cfpo", correction, reduction)
    if correction == "geo_mask":  # a rejection decided the same way in fp32 and float64, and not all-or-nothing
        geo = torch.exp(((old - rollout) * mask).sum(-1) / mask.sum(-1))
        assert ((geo - 0.9).abs().min() > 1e-3) and ((geo - 1.1).abs().min() > 1e-3)
        assert 0 < ((geo < 0.9) | (geo > 1.1)).sum() < len(geo)
    weights = oracle_weights(old, rollout, mask, correction)
    log_is = (old - rollout) if correction == "tis_token" else None
    ours, metrics = compute_policy_loss_cfpo(log_probs, old, scaled(advantages, mask, reduction), cfg, mask, rollout)
    (grad,) = torch.autograd.grad(ours, log_probs)
    loss64, grad64 = oracle(log_probs, old, advantages, mask, reduction, weights)
    loss_bound, grad_bound = fp32_bounds(log_probs, old, advantages, mask, reduction, weights, log_is)
    error = (ours.double() - loss64).abs()
    assert error <= loss_bound, (error, loss_bound)
    grad_error = (grad.double() - grad64).abs()
    assert (grad_error <= grad_bound).all(), (grad_error / grad_bound.clamp(min=1e-300)).max()
    _record("cfpo vs float64 loss", (error / loss_bound).item())
    _record("cfpo vs float64 gradient", (grad_error / grad_bound.clamp(min=1e-300)).max().item())
    assert metrics["cfpo/penalty"] > 0 and 0 < metrics["clip_ratio"] < 1


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_cfpo_seq_equals_the_paper_with_the_sequence_ratio(reduction):
    log_probs, old, rollout, advantages, mask = batch(5, per_token_advantages=False, spread=0.2)
    cfg = algorithm("cfpo_seq", "none", reduction)
    ours, _ = compute_policy_loss_cfpo_seq(log_probs, old, scaled(advantages, mask, reduction), cfg, mask, rollout)
    (grad,) = torch.autograd.grad(ours, log_probs)
    weights = mask.double()
    loss64, grad64 = oracle(log_probs, old, advantages, mask, reduction, weights, sequence=True)
    loss_bound, grad_bound = fp32_bounds(log_probs, old, advantages, mask, reduction, weights, sequence=True)
    error = (ours.double() - loss64).abs()
    assert error <= loss_bound, (error, loss_bound)
    grad_error = (grad.double() - grad64).abs()
    assert (grad_error <= grad_bound).all()
    _record("cfpo_seq vs float64 loss", (error / loss_bound).item())
    _record("cfpo_seq vs float64 gradient", (grad_error / grad_bound.clamp(min=1e-300)).max().item())


def test_fully_async_ratio_at_the_loss():
    """What the loss sees in SkyRL's fully-async trainer: log π_old recomputed at the step equals log π_θ at its
    first update (r = 1), the staleness is in rollout_logprobs. With the correction on, CFPO is then exactly the
    IS-weighted policy gradient −Σ w·A (penalty 0), and the ratio metrics say r = 1 while SkyRL's is_ratio_* say
    how stale the rollout was."""
    log_probs, _, rollout, advantages, mask = batch(6)
    old = log_probs.detach().clone()  # π_old recomputed by the trainer's forward pass: the current policy
    cfg = algorithm("cfpo", "tis_token")
    advantages = scaled(advantages, mask, "token_mean")
    loss, metrics = compute_policy_loss_cfpo(log_probs, old, advantages, cfg, mask, rollout)
    (grad,) = torch.autograd.grad(loss, log_probs)
    w = torch.exp((old - rollout).double()).clamp(max=1.5) * mask.double()
    expected = -(w * advantages.double()).sum()
    assert abs(loss.double() - expected) <= 2 * mask.sum() * U * (w * advantages.double()).abs().sum()
    torch.testing.assert_close(grad.double(), -(w * advantages.double()), rtol=8 * U, atol=0)
    assert metrics["cfpo/ratio_mean"] == metrics["cfpo/ratio_min"] == metrics["cfpo/ratio_max"] == 1.0
    assert metrics["cfpo/penalty"] == 0.0 and metrics["clip_ratio"] == 0.0
    assert metrics["is_ratio_max"] > 1.5 and metrics["tis_token_clip_high_ratio"] > 0  # the staleness, SkyRL's keys


def test_the_objective_has_its_maximum_at_the_trust_region_edge():
    """A sanity anchor for the oracle itself: J peaks at r* = 1 + ε_high (A > 0) and 1 − ε_low (A < 0)."""
    r = torch.linspace(0.5, 1.5, 100001, dtype=torch.float64)
    for a, edge in ((1.0, 1.28), (-1.0, 0.8)):
        assert abs(r[paper_objective(r, torch.full_like(r, a)).argmax()].item() - edge) < 1e-4


# ------------------------------------------------------------------------------------------ options and inputs
def test_metric_keys_follow_the_table():
    from cfpo_loss.adapters._metric_names import EVERY_CORE_METRIC, framework_keys
    from cfpo_loss.metrics import metric_names

    log_probs, old, rollout, advantages, mask = batch(7)
    _, metrics = compute_policy_loss_cfpo(log_probs, old, advantages, algorithm("cfpo"), mask, rollout)
    core = metric_names(dual_clip=False, penalty=True)
    assert framework_keys("skyrl") == {"tr_exit_frac": "clip_ratio"}
    assert set(metrics) == {"clip_ratio"} | {EVERY_CORE_METRIC["skyrl"] + name for name in core}
    assert all(isinstance(v, float) for v in metrics.values())
    # SkyRL's worker sums metrics named "loss" / "*_loss" over micro-batches: none of ours may be
    assert not any(k == "loss" or k.endswith("_loss") for k in metrics)


def test_dual_clip_bound_is_refused_by_name():
    log_probs, old, rollout, advantages, mask = batch(8)
    for fn in LOSSES.values():
        with pytest.raises(ValueError, match=r"trainer\.algorithm\.clip_ratio_c=5\.0 has no meaning"):
            fn(log_probs, old, advantages, algorithm("cfpo", clip_ratio_c=5.0), mask, rollout)
    fn(log_probs, old, advantages, algorithm("cfpo", clip_ratio_c=3.0), mask, rollout)  # SkyRL's default: fine


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(eps_clip_low=1.2), r"trainer\.algorithm\.eps_clip_low must lie in \(0, 1\)"),
        (lambda a: a.update(eps_clip_high=0.0), r"trainer\.algorithm\.eps_clip_high must be > 0"),
        (lambda a: a.update(old=a["old"][:, :-1]), r"old_log_probs must have the shape of log_probs \(8, 12\)"),
        (lambda a: a.update(rollout=a["rollout"][:1]), r"rollout_logprobs must have the shape of log_probs"),
        (lambda a: a.update(advantages=a["advantages"][:, :5]), r"advantages must be \(B,\), \(B, 1\) or \(B, T\)"),
        (lambda a: a["log_probs"].data.__setitem__((0, 0), float("nan")), r"log_prob holds 1 non-finite"),
        (lambda a: a["rollout"].__setitem__((0, 0), float("nan")), r"weights holds 1 non-finite"),
        (lambda a: a.update(mask=a["mask"] * 2), r"mask must be bool or hold only 0 and 1"),
    ],
)
def test_bad_input_gets_a_clear_error(change, match):
    log_probs, old, rollout, advantages, mask = batch(9)
    args = {"log_probs": log_probs, "old": old, "rollout": rollout, "advantages": advantages, "mask": mask,
            "eps_clip_low": 0.2, "eps_clip_high": 0.28}  # fmt: skip
    change(args)
    cfg = algorithm("cfpo", "tis_token", eps_clip_low=args["eps_clip_low"], eps_clip_high=args["eps_clip_high"])
    with pytest.raises(ValueError, match=match):
        compute_policy_loss_cfpo(args["log_probs"], args["old"], args["advantages"], cfg, args["mask"], args["rollout"])


def test_no_loss_mask_means_every_token():
    log_probs, old, rollout, advantages, _ = batch(10)
    ones = torch.ones_like(old)
    with_mask, m1 = compute_policy_loss_cfpo(log_probs, old, advantages, algorithm("cfpo"), ones, rollout)
    without, m2 = compute_policy_loss_cfpo(log_probs, old, advantages, algorithm("cfpo"), None, rollout)
    assert torch.equal(with_mask, without) and m1 == m2
