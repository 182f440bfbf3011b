"""Rounding bounds for the OpenRLHF tests: how far ONE fp32 evaluation of a PolicyLoss.forward (OpenRLHF's, the
adapter's, or the paper's equation written in a test) may lie from the exact value, derived from the computation
(cfpo_loss.reference: first-order forward error times SAFETY). Two fp32 evaluations written differently lie within
twice it of each other; a test asserts that with cfpo_loss.reference.assert_within, which records the error/bound
ratio the suite reports.
"""

from __future__ import annotations

import math

import torch

from cfpo_loss.reference import SAFETY, UNIT_ROUNDOFF, metric_bounds, token_rounding_bound

#: u = SAFETY x fp32's unit roundoff: the bound on one rounding, as reference.py's helpers use it
U = SAFETY * UNIT_ROUNDOFF[torch.float32]


def rounding_bounds(batch, *, token_level_loss=True, info=None, objective="cfpo", ratio_level="token", eps=(0.2, 0.2),
                    is_coef=None, denominator="old_log_probs"):  # fmt: skip
    """``(RoundingBound, {return value name: bound})`` for one fp32 evaluation of PolicyLoss.forward on ``batch``
    (the tests' dict: log_probs, old_log_probs, advantages, action_mask, rollout_log_probs).

    Loss and d loss / d log_probs: reference.token_rounding_bound, each token's coefficient read off OpenRLHF's own
    ``aggregate_loss`` in float64 (linear in the per-token loss: d aggregate / d loss_t) with ``info`` (dp_size,
    batch_num_tokens, global_batch_size), times ``is_coef`` (float64, the IS correction's per-token coefficient, when
    on). Forming the coefficient in fp32 costs 3 roundings (÷ n_i or the token count, ÷ the global count, × dp_size),
    and with the IS correction one product plus the coefficient's own error: exp(old − rollout) (or its clamp) has
    relative error u·(|old − rollout| + 4) (the subtraction and exp), counted as that many roundings. ``denominator``
    the batch key the ratio is taken against (OpenRLHF's gspo with the correction: rollout_log_probs).

    Return values: clip_ratio and is_filter_ratio count units (exact, off the boundaries: the tests keep their ratios
    off them) and divide once, so one rounding of a value <= 1; ppo_kl the masked mean of log_probs − old_log_probs,
    vllm_kl of rollout_log_probs − old_log_probs (reference.metric_bounds' approx_kl_k1: each difference's rounding
    and the sum's)."""
    from openrlhf.models.loss import aggregate_loss

    mask = batch["action_mask"].bool()
    x = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
    agg = aggregate_loss(x, mask.double(), token_level_loss=token_level_loss, **dict(info or {}))
    (coef,) = torch.autograd.grad(agg, x)
    roundings = 3
    if is_coef is not None:
        coef = coef * is_coef.double()
        is_log_ratio = (batch["old_log_probs"].double() - batch["rollout_log_probs"].double())[mask]
        roundings += 1 + math.ceil(float(is_log_ratio.abs().max())) + 4
    lp, den, adv = batch["log_probs"].detach(), batch[denominator], batch["advantages"]
    kw = dict(eps_low=eps[0], eps_high=eps[1])
    bound = token_rounding_bound(lp, den, adv, mask, coef, objective=objective, ratio_level=ratio_level,
                                 coef_roundings=roundings, **kw)  # fmt: skip

    def kl_bound(a, b):  # the masked mean of a − b: metric_bounds' mean of log r with r = exp(a − b)
        d = (a.detach().double() - b.double())[mask]
        return metric_bounds(d.exp(), torch.zeros_like(d), d.abs(), **kw)["approx_kl_k1"]

    a_full = adv.double().expand(mask.shape)
    if ratio_level == "sequence":
        d = torch.where(mask, lp.double() - den.double(), 0.0)
        log_r = (d.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand(mask.shape)
        cond = (d.abs().sum(-1, keepdim=True) + log_r.abs()).expand(mask.shape)
    else:
        log_r = (lp.double() - den.double()).clamp(-20, 20)
        cond = log_r.abs()
    exits = metric_bounds(log_r.exp()[mask], a_full[mask], cond[mask], **kw)["tr_exit_frac"]
    metrics = {
        "clip_ratio": exits,
        "ppo_kl": kl_bound(batch["log_probs"], batch["old_log_probs"]),
        "is_filter_ratio": 2 * U,
    }
    if batch.get("rollout_log_probs") is not None:
        metrics["vllm_kl"] = kl_bound(batch["rollout_log_probs"], batch["old_log_probs"])
    return bound, metrics


def is_coefficient(native_loss_module, is_kwargs, batch):
    """The IS correction's per-token coefficient, read off OpenRLHF's own PolicyLoss: native ppo at r = 1 with A = 1
    and the token mean has d loss / d log_prob = −coef / N (float64 here, so the reading is exact)."""
    mask = batch["action_mask"].bool()
    old = batch["old_log_probs"].double()
    log_probs = old.clone().requires_grad_(True)
    loss = native_loss_module.PolicyLoss(policy_loss_type="ppo", **is_kwargs)(
        log_probs, old, torch.ones_like(old), action_mask=mask, rollout_log_probs=batch["rollout_log_probs"].double()
    )[0]
    (grad,) = torch.autograd.grad(loss, log_probs)
    return -grad * mask.sum()
