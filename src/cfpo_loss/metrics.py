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

Log-ratios beyond ±20: every metric sees the token log-ratio clamped to [−20, 20] (``_per_token.LOG_RATIO_CLAMP``),
the value the objective itself used, as verl does (0.9.1 ``compute_policy_loss_vanilla``: ratio =
exp(clamp(log r, −20, 20)), ``ppo_kl`` = masked mean of −clamp(log r, −20, 20)). A token at log r = 30 counts as
20 in approx_kl_k1 / approx_kl_k3 and as e^20 in the ratio metrics; the sequence ratio is exp(mean of the clamped
token log-ratios). approx_kl_k3 is never negative, also where fp32 rounds r to exactly 1 and (r − 1) − log r
would come out below 0.

They are computed into one buffer, so a logger reads them all with one device-to-host transfer
(``read_metrics``); ``compute_policy_loss`` hands them out as a dict of 0-dim views of it.

The ratio statistics are built from ``ratio_sums`` (count, sums, extremes: the pieces that add up across
batches and ranks), which an adapter that reduces across ranks itself (TRL's) calls on its own batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .surrogates import Constants, Exits, constants, trust_region_exits

#: the buffer's order; "dual_clip_frac" follows when dual_clip is set, "penalty" when the objective has one
BASE_METRICS = (
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "ratio_dev",
    "tr_exit_frac",
    "tr_exit_low",
    "tr_exit_high",
    "approx_kl_k1",
    "approx_kl_k3",
)


def metric_names(dual_clip: bool, penalty: bool) -> tuple[str, ...]:
    """Names of the entries of ``trust_region_metrics``'s buffer, in order."""
    return BASE_METRICS + (("dual_clip_frac",) if dual_clip else ()) + (("penalty",) if penalty else ())


class RatioSums(NamedTuple):
    """The reducible pieces of the ratio statistics over the valid entries of one batch (0-dim tensors, no
    device sync). Across batches or ranks: add ``count``, ``deviation``, ``abs_deviation`` and ``penalty``,
    take the min of ``ratio_min`` and the max of ``ratio_max``; a mean is then sum / count."""

    count: Tensor  # valid entries (int64)
    deviation: Tensor  # Σ (r − 1)
    abs_deviation: Tensor  # Σ |r − 1|
    ratio_min: Tensor  # min r; +inf without a valid entry
    ratio_max: Tensor  # max r; −inf without a valid entry
    penalty: Tensor | None  # Σ penalty, for an objective with one


def ratio_sums(
    ratio: Tensor, mask: Tensor, *, penalty: Tensor | None = None, select=None, count: Tensor | None = None
) -> RatioSums:
    """``RatioSums`` of ``ratio`` over ``mask``. ``ratio`` must hold 1 and ``penalty`` 0 at masked positions (as
    ``trust_region_metrics`` takes them), so the sums need no select. ``select``: an ``_per_token.Select`` for
    ``mask``, if the caller has one. ``count``: the caller's count of ``mask``, if it has one (returned as is,
    not counted again)."""
    k = getattr(select, "scalars", None)  # its cached 0-dim operands (_per_token.Scalars), if it has them
    deviation = ratio - (1.0 if k is None else k.one)  # 0 at masked positions
    return RatioSums(
        count=torch.count_nonzero(mask) if count is None else count,
        deviation=deviation.sum(),
        abs_deviation=deviation.abs().sum(),
        ratio_min=_fill(ratio, mask, select, torch.inf).min(),
        ratio_max=_fill(ratio, mask, select, -torch.inf).max(),
        penalty=None if penalty is None else penalty.sum(),
    )


# no @torch.no_grad(): every caller already runs without grad (the eager pass inside its autograd.Function's
# forward, the compiled pass under torch.no_grad()), and mutmut (`nox -s mutation`) skips decorated functions
def trust_region_metrics(
    ratio: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    penalty: Tensor | None = None,
    ratio_level: str = "token",
    select=None,
    exits: Exits | None = None,
    k: Constants | None = None,
    count: Tensor | None = None,
    finite_sums: tuple[Tensor, ...] = (),
) -> Tensor:
    """The metrics above as ONE 1-D fp32 buffer, in the order of ``buffer_order(dual_clip is not None,
    penalty is not None)`` (``metrics_dict``: by name), so that a logger reads them all with one device-to-host
    transfer.

    ``ratio``, ``log_ratio`` (token level, clamped to ±20: the metrics report what the objective used, see the
    module docstring), ``advantages``: (B, T) with masked positions neutral (ratio 1, log_ratio 0, advantages 0),
    so every per-token term is already 0 there and the masked means need no further select; ``mask``: bool (B, T).
    ``penalty``: the per-token penalty of the objective, if it has one. At ``ratio_level`` "token", ratio =
    exp(log_ratio), which lets k3 come from sums the other metrics need anyway. ``select``: the caller's
    ``_per_token.Select`` for ``mask``, if it has one. ``exits``: the objective's ``surrogates.Exits``, if it
    computed them (clip does), else computed here. ``k``: the pass's ``surrogates.Constants``, if it has them.
    ``count``: the valid tokens, at least 1, in ``ratio``'s dtype (``_checks.Batch.valid_tokens``), if the
    caller has them. ``finite_sums``: 0-dim sums that follow the metrics in the buffer (divided by the valid
    count, which keeps a non-finite one non-finite): the loss's finite check reads them in the same one transfer."""
    sums = ratio_sums(ratio, mask, penalty=penalty, select=select, count=count)
    if count is None:
        # the means divide by the count in the float dtype, as a division by the int64 count converts it:
        # converted once, and each stack below holds one dtype (one that converts is several times slower)
        count = sums.count.clamp(min=1).to(ratio.dtype)
    one = 1.0 if k is None else k.one
    if exits is None:
        exits = trust_region_exits(ratio, advantages, constants(eps_low, eps_high, dual_clip) if k is None else k)
    # at token level k3 = mean(r − 1 − log r) is the difference of these two sums
    log_ratio_sum = log_ratio.sum()
    if ratio_level == "token":
        # clamped at 0 before / count: the same value; relu() is clamp(min=0), without a Python number to wrap
        k3_sum = (sums.deviation - log_ratio_sum).relu_()
    else:  # the objective used the sequence ratio; k3 is still the token-level KL estimate
        k3_sum = (torch.expm1(log_ratio) - log_ratio).sum()
    # The buffer in three pieces of a few ops each (at small shapes the op count is the time), which is why its
    # order is ``buffer_order``'s, not metric_names'. ratio_min, ratio_max: 1 for a batch without a valid token,
    # whose min / max are then +inf / -inf (with a valid token they are finite, r <= e^20, or NaN, which stays
    # NaN): nan_to_num, one op instead of any() and where(), which leaves ratio_mean as it is (never infinite:
    # |r − 1| <= e^20 per token). In-place (_) ops where the operand is a fresh temporary: the same arithmetic,
    # without allocating (and later freeing) one more tensor each
    head = torch.stack([(sums.deviation / count).add_(one), sums.ratio_min, sums.ratio_max])
    head.nan_to_num_(nan=torch.nan, posinf=1.0, neginf=1.0)
    # tr_exit_frac, tr_exit_low, tr_exit_high, dual_clip_frac: int64 counts (exact), / count. On a CPU one
    # count_nonzero per mask: several times faster than a sum over the masks stacked from 64x4096 on (97 against
    # 325 µs for three), as fast at 2x16; on a GPU the stacked sum: two kernels, where each count_nonzero is two
    # (unmeasured there). The same counts either way
    exit_masks = (exits.either, exits.low, exits.high) + (() if dual_clip is None else (exits.dual,))
    if ratio.device.type == "cpu":
        exit_counts = torch.stack([torch.count_nonzero(m) for m in exit_masks])
    else:
        exit_counts = torch.stack(exit_masks).flatten(1).sum(1)
    exit_fracs = exit_counts / count
    means = [sums.abs_deviation, -log_ratio_sum, k3_sum]  # ratio_dev, approx_kl_k1, approx_kl_k3
    if penalty is not None:
        means.append(sums.penalty)  # penalty
    buffer = torch.cat([head, exit_fracs, torch.stack([*means, *finite_sums]).div_(count)])
    return buffer if buffer.dtype == torch.float32 else buffer.float()


def buffer_order(dual_clip: bool, penalty: bool) -> tuple[str, ...]:
    """The order of ``trust_region_metrics``' buffer: ``metric_names``' entries grouped by how they are computed
    (the finite sums, if any, follow). ``metrics_dict`` and ``by_name`` put them back in ``metric_names`` order."""
    return (
        ("ratio_mean", "ratio_min", "ratio_max", "tr_exit_frac", "tr_exit_low", "tr_exit_high")
        + (("dual_clip_frac",) if dual_clip else ())
        + ("ratio_dev", "approx_kl_k1", "approx_kl_k3")
        + (("penalty",) if penalty else ())
    )


@functools.lru_cache(maxsize=16)
def _positions(names: tuple[str, ...]) -> tuple[int, ...]:
    order = buffer_order("dual_clip_frac" in names, "penalty" in names)
    return tuple(order.index(name) for name in names)


def by_name(entries, names: tuple[str, ...]) -> dict:
    """{name: entry} in ``names`` order (``metric_names``), for the entries of a ``trust_region_metrics`` buffer in
    its own order (``buffer_order``): its 0-dim views, or the floats read from it."""
    return {name: entries[i] for name, i in zip(names, _positions(names))}


def metrics_dict(buffer: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The buffer of ``trust_region_metrics`` as {name: 0-dim view} in ``names`` order (views: no copy, no kernel)."""
    return by_name(buffer.unbind(), names)


def read_metrics(metrics: dict[str, Tensor]) -> dict[str, float]:
    """{name: float} with ONE device-to-host transfer (one sync), however many metrics there are.

    For loggers: ``read_metrics(out.metrics)`` instead of ``{k: v.item() ...}`` (one sync per metric).
    ``PolicyLossOutput.metric_floats()`` costs not even that when the loss ran its finite check."""
    if not metrics:
        return {}
    return dict(zip(metrics, torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()))


def _fill(x: Tensor, mask: Tensor, select, value: float) -> Tensor:
    return select.fill(x, value) if select is not None else torch.where(mask, x, value)
