"""Both objectives on one screen, in plain autograd: the math to read, and the oracle the tests hold every path to.

Nothing here is fast or checked; ``compute_policy_loss`` (eager, compiled) and ``fused_linear_policy_loss`` are.
This file shares no code with them, so a test that compares them with it compares two independent writings.

    r      = π_θ / π_old = exp(log π_θ − log π_old)            (sequence level, GSPO: exp(mean_t log r_t) per row)
    J_CFPO = r·A − |A| / (2ε) · (r − 1)²                        ε = eps_high where A > 0, eps_low where A < 0
    J_clip = min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A)      dual-clip c: max(J_clip, c·A) where A < 0
    loss   = −aggregate(J)                                      (verl's agg_loss modes, below)
"""

from __future__ import annotations

from typing import NamedTuple

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


# ---- how far a working-precision evaluation may lie from this oracle ---------------------------------------------
#
# A test that holds an fp32 (or bf16) computation to a float64 oracle needs a bound that follows from the
# computation, not a guessed rtol: CPUs differ in vector width and summation order, so an error that lands under a
# guessed 1e-6 on one CPU lands over it on the next. The bound below is the first-order forward error of the
# objective (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3-4), per element k (a token, or a
# sequence where the ratio is per sequence), with u the working dtype's unit roundoff:
#
#   log r_k   computed with error <= u·c_k          c_k: the sum of |terms| added in working precision to form log r_k
#                                                   (token level, log π − log π_old from stored values: |log r_k|;
#                                                   a sum over n tokens: n·Σ_t |term_t|, recursive summation)
#   r_k       = exp(log r_k):          δr_k <= r_k·(u·c_k + 4u)           (exp within 2 ulp, 4u with the store)
#   J_k       = r·A − |A|/(2ε)·(r−1)²: δJ_k <= |J'(r_k)|·δr_k + 6u·(|r_k·A_k| + P_k)    (six roundings)
#   loss      = Σ_k w_k·J_k:           δL   <= Σ_k |w_k|·(δJ_k + (n + 2)·u·|J_k|)    (the sum, the weight, the mean)
#   G_k = dL/dlog r_k = w_k·J'(r_k)·r_k:
#                 δG_k <= |w_k|·(|J''(r_k)·r_k + J'(r_k)|·δr_k + 12u·r_k·(|A_k| + |A_k|/ε·|r_k − 1|))
#                                      (twelve: r − 1, |A|/ε, the products and the difference of J'·r, the
#                                      weight, the upstream gradient, and a backward that recomputes r)
#
# with P = |A|/(2ε)·(r−1)² the penalty, J' = A − |A|/ε·(r−1) and J'' = −|A|/ε for cfpo; for clip J'' = 0 and J' = A,
# except where the clip binds: 0 for A > 0 with r > 1 + ε_high and for A < 0 with r < 1 − ε_low. Two working-precision
# evaluations of the same loss (ours and a framework's) differ by at most twice the bound. Not covered: a ratio within
# δr of a clip boundary, where the two sides of the kink may be taken differently (tests keep their ratios off the
# kinks). Every bound returned here is that first-order worst case times SAFETY, for what the model leaves out:
# second-order terms, exp / log libraries less accurate than 2 ulp on other CPUs, and a summation written differently
# from the one assumed.

#: the unit roundoff u of each dtype: the largest relative error of one correctly rounded operation
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: the factor between the first-order worst case and the bound a test asserts (see above)
SAFETY = 4.0


class RoundingBound(NamedTuple):
    """First-order bounds on the error of a working-precision evaluation (see the derivation above)."""

    loss: float  #: on |loss − exact loss|
    grad: Tensor  #: per element, on |dloss/dlog r_k − exact|
    ratio: Tensor  #: per element, on |r_k − exact r_k|
    objective: Tensor  #: per element, on |J_k − exact J_k|


def rounding_bound(
    ratio: Tensor,
    advantages: Tensor,
    coef: Tensor,
    log_ratio_cond: Tensor,
    *,
    objective: str = "cfpo",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    advantage_error: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> RoundingBound:
    """Bounds for an evaluation in ``dtype`` of ``loss = Σ_k coef_k · (−J(ratio_k, advantages_k))``.

    All inputs are the oracle's float64 values over the valid elements only (1-D, same length): ``coef`` the weight
    of each element's objective in the loss (1/N for a token mean, times any per-token weight), ``log_ratio_cond``
    c_k as defined above. ``advantage_error``: a bound on the error of the advantages the evaluation uses, where it
    computes them itself (a sequence's mean advantage), first order (SAFETY is applied here); it enters through
    |∂J/∂A| and |∂G/∂A|.
    Returns ``RoundingBound(loss, grad, ratio, objective)``."""
    u = SAFETY * UNIT_ROUNDOFF[dtype]
    r, a, w = ratio.double(), advantages.double(), coef.double().abs()
    eps_high = eps_low if eps_high is None else eps_high
    eps = a.new_full(a.shape, eps_low).masked_fill(a > 0, eps_high)
    if objective == "cfpo":
        djdr, d2jdr2 = a - a.abs() / eps * (r - 1), -a.abs() / eps
        penalty = a.abs() / (2 * eps) * (r - 1) ** 2
        j = r * a - penalty
    elif objective == "clip":
        flat = ((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low))  # the clipped side: J constant
        djdr = torch.where(flat, 0.0, a)
        d2jdr2, penalty, j = torch.zeros_like(r), torch.zeros_like(r), clip_objective(r, a, eps_low, eps_high)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    d_ratio = r * (u * log_ratio_cond.double() + 4 * u)
    d_objective = djdr.abs() * d_ratio + 6 * u * ((r * a).abs() + penalty)
    grad = w * ((d2jdr2 * r + djdr).abs() * d_ratio + 12 * u * r * (a.abs() + a.abs() / eps * (r - 1).abs()))
    if advantage_error is not None:  # |∂J/∂A| <= r + (r−1)²/(2ε) (cfpo), r + |r−1| (clip); |∂G/∂A| <= w·r·(1 + |r−1|/ε)
        d_a = SAFETY * advantage_error.double()
        dj_da = r + ((r - 1) ** 2 / (2 * eps) if objective == "cfpo" else (r - 1).abs())
        d_objective = d_objective + dj_da * d_a
        grad = grad + w * r * (1 + (r - 1).abs() / eps) * d_a
    n = r.numel()
    loss = float((w * (d_objective + (n + 2) * u * j.abs())).sum())
    return RoundingBound(loss, grad, d_ratio, d_objective)


def policy_loss_bound(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    objective: str = "cfpo",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    agg: str = "token-mean",
    ratio_level: str = "token",
    weights: Tensor | None = None,
    coef: Tensor | None = None,
    log_prob_error: Tensor | None = None,
    advantage_error: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> RoundingBound:
    """``rounding_bound`` for ``policy_loss`` with these arguments evaluated in ``dtype`` from inputs stored in it:
    ``loss`` as there, ``grad`` and ``ratio`` per token (B, T), zero at masked positions. ``coef`` (B, T): each
    token's weight in the aggregation, where it is not ``aggregate``'s (a data-parallel global count); by default
    taken from ``aggregate``, which is linear in the per-token loss. ``log_prob_error`` (B, T): a bound on the error
    ``log_prob`` itself carries, where it was computed in ``dtype`` (an LM head's log-softmax), not given;
    ``advantage_error`` (B, T) likewise for advantages the evaluation computes (``rounding_bound``)."""
    mask = mask.bool()
    log_r, cond = _log_ratio_and_cond(log_prob, old_log_prob, mask, ratio_level, log_prob_error, dtype)
    adv = advantages.double().reshape(mask.shape[0], -1).expand(mask.shape)
    if coef is None:
        probe = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
        (coef,) = torch.autograd.grad(aggregate(probe, mask, agg), probe)
    coef = torch.where(mask, coef.double() * (1.0 if weights is None else weights.double()), 0.0)
    kw = dict(objective=objective, eps_low=eps_low, eps_high=eps_high, dtype=dtype)
    if advantage_error is not None:
        kw["advantage_error"] = advantage_error.double().expand(mask.shape)[mask]
    bound = rounding_bound(log_r[mask].exp(), adv[mask], coef[mask], cond[mask], **kw)
    grad, d_ratio, d_objective = (torch.zeros(mask.shape, dtype=torch.float64) for _ in range(3))
    grad[mask], d_ratio[mask], d_objective[mask] = bound.grad, bound.ratio, bound.objective
    if ratio_level == "sequence":  # each token's log-prob moves its row's ratio by 1/n: the row's terms, shared
        grad = torch.where(mask, grad.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1), 0.0)
    return RoundingBound(bound.loss, grad, d_ratio, d_objective)


def policy_metric_bounds(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    ratio_level: str = "token",
    log_prob_error: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """``metric_bounds`` for the metrics ``compute_policy_loss`` reports on these inputs (means over valid tokens;
    at sequence level each token carries its row's ratio); ``log_prob_error`` as for ``policy_loss_bound``."""
    mask = mask.bool()
    log_r, cond = _log_ratio_and_cond(log_prob, old_log_prob, mask, ratio_level, log_prob_error, dtype)
    adv = advantages.double().reshape(mask.shape[0], -1).expand(mask.shape)
    return metric_bounds(log_r[mask].exp(), adv[mask], cond[mask], eps_low=eps_low, eps_high=eps_high, dtype=dtype)


def _log_ratio_and_cond(log_prob, old_log_prob, mask, ratio_level, log_prob_error=None, dtype=torch.float32) -> tuple:
    """(B, T) float64 log-ratio as ``ratio`` takes it, and c, the magnitude its working-precision evaluation rounds:
    a token's is one subtraction of stored values (c = |log r|), plus the error log π carries (in units of u); a
    sequence's mean of n of them costs n + 1 more roundings of their sum and one of the mean."""
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"unknown ratio_level {ratio_level!r}")
    log_ratio = torch.where(mask, log_prob.detach().double() - old_log_prob.double(), 0.0).clamp(-20.0, 20.0)
    token = log_ratio.abs()
    if log_prob_error is not None:
        token = token + torch.where(mask, log_prob_error.double(), 0.0) / UNIT_ROUNDOFF[dtype]
    if ratio_level != "sequence":
        return log_ratio, token
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    seq = log_ratio.sum(-1, keepdim=True) / n
    cond = (n + 1) * token.sum(-1, keepdim=True) / n + seq.abs()
    return seq.expand(mask.shape), cond.expand(mask.shape)


def metric_bounds(
    ratio: Tensor,
    advantages: Tensor,
    log_ratio_cond: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Bounds on the error of each trust-region metric (``cfpo_loss.metrics``' names: masked means over the valid
    elements, their min and max) evaluated in ``dtype``; inputs as for ``rounding_bound``. An exit fraction is a
    count, exact unless a ratio lies within its own error of a boundary (the tests keep theirs off the boundaries),
    so its bound is the division's rounding alone."""
    u = SAFETY * UNIT_ROUNDOFF[dtype]
    r, a = ratio.double(), advantages.double()
    eps_high = eps_low if eps_high is None else eps_high
    eps = a.new_full(a.shape, eps_low).masked_fill(a > 0, eps_high)
    d_log = u * log_ratio_cond.double()
    d_ratio = r * (d_log + 4 * u)
    n = max(r.numel(), 1)

    def mean(values: Tensor, errors: Tensor) -> float:
        return float(errors.sum()) / n + sum_bound(values, dtype) / n

    log_r = r.log()
    penalty = a.abs() / (2 * eps) * (r - 1) ** 2
    exits = {
        "tr_exit_high": ((a > 0) & (r > 1 + eps_high)).double(),
        "tr_exit_low": ((a < 0) & (r < 1 - eps_low)).double(),
    }
    exits["tr_exit_frac"] = exits["tr_exit_high"] + exits["tr_exit_low"]
    return {
        "ratio_mean": mean(r, d_ratio),
        "ratio_min": float(d_ratio[r.argmin()]) if r.numel() else 0.0,
        "ratio_max": float(d_ratio[r.argmax()]) if r.numel() else 0.0,
        "ratio_dev": mean((r - 1).abs(), d_ratio + u * (r - 1).abs()),
        **{name: 2 * u * float(x.mean()) if r.numel() else 0.0 for name, x in exits.items()},
        "approx_kl_k1": mean(log_r, d_log),
        "approx_kl_k3": mean(r - 1 - log_r, (r - 1).abs() * d_log + 4 * u * (r + 1 + log_r.abs())),
        "penalty": mean(penalty, a.abs() / eps * (r - 1).abs() * d_ratio + 6 * u * penalty),
    }


def token_rounding_bound(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    coef: Tensor,
    *,
    objective: str = "cfpo",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    ratio_level: str = "token",
    log_prob_cond: Tensor | None = None,
    coef_roundings: int = 0,
    dtype: torch.dtype = torch.float32,
) -> RoundingBound:
    """``rounding_bound`` for a (B, T) batch as the losses take it: ``loss = Σ_bt coef_bt · (−J(r_bt, A_bt))`` over the
    valid tokens, r from ``log_prob − old_log_prob`` as ``ratio`` above computes it (per token, or at
    ``ratio_level="sequence"`` exp of the row's mean log-ratio).

    ``log_prob``, ``old_log_prob``: the stored working-precision values (their float64 copies are exact);
    ``advantages`` (B,), (B, 1) or (B, T); ``coef`` (B, T): the weight of each token's objective in the loss
    (d loss / d per-token loss of the aggregation, times any per-token weight; read it off the aggregation with
    autograd in float64); ``log_prob_cond`` (B, T): where ``log_prob`` is itself computed in ``dtype`` (a
    log-softmax), its error over u, added to each token's log-ratio condition (default 0: stored values);
    ``coef_roundings``: how many roundings the working-precision code spends forming each token's coefficient (an
    aggregation's ÷ count, × dp_size, ÷ scale factor, × a per-token weight: ``rounding_bound`` takes coef as exact):
    each adds u·|coef_t|·|J_t| to the loss and u·|coef_t·J'(r_t)·r_t| to the gradient, both bounded with
    |J| <= r·|A| + P and |J'| <= |A|·(1 + |r − 1|/ε).

    The condition c of each log-ratio (see the block above): token level, the subtraction of the two stored values
    and the error ``log_prob`` brings, c = |log r_t| + log_prob_cond_t. Sequence level, log r_i = Σ_t d_t / n_i with
    d_t = log π_t − log π_old,t: the n_i subtractions (u·(|d_t| + log_prob_cond_t) each), the recursive sum
    ((n_i − 1)·u·Σ|d_t|) and the division (u·|log r_i|), so c_i = Σ_t |d_t| + Σ_t log_prob_cond_t / n_i + |log r_i|.

    ``policy_loss_bound`` with ``coef`` given and ``log_prob_cond`` in units of u, plus ``coef_roundings``.
    Returns ``RoundingBound`` with ``grad``, ``ratio`` and ``objective`` (B, T), zero off the mask; ``grad``
    bounds d loss / d log_prob_t. At sequence level that is (1/n_i)·Σ_t' over the row of the per-token bounds (the
    gradient of exp(mean_t log r_t)); GSPO's token form sg[s_i]·π_t/sg[π_t] gives token t its own term only, which
    is the same where coef is constant within a row."""
    mask = mask.bool()
    shape = mask.shape
    w = coef.detach().double().expand(shape)
    error = None if log_prob_cond is None else log_prob_cond.double().expand(shape) * UNIT_ROUNDOFF[dtype]
    kw = dict(objective=objective, eps_low=eps_low, eps_high=eps_high, ratio_level=ratio_level, dtype=dtype)
    bound = policy_loss_bound(log_prob, old_log_prob, advantages, mask, coef=w, log_prob_error=error, **kw)
    if not coef_roundings:
        return bound
    r = _log_ratio_and_cond(log_prob, old_log_prob, mask, ratio_level)[0].exp()
    a = advantages.detach().double().reshape(shape[0], -1).expand(shape)
    eps_high = eps_low if eps_high is None else eps_high
    eps = torch.where(a > 0, eps_high, eps_low)
    ku = coef_roundings * SAFETY * UNIT_ROUNDOFF[dtype] * w.abs()
    loss = bound.loss + float(torch.where(mask, ku * (r * a.abs() + a.abs() / (2 * eps) * (r - 1) ** 2), 0.0).sum())
    grad = torch.where(mask, ku * r * a.abs() * (1 + (r - 1).abs() / eps), 0.0)
    if ratio_level == "sequence":
        grad = torch.where(mask, grad.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1), 0.0)
    return RoundingBound(loss, bound.grad + grad, bound.ratio, bound.objective)


def sum_bound(values: Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Bound on the rounding error of summing ``values`` in ``dtype`` (recursive summation: (n − 1)·u·Σ|v|, plus
    one rounding for a final division by the count), times SAFETY."""
    return float(SAFETY * (values.numel() + 1) * UNIT_ROUNDOFF[dtype] * values.double().abs().sum())


def assert_within(got: Tensor | float, want: Tensor | float, bound: Tensor | float, what: str = "") -> float:
    """``|got − want| <= bound`` elementwise (AssertionError naming the worst element otherwise); returns the largest
    error-to-bound ratio, which tests record (the suite reports the largest one seen)."""
    got_t, want_t, bound_t = (torch.as_tensor(x).detach().double() for x in (got, want, bound))
    bound_t = bound_t.expand_as(want_t)
    err = (got_t - want_t).abs()
    worst = int((err - bound_t).argmax()) if err.numel() else 0
    assert bool((err <= bound_t).all()), (
        f"{what}: |got - want| = {err.flatten()[worst].item():.3e} > bound {bound_t.flatten()[worst].item():.3e} "
        f"at element {worst} (of {err.numel()})"
    )
    ratio = float((err / bound_t.clamp(min=1e-300)).max()) if err.numel() else 0.0
    _RATIOS.append((ratio, what))
    return ratio


#: every error-to-bound ratio assert_within saw in this process (the test suite prints the largest)
_RATIOS: list[tuple[float, str]] = []
