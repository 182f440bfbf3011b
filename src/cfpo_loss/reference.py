"""Both objectives on one screen, in plain autograd: the math to read, and the oracle the tests hold every path to.

Nothing here is fast or checked; ``compute_policy_loss`` (eager, compiled) and ``fused_linear_policy_loss`` are.
This file shares no code with them, so a test that compares them with it compares two independent writings.

    r      = π_θ / π_old = exp(log π_θ − log π_old)            (sequence level, GSPO: exp(mean_t log r_t) per row)
    J_CFPO = r·A − |A| / (2ε) · (r − 1)²                        ε = eps_high where A > 0, eps_low where A < 0
    J_clip = min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A)      dual-clip c: max(J_clip, c·A) where A < 0
    loss   = −aggregate(J)                                      (verl's agg_loss modes, below)
"""

from __future__ import annotations

import torch
from torch import Tensor


def ratio(log_prob: Tensor, old_log_prob: Tensor, mask: Tensor, ratio_level: str = "token") -> Tensor:
    log_ratio = torch.where(mask, log_prob - old_log_prob, 0.0).clamp(-20.0, 20.0)  # as verl / OpenRLHF clamp
    if ratio_level == "sequence":
        per_row = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return torch.where(mask, per_row.exp().expand_as(log_ratio), 1.0)
    return log_ratio.exp()


def cfpo_objective(r: Tensor, advantages: Tensor, eps_low: float = 0.2, eps_high: float | None = None) -> Tensor:
    eps_high = eps_low if eps_high is None else eps_high
    eps = advantages.new_full(advantages.shape, eps_low).masked_fill(advantages > 0, eps_high)
    return r * advantages - advantages.abs() / (2 * eps) * (r - 1) ** 2


def clip_objective(
    r: Tensor, advantages: Tensor, eps_low: float = 0.2, eps_high: float | None = None, dual_clip: float | None = None
) -> Tensor:
    eps_high = eps_low if eps_high is None else eps_high
    objective = torch.min(r * advantages, r.clamp(1 - eps_low, 1 + eps_high) * advantages)
    if dual_clip is not None:
        objective = torch.where(advantages < 0, torch.max(objective, dual_clip * advantages), objective)
    return objective


def aggregate(per_token: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """verl's agg_loss on one (unsharded) batch; rows with no valid token count as no sequence."""
    per_token = torch.where(mask, per_token, 0.0)
    rows = mask.sum(-1)
    n_rows = (rows > 0).sum().clamp(min=1)
    if mode == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    if mode == "token-sum":
        return per_token.sum()
    if mode == "seq-mean-token-sum":
        return per_token.sum(-1).sum() / n_rows
    if mode == "seq-mean-token-mean":
        return (per_token.sum(-1) / rows.clamp(min=1)).sum() / n_rows
    if mode == "seq-mean-token-sum-norm":
        return per_token.sum(-1).sum() / n_rows / mask.shape[-1]
    raise ValueError(f"unknown aggregation {mode!r}")


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    objective: str = "cfpo",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ratio_level: str = "token",
) -> Tensor:
    """The loss to minimise; differentiate it with autograd. ``advantages``: (B,) or (B, T); ``mask`` bool."""
    mask = mask.bool()
    advantages = advantages.reshape(mask.shape[0], -1).expand(mask.shape)
    advantages = torch.where(mask, advantages, 0.0)
    r = ratio(log_prob, old_log_prob, mask, ratio_level)
    if objective == "cfpo":
        objective_per_token = cfpo_objective(r, advantages, eps_low, eps_high)
    elif objective == "clip":
        objective_per_token = clip_objective(r, advantages, eps_low, eps_high, dual_clip)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return aggregate(-objective_per_token, mask, agg)
