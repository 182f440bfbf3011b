"""Trust-region statistics, computed the same way for every objective so runs compare side by side.

All are masked means over valid tokens (detached 0-dim tensors; no device sync here):

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
) -> dict[str, Tensor]:
    """Metrics of §3 of the design. ``ratio``, ``log_ratio`` (token level), ``advantages``: (B, T) with
    masked positions already neutral (ratio 1, log_ratio 0, advantages 0); ``mask``: bool (B, T)."""
    count = mask.sum().clamp(min=1).to(ratio.dtype)

    def mean(x: Tensor) -> Tensor:
        return torch.where(mask, x, 0).sum(dtype=ratio.dtype) / count

    exit_high = (advantages > 0) & (ratio > 1.0 + eps_high)
    exit_low = (advantages < 0) & (ratio < 1.0 - eps_low)
    any_valid = mask.any()
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    metrics = {
        "ratio_mean": mean(ratio),
        "ratio_min": torch.where(any_valid, torch.where(mask, ratio, torch.inf).min(), one),
        "ratio_max": torch.where(any_valid, torch.where(mask, ratio, -torch.inf).max(), one),
        "ratio_dev": mean((ratio - 1.0).abs()),
        "tr_exit_frac": mean((exit_high | exit_low).to(ratio.dtype)),
        "tr_exit_low": mean(exit_low.to(ratio.dtype)),
        "tr_exit_high": mean(exit_high.to(ratio.dtype)),
        "approx_kl_k1": mean(-log_ratio),
        "approx_kl_k3": mean(torch.expm1(log_ratio) - log_ratio),
    }
    if dual_clip is not None:
        metrics["dual_clip_frac"] = mean(((advantages < 0) & (ratio > dual_clip)).to(ratio.dtype))
    if objective == "cfpo":
        metrics["penalty"] = mean(cfpo_penalty(ratio, advantages, eps_low, eps_high))
    return {k: v.float() for k, v in metrics.items()}
