"""Per-token surrogate objectives (to MAXIMISE), as functions of the probability ratio r = π_θ / π_old.

The CFPO objective (Clipping-Free Policy Optimization, arXiv 2601.22801, eq. for J_CFPO):

    J_CFPO(r, A) = r·A − |A| / (2ε) · (r − 1)²        ε = eps_high where A > 0, eps_low where A < 0

a concave quadratic in r, differentiable everywhere, maximised at r* = 1 + sign(A)·ε. At r = 1 its
gradient equals the clipped objective's (both are A). The clipped PPO/GRPO baseline:

    J_clip(r, A) = min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A)

and with dual-clip c > 1, tokens with A < 0 are bounded below by c·A (verl / OpenRLHF semantics).

Each objective also has its analytic derivative dJ/dr (``*_grad``, and ``objective_terms`` giving J, dJ/dr and
the CFPO penalty in one pass), used by compute_policy_loss so that its backward is one multiply; the tests
check both against autograd and against the equations above.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._checks import check_dual_clip, check_eps


def cfpo_surrogate(ratio: Tensor, advantages: Tensor, eps_low: float = 0.2, eps_high: float | None = None) -> Tensor:
    """J_CFPO = r·A − |A|/(2ε)·(r−1)², ε = eps_high for A > 0 and eps_low for A < 0."""
    eps_low, eps_high = check_eps(eps_low, eps_high)
    return ratio * advantages - _penalty_coef(advantages, eps_low, eps_high) * (ratio - 1.0).square()


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
) -> Tensor:
    """J_clip = min(r·A, clip(r, 1−eps_low, 1+eps_high)·A); with dual_clip=c, max(J_clip, c·A) where A < 0."""
    eps_low, eps_high = check_eps(eps_low, eps_high)
    dual_clip = check_dual_clip(dual_clip)
    objective = torch.minimum(ratio * advantages, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)
    if dual_clip is not None:
        objective = torch.where(advantages < 0, torch.maximum(objective, dual_clip * advantages), objective)
    return objective


def cfpo_penalty(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """The quadratic trust-region term |A|/(2ε)·(r−1)² (the part CFPO subtracts from r·A)."""
    return _penalty_coef(advantages, eps_low, eps_high) * (ratio - 1.0).square()


def _penalty_coef(advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    # |A|/(2ε): A/(2·eps_high) where A > 0, −A/(2·eps_low) where A < 0 (0 where A = 0).
    if eps_low == eps_high:
        return advantages.abs() / (2.0 * eps_low)
    return torch.where(advantages > 0, advantages / (2.0 * eps_high), advantages / (-2.0 * eps_low))


# ---- analytic derivatives dJ/dr (checked against autograd in the tests) ----------------------------


def cfpo_surrogate_grad(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """dJ_CFPO/dr = A − |A|/ε·(r − 1): zero at r* = 1 + sign(A)·ε, pointing back towards it outside."""
    return cfpo_terms(ratio, advantages, eps_low, eps_high)[1]


def clipped_surrogate_grad(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip: float | None = None
) -> Tensor:
    """dJ_clip/dr = A where the unclipped branch is active, 0 where clipping (or dual-clip) holds."""
    clipped = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    if dual_clip is not None:
        clipped = clipped | ((advantages < 0) & (ratio > dual_clip))
    return torch.where(clipped, torch.zeros_like(advantages), advantages)


# ---- one pass: value, derivative and penalty together (shared subexpressions) -----------------------


def cfpo_terms(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float):
    """(J_CFPO, dJ/dr, penalty) in one pass; the same equations as cfpo_surrogate / cfpo_surrogate_grad."""
    coef = _penalty_coef(advantages, eps_low, eps_high)  # |A|/(2ε)
    deviation = ratio - 1.0
    penalty = coef * deviation.square()
    # dJ/dr = A − 2·|A|/(2ε)·(r − 1) = A − |A|/ε·(r − 1)
    return ratio * advantages - penalty, advantages - 2.0 * coef * deviation, penalty


def clipped_terms(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip: float | None):
    """(J_clip, dJ/dr, None): clip has no penalty term."""
    return (
        clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip),
        clipped_surrogate_grad(ratio, advantages, eps_low, eps_high, dual_clip),
        None,
    )


#: objective name -> per-token surrogate J(ratio, advantages, eps_low, eps_high[, dual_clip])
OBJECTIVES: dict[str, Callable[..., Tensor]] = {"cfpo": cfpo_surrogate, "clip": clipped_surrogate}


def objective_terms(
    objective: str, ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(J, dJ/dr, CFPO penalty or None) for a named objective; dual_clip applies to "clip" only."""
    if objective == "cfpo":
        return cfpo_terms(ratio, advantages, eps_low, eps_high)
    return clipped_terms(ratio, advantages, eps_low, eps_high, dual_clip)
