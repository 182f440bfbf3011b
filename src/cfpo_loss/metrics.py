"""Trust-region statistics, computed the same way for every objective so runs compare side by side.

All are masked means over valid tokens (detached 0-dim fp32 tensors; no device sync here):

    ratio_mean, ratio_min, ratio_max   the ratio r as the objective used it
    ratio_dev                          mean |r − 1|
    tr_exit_high                       A > 0 and r > 1 + eps_high   (TRL clip_ratio/high_mean)
    tr_exit_low                        A < 0 and r < 1 − eps_low    (TRL clip_ratio/low_mean)
    tr_exit_frac                       their sum: for clip exactly the frameworks' clip fraction
                                       (verl pg_clipfrac, OpenRLHF clip_ratio, TRL clip_ratio/region_mean)
    dual_clip_frac                     A < 0 and r > dual_clip (verl pg_clipfrac_lower), if dual_clip set
    approx_kl_k1                       mean(log π_old − log π_θ) from the clamped token log-ratio (verl ppo_kl)
    approx_kl_k3                       mean(r − 1 − log r), Schulman's non-negative estimator
    penalty                            CFPO only: mean |A|/(2ε)·(r − 1)²

A batch with no valid token reports 0 for the means and 1 for ratio_min / ratio_max.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .surrogates import cfpo_penalty


@torch.no_grad()
def trust_region_metrics(
    ratio: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    objective: str = "cfpo",
    penalty: Tensor | None = None,
    ratio_level: str = "token",
    select=None,
) -> dict[str, Tensor]:
    """Metrics above. ``ratio``, ``log_ratio`` (token level), ``advantages``: (B, T) with masked positions
    neutral (ratio 1, log_ratio 0, advantages 0), so every per-token term is already 0 there and the
    masked means need no further select; ``mask``: bool (B, T). ``penalty``: the per-token CFPO penalty
    if the caller already has it (else computed here for objective "cfpo"). At ``ratio_level`` "token",
    ratio = exp(log_ratio), which lets k3 come from sums the other metrics need anyway. ``select``: the
    caller's ``onepass.Select`` for ``mask``, if it has one (a faster ``where``)."""
    count = torch.count_nonzero(mask).clamp(min=1).to(ratio.dtype)
    deviation = ratio - 1.0  # 0 at masked positions
    positive, negative = advantages > 0, advantages < 0
    exit_high = torch.count_nonzero(positive & (ratio > 1.0 + eps_high))
    exit_low = torch.count_nonzero(negative & (ratio < 1.0 - eps_low))
    any_valid = mask.any()
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    # at token level k3 = mean(r − 1 − log r) is the difference of these two sums
    deviation_sum = deviation.sum()
    log_ratio_sum = log_ratio.sum()
    if ratio_level == "token":
        k3 = ((deviation_sum - log_ratio_sum) / count).clamp(min=0.0)
    else:  # the objective used the sequence ratio; k3 is still the token-level KL estimate
        k3 = (torch.expm1(log_ratio) - log_ratio).sum() / count
    metrics = {
        "ratio_mean": deviation_sum / count + 1.0,
        "ratio_min": torch.where(any_valid, _fill(ratio, mask, select, torch.inf).min(), one),
        "ratio_max": torch.where(any_valid, _fill(ratio, mask, select, -torch.inf).max(), one),
        "ratio_dev": deviation.abs().sum() / count,
        "tr_exit_frac": (exit_high + exit_low) / count,
        "tr_exit_low": exit_low / count,
        "tr_exit_high": exit_high / count,
        "approx_kl_k1": -log_ratio_sum / count,
        "approx_kl_k3": k3,
    }
    if dual_clip is not None:
        metrics["dual_clip_frac"] = torch.count_nonzero(negative & (ratio > dual_clip)) / count
    if objective == "cfpo":
        if penalty is None:
            penalty = cfpo_penalty(ratio, advantages, eps_low, eps_high)
        metrics["penalty"] = penalty.sum() / count
    return {k: v.float() for k, v in metrics.items()}


def _fill(x: Tensor, mask: Tensor, select, value: float) -> Tensor:
    return select.fill(x, value) if select is not None else torch.where(mask, x, value)
