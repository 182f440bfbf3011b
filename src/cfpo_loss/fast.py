"""Opt-in fast path: forward and analytic backward of compute_policy_loss in one pass.

The default path lets autograd record every elementwise op (ratio, clamp, surrogate, where, sum) and
replay them backwards. Here the forward computes the loss, the metrics and the per-token gradient
dL/dlog π together, from the analytic derivatives in ``surrogates.py`` and the aggregation weight of
``aggregation.aggregation_scale`` (known before the loss is); the backward is one multiply. With
``compile=True`` (the default) that forward is compiled by ``torch.compile`` into a few fused loops.

Same inputs, same outputs, same checks as compute_policy_loss (the tests hold both to 1e-6).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .metrics import trust_region_metrics
from .surrogates import objective_and_grad

LOG_RATIO_CLAMP = 20.0


def fast_forward(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    scale: Tensor,
    weights: Tensor | None,
    objective: str,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    ratio_level: str,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(loss, dL/dlog_prob, ratio, metrics, checksum). Inputs already checked, cast and (B, T)-shaped.

    ``checksum`` sums the selected log-ratios, advantages and weights: finite iff every valid entry is
    (or a sum overflowed), so the caller's finiteness check costs no extra pass."""
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    raw = torch.where(mask, log_prob - old_log_prob, zero)
    log_ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    passes = mask & (raw.abs() <= LOG_RATIO_CLAMP)  # where clamp lets the gradient through
    advantages = torch.where(mask, advantages, zero)
    checksum = raw.sum() + advantages.sum()
    weight = scale
    if weights is not None:
        weights = torch.where(mask, weights, zero)
        checksum = checksum + weights.sum()
        weight = scale * weights
    if ratio_level == "sequence":
        n = mask.sum(-1, keepdim=True).clamp(min=1)
        ratio = torch.where(mask, (log_ratio.sum(-1, keepdim=True) / n).exp(), zero + 1.0)
    else:
        ratio = log_ratio.exp()
    j, dj_dr = objective_and_grad(objective, ratio, advantages, eps_low, eps_high, dual_clip)
    loss = -(j * weight).sum()
    dl_dr = -dj_dr * weight
    if ratio_level == "sequence":  # r_seq = exp(mean_t log r_t): d r_seq / d log π_t = r_seq / n
        grad = torch.where(passes, (dl_dr * ratio).sum(-1, keepdim=True) / n, zero)
    else:
        grad = torch.where(passes, dl_dr * ratio, zero)
    metrics = trust_region_metrics(
        ratio, log_ratio, advantages, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, objective=objective
    )
    return loss, grad, ratio, metrics, checksum


@functools.lru_cache(maxsize=1)
def _compiled_forward():
    return torch.compile(fast_forward, dynamic=None)


class _WithGradient(torch.autograd.Function):
    """Returns ``value`` unchanged; its gradient w.r.t. ``log_prob`` is the precomputed ``grad``."""

    @staticmethod
    def forward(ctx, value: Tensor, log_prob: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        (grad,) = ctx.saved_tensors
        return None, grad_value * grad, None


def fast_policy_loss(log_prob, old_log_prob, advantages, mask, scale, weights, options, compile: bool):
    """Run the one-pass forward (compiled or eager) and attach its analytic gradient to log_prob.
    Returns (loss, ratio, metrics, checksum)."""
    fn = _compiled_forward() if compile else fast_forward
    with torch.no_grad():
        loss, grad, ratio, metrics, checksum = fn(
            log_prob.detach(), old_log_prob, advantages, mask, scale, weights, *options
        )
    if log_prob.requires_grad:
        loss = _WithGradient.apply(loss, log_prob, grad.to(log_prob.dtype))
    return loss, ratio, {k: v.float() for k, v in metrics.items()}, checksum
