"""Argument checks shared by the core. Every failure names the argument and what was seen.

Shape, dtype, device and hyper-parameter errors are always raised (they cost no device sync). The
non-finite check on *valid* positions needs one sync and can be skipped with ``check_finite=False``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def check_eps(
    eps_low: float, eps_high: float | None, *, names: tuple[str, str] = ("eps_low", "eps_high")
) -> tuple[float, float]:
    """Validate the trust-region half-widths; ``eps_high`` defaults to ``eps_low``. ``names``: how the errors
    name the two (an adapter passes its framework's option names)."""
    eps_low = _as_float(names[0], eps_low)
    if not 0.0 < eps_low < 1.0:
        raise ValueError(f"{names[0]} must lie in (0, 1) so that 1 - eps_low > 0, got {eps_low}")
    if eps_high is None:
        return eps_low, eps_low
    eps_high = _as_float(names[1], eps_high)
    if not eps_high > 0.0:
        raise ValueError(f"{names[1]} must be > 0, got {eps_high}")
    return eps_low, eps_high


def check_dual_clip(dual_clip: float | None) -> float | None:
    if dual_clip is None:
        return None
    dual_clip = _as_float("dual_clip", dual_clip)
    if not dual_clip > 1.0:
        raise ValueError(
            f"dual_clip must be > 1 (dual-clip PPO bounds A<0 tokens below by dual_clip*A), got {dual_clip}"
        )
    return dual_clip


def check_choice(name: str, value: str, valid) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(repr(v) for v in valid)}")
    return value


def check_float(name: str, value, *, above: float | None = None, at_least: float | None = None) -> float:
    """A finite Python float (TypeError for anything else), > ``above`` / >= ``at_least`` (ValueError)."""
    value = _as_float(name, value)
    if above is not None and not value > above:
        raise ValueError(f"{name} must be a finite float > {above}, got {value}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{name} must be a finite float >= {at_least}, got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_tensor(name: str, x, *, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_mask(mask, shape: torch.Size, device: torch.device, *, defer: bool = False) -> tuple[Tensor, Tensor | None]:
    """(``mask`` as bool, None); a non-bool mask must hold only 0 and 1. Checking that reads the values: one
    device sync now, or with ``defer=True`` none: the second item is then a 0-dim bool tensor, True if a
    value is neither 0 nor 1, for the caller to fold into the one sync it makes anyway (its finite check)."""
    check_tensor("mask", mask, floating=False)
    if mask.shape != shape:
        raise ValueError(f"mask must have the shape of log_prob {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but log_prob is on {device}")
    if mask.dtype == torch.bool:
        return mask, None
    if mask.is_complex():
        raise ValueError(f"mask must be bool or hold only 0 and 1, got dtype {mask.dtype}")
    invalid = ((mask != 0) & (mask != 1)).any()
    if not defer:
        raise_if_mask_invalid(invalid)
        invalid = None
    return mask != 0, invalid


def raise_if_mask_invalid(invalid: Tensor | None) -> None:
    """Raise if the deferred check of a non-bool mask (``check_mask(..., defer=True)``) found a value not 0 or 1."""
    if invalid is not None and bool(invalid):
        raise ValueError("mask must be bool or hold only 0 and 1, got a non-bool mask with other values")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32: bf16/fp16 are computed in fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_finite_where(mask: Tensor, **named: Tensor | None) -> None:
    """Raise if any named tensor holds NaN/inf at a valid (mask=True) position. One device sync."""
    named = {k: v for k, v in named.items() if v is not None}
    bad = [(k, ~torch.isfinite(v) & mask) for k, v in named.items()]
    if not bool(torch.stack([b.any() for _, b in bad]).any()):
        return
    for k, b in bad:
        n = int(b.sum())
        if n:
            raise ValueError(
                f"{k} holds {n} non-finite value(s) at valid (mask=True) positions; masked positions may "
                f"hold anything, valid ones may not (pass check_finite=False to skip this check)"
            )


class Batch(NamedTuple):
    """The (B, T) batch tensors of a policy loss, checked against the log-probs and cast (``check_batch``)."""

    old_log_prob: Tensor | None
    advantages: Tensor  # (B, T)
    mask: Tensor  # bool
    weights: Tensor | None
    dtype: torch.dtype  # the compute dtype: fp32, or fp64 when any input is fp64
    mask_invalid: Tensor | None  # deferred check of a 0/1 mask's values (see _checks.check_mask)
    # 0-dim, in the compute dtype: valid tokens, at least 1. Counted once for the two that divide by it, the
    # default row weight (token-mean) and the metrics' means
    valid_tokens: Tensor


def check_batch(
    shape, device, old_log_prob, advantages, mask, weights, *, log_prob=None, defer_mask_check=False
) -> Batch:
    """Validate the (B, T) batch tensors against the log-probs' ``shape`` and ``device`` (no device sync
    for a bool mask, nor with ``defer_mask_check``) and cast them to the compute dtype."""
    if old_log_prob is not None:  # None: on-policy (the fused path)
        check_tensor("old_log_prob", old_log_prob)
    check_tensor("advantages", advantages)
    if weights is not None:
        check_tensor("weights", weights)
    dtype = compute_dtype(log_prob, old_log_prob, advantages, weights)
    shape = torch.Size(shape)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("weights", weights)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but log_prob is on {device}")
    if old_log_prob is not None and old_log_prob.shape != shape:
        raise ValueError(
            f"old_log_prob must have the shape of log_prob {tuple(shape)}, got {tuple(old_log_prob.shape)}"
        )
    if advantages.shape in ((shape[0],), (shape[0], 1)):
        advantages = advantages.reshape(shape[0], 1).expand(shape)
    elif advantages.shape != shape:
        raise ValueError(
            f"advantages must be (B,), (B, 1) or (B, T) with (B, T) = {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    if weights is not None:
        if weights.shape != shape:
            raise ValueError(f"weights must have the shape of log_prob {tuple(shape)}, got {tuple(weights.shape)}")
        weights = cast(weights, dtype)
    mask, mask_invalid = check_mask(mask, shape, device, defer=defer_mask_check)
    old_log_prob = None if old_log_prob is None else cast(old_log_prob, dtype)
    # the same int64 count either way: on a CPU count_nonzero is a few µs faster for a small mask; on a GPU it
    # is two kernels (mask != 0, then a sum) where sum() is one (unmeasured there)
    count = torch.count_nonzero(mask) if mask.device.type == "cpu" else mask.sum()
    valid_tokens = count.clamp_(min=1).to(dtype)
    return Batch(old_log_prob, cast(advantages, dtype), mask, weights, dtype, mask_invalid, valid_tokens)


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, without the call (about a microsecond of host time) when it would return x itself."""
    return x if x.dtype == dtype else x.to(dtype)
