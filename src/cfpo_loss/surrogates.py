"""Per-token surrogate objectives (to MAXIMISE), as functions of the probability ratio r = π_θ / π_old.

The CFPO objective (Clipping-Free Policy Optimization, arXiv 2601.22801, eq. for J_CFPO):

    J_CFPO(r, A) = r·A − |A| / (2ε) · (r − 1)²        ε = eps_high where A > 0, eps_low where A < 0

a concave quadratic in r, differentiable everywhere, maximised at r* = 1 + sign(A)·ε. At r = 1 its
gradient equals the clipped objective's (both are A). The clipped PPO/GRPO baseline:

    J_clip(r, A) = min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A)

and with dual-clip c > 1, tokens with A < 0 are bounded below by c·A (verl / OpenRLHF semantics).

Each objective is written once, as a ``*_terms`` function giving its value J, its analytic derivative
dJ/dr and (CFPO) its penalty together: the public ``cfpo_surrogate`` / ``clipped_surrogate`` return the
value of exactly that function, and every loss path (eager, compiled, fused) runs it too, through the
``Objective`` record in ``OBJECTIVES``. Adding an objective = one ``*_terms`` function + one record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_dual_clip, check_eps


class Terms(NamedTuple):
    """Per-token value, derivative and penalty of an objective (shapes of the broadcast inputs)."""

    objective: Tensor  # J(r, A), to maximise
    derivative: Tensor  # dJ/dr
    penalty: Tensor | None  # the trust-region term J subtracts (CFPO), None where there is none
    exits: Exits | None = None  # where r left the trust region, if the objective computed that (clip does)


class Constants(NamedTuple):
    """The scalar operands of the objectives and of ``trust_region_exits``, from (eps_low, eps_high, dual_clip).

    Python numbers (``constants``) for a direct call. The eager pass passes the same values as 0-dim tensors
    of its dtype and device, built once per options (``_per_token.pass_constants``): an op given a Python
    number wraps it in a new tensor on every call, host time that a small batch (and any batch on a GPU,
    where the host launches every kernel) waits for. Either way each op computes in the tensor's dtype."""

    zero: float | Tensor
    one: float | Tensor
    two: float | Tensor
    low: float | Tensor  # 1 − eps_low
    high: float | Tensor  # 1 + eps_high
    coef_low: float | Tensor  # −1/(2·eps_low): |A|/(2ε) = coef_low·A where A < 0
    coef_high: float | Tensor  # 1/(2·eps_high): |A|/(2ε) = coef_high·A where A > 0
    dual_clip: float | Tensor | None


def constants(eps_low: float, eps_high: float, dual_clip: float | None = None) -> Constants:
    return Constants(0.0, 1.0, 2.0, 1.0 - eps_low, 1.0 + eps_high, -0.5 / eps_low, 0.5 / eps_high, dual_clip)


class Exits(NamedTuple):
    """Where the ratio has left the trust region, per token (bool): what clipping clips, and what the metrics
    count (``metrics.trust_region_metrics``: tr_exit_*, dual_clip_frac), computed once for both."""

    negative: Tensor  # A < 0
    low: Tensor  # A < 0 and r < 1 − eps_low
    high: Tensor  # A > 0 and r > 1 + eps_high
    either: Tensor  # high or low: what clipping clips (before dual-clip), what tr_exit_frac counts
    dual: Tensor | None  # A < 0 and r > dual_clip (None without dual_clip)


def trust_region_exits(ratio: Tensor, advantages: Tensor, k: Constants) -> Exits:
    negative = advantages < k.zero  # computed once: each op is host time at small shapes
    high = (advantages > k.zero) & (ratio > k.high)
    low = negative & (ratio < k.low)
    dual = None if k.dual_clip is None else negative & (ratio > k.dual_clip)
    return Exits(negative, low, high, high | low, dual)


# ---- CFPO ------------------------------------------------------------------------------------------


def cfpo_terms(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip=None, *, k: Constants | None = None
) -> Terms:
    """J_CFPO = r·A − |A|/(2ε)·(r−1)²  and  dJ/dr = A − |A|/ε·(r−1)  (zero at r* = 1 + sign(A)·ε).
    ``k``: ``constants(eps_low, eps_high)``, precomputed (as tensors: the eager pass) or None."""
    k = constants(eps_low, eps_high) if k is None else k
    coef = penalty_coef(advantages, eps_low == eps_high, k)  # |A|/(2ε)
    deviation = ratio - k.one
    penalty = coef * deviation.square()
    return Terms(ratio * advantages - penalty, advantages - k.two * coef * deviation, penalty)


def penalty_coef(advantages: Tensor, symmetric: bool, k: Constants) -> Tensor:
    """|A|/(2ε): A/(2·eps_high) where A > 0, −A/(2·eps_low) where A < 0 (0 where A = 0); ``symmetric``:
    eps_low == eps_high, so that one coefficient serves both signs."""
    if symmetric:
        return advantages.abs() * k.coef_high
    return torch.where(advantages > k.zero, advantages * k.coef_high, advantages * k.coef_low)


# ---- clipped PPO / GRPO ------------------------------------------------------------------------------


def clipped_terms(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip=None, *, k: Constants | None = None
) -> Terms:
    """J_clip = min(r·A, clip(r, 1−eps_low, 1+eps_high)·A) (with dual_clip=c: max(J_clip, c·A) where A < 0);
    dJ/dr = A where the unclipped branch is active, 0 where clipping (or dual-clip) holds.
    ``k``: ``constants(eps_low, eps_high, dual_clip)``, precomputed (as tensors: the eager pass) or None."""
    k = constants(eps_low, eps_high, dual_clip) if k is None else k
    objective = torch.minimum(ratio * advantages, ratio.clamp(k.low, k.high) * advantages)
    exits = trust_region_exits(ratio, advantages, k)
    clipped = exits.either
    if dual_clip is not None:
        objective = torch.where(exits.negative, torch.maximum(objective, k.dual_clip * advantages), objective)
        clipped = clipped | exits.dual
    return Terms(objective, torch.where(clipped, k.zero, advantages), None, exits)


# ---- the registry: one record per objective, consulted by every path and adapter -------------------


@dataclass(frozen=True)
class Objective:
    """A per-token objective: ``terms(ratio, advantages, eps_low, eps_high, dual_clip) -> Terms``.

    ``takes_dual_clip``: whether ``dual_clip`` means anything to it (it is dropped otherwise).
    ``has_penalty``: whether ``terms`` returns a penalty (then reported as the ``penalty`` metric).
    ``takes_constants``: whether ``terms`` also takes ``k=``, the ``Constants`` of the three numbers, which the
    eager pass then passes as cached tensors (the two built-in objectives do).
    """

    name: str
    terms: Callable[..., Terms]
    takes_dual_clip: bool
    has_penalty: bool
    takes_constants: bool = False


OBJECTIVES: dict[str, Objective] = {
    "cfpo": Objective("cfpo", cfpo_terms, takes_dual_clip=False, has_penalty=True, takes_constants=True),
    "clip": Objective("clip", clipped_terms, takes_dual_clip=True, has_penalty=False, takes_constants=True),
}


def get_objective(name) -> Objective:
    """The record for ``name`` ("cfpo" or "clip"); an unknown name raises ValueError naming the valid ones."""
    if isinstance(name, Objective):
        return name
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(map(repr, OBJECTIVES))}") from None


# ---- the public per-token surrogates (autograd-differentiable; the same code the loss paths run) ------


def cfpo_surrogate(ratio: Tensor, advantages: Tensor, eps_low: float = 0.2, eps_high: float | None = None) -> Tensor:
    """J_CFPO = r·A − |A|/(2ε)·(r−1)², ε = eps_high for A > 0 and eps_low for A < 0."""
    eps_low, eps_high = check_eps(eps_low, eps_high)
    return cfpo_terms(ratio, advantages, eps_low, eps_high).objective


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
) -> Tensor:
    """J_clip = min(r·A, clip(r, 1−eps_low, 1+eps_high)·A); with dual_clip=c, max(J_clip, c·A) where A < 0."""
    eps_low, eps_high = check_eps(eps_low, eps_high)
    return clipped_terms(ratio, advantages, eps_low, eps_high, check_dual_clip(dual_clip)).objective
