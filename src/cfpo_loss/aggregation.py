"""Reduce a (B, T) per-token loss to the scalar to minimise, with verl's `agg_loss` semantics.

    token-mean               Σ_valid ℓ / N_tokens                      (N_tokens: batch_num_tokens)
    token-sum                Σ_valid ℓ
    seq-mean-token-sum       Σ_seq (Σ_t ℓ) / N_seqs                    (N_seqs: global_batch_size)
    seq-mean-token-mean      Σ_seq (Σ_t ℓ / T_seq) / N_seqs
    seq-mean-token-sum-norm  Σ_seq (Σ_t ℓ) / N_seqs / loss_scale_factor (default: T, the padded length)

each multiplied by dp_size. In data-parallel runs, pass the *global* token / sequence counts and the
data-parallel size: the gradient then does not depend on how the batch was sharded (DDP/FSDP average
gradients over ranks, which the dp_size factor undoes). Without them the counts are this batch's own.
Sequences with no valid token are excluded from N_seqs; an all-masked batch gives an exact, finite 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class GlobalBatch:
    """What a data-parallel loss must know about the whole batch, beyond its own shard (all optional).

    dp_size             data-parallel ranks whose gradients are averaged (the loss is multiplied by it)
    batch_num_tokens    valid tokens in the global batch (token-mean)
    global_batch_size   sequences in the global batch (seq-mean-* modes)
    loss_scale_factor   the divisor of seq-mean-token-sum-norm (default: T, the padded length)

    verl passes these as ``config.global_batch_info``, OpenRLHF as ``PolicyLoss.forward`` arguments.
    """

    dp_size: int = 1
    batch_num_tokens: float | Tensor | None = None
    global_batch_size: float | Tensor | None = None
    loss_scale_factor: float | None = None


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens: float | Tensor | None = None,
    global_batch_size: float | Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Aggregate ``per_token_loss`` (B, T) over valid positions of ``mask`` (B, T) into a scalar.

    Masked positions are selected away with ``torch.where`` so NaN/inf padding never leaks in.

    Args:
        per_token_loss: (B, T) loss per token; anything (NaN, ±inf) at masked positions.
        mask: (B, T) bool (or 0/1) marking the valid tokens.
        mode: one of ``AGG_MODES`` (the module docstring gives each formula).
        dp_size: data-parallel ranks whose gradients are averaged; the loss is multiplied by it.
        batch_num_tokens: valid tokens in the global batch (token-mean); None: this batch's own count.
        global_batch_size: sequences in the global batch (seq-mean-* modes); None: this batch's own count.
        loss_scale_factor: the divisor of seq-mean-token-sum-norm; None: T, the padded length.
    """
    if per_token_loss.dim() != 2 or per_token_loss.shape != mask.shape:
        raise ValueError(
            f"per_token_loss and mask must both be (B, T) with equal shapes, got "
            f"{tuple(per_token_loss.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.bool() if mask.dtype != torch.bool else mask
    global_batch = GlobalBatch(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    row_weight = row_weights(mask, mode, global_batch, dtype=per_token_loss.dtype)
    zero = torch.zeros((), dtype=per_token_loss.dtype, device=mask.device)
    return weighted_row_sum(torch.where(mask, per_token_loss, zero), row_weight)


def weighted_row_sum(per_token_loss: Tensor, row_weight: Tensor) -> Tensor:
    """Σ_b w_b · Σ_t ℓ_bt for a per-token loss already 0 at masked positions, w from ``row_weights``."""
    return (per_token_loss.sum(-1, keepdim=True) * row_weight).sum()


def row_weights(
    mask: Tensor,
    mode: str,
    global_batch: GlobalBatch = GlobalBatch(),
    *,
    dtype: torch.dtype = torch.float32,
    valid_tokens: Tensor | None = None,
) -> Tensor:
    """The row weight w (B, 1) with loss = Σ_b w_b Σ_t ℓ_bt over valid tokens: every mode above is one.

    Known before any per-token loss is, which is what lets the compiled and fused paths write each
    token's gradient in one pass. ``valid_tokens``: ``mask``'s count, at least 1, in ``dtype``, if the caller has it
    (``_checks.Batch.valid_tokens``; not counted again).
    """
    check_choice("agg", mode, AGG_MODES)
    dp_size = global_batch.dp_size
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be a positive int, got {dp_size!r}")
    if mode == "token-mean" and global_batch.batch_num_tokens is None and dp_size == 1:
        # the default: 1 / this batch's valid tokens, broadcast as a view (the value of the general case below,
        # ones * (1 / n) = reciprocal(n), with three fewer host-side operations)
        if valid_tokens is None:
            valid_tokens = mask.sum().clamp(min=1).to(dtype)
        return valid_tokens.reciprocal().expand(mask.shape[0], 1)
    ones = torch.ones(mask.shape[0], 1, dtype=dtype, device=mask.device)
    if mode == "token-sum":
        return ones * dp_size
    if mode == "token-mean":
        batch_num_tokens = global_batch.batch_num_tokens
        if batch_num_tokens is None:  # dp_size > 1 (dp_size 1 returned above)
            raise ValueError("batch_num_tokens (the global valid-token count) is required when dp_size > 1")
        batch_num_tokens = _check_positive("batch_num_tokens", batch_num_tokens, dtype)
        return ones * (dp_size / batch_num_tokens)
    tokens_per_seq = mask.sum(dim=-1, keepdim=True).to(dtype)
    global_batch_size = global_batch.global_batch_size
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size (the global count of sequences) is required when dp_size > 1")
        global_batch_size = (tokens_per_seq > 0).sum().clamp(min=1).to(dtype)
    else:
        global_batch_size = _check_positive("global_batch_size", global_batch_size, dtype)
    row_weight = ones * (dp_size / global_batch_size)
    if mode == "seq-mean-token-mean":
        row_weight = row_weight / tokens_per_seq.clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        loss_scale_factor = global_batch.loss_scale_factor
        if loss_scale_factor is None:
            loss_scale_factor = mask.shape[-1]
        _check_positive("loss_scale_factor", loss_scale_factor)
        row_weight = row_weight / loss_scale_factor
    return row_weight


def _check_positive(name: str, value, dtype: torch.dtype = torch.float32):
    """Python numbers must be > 0; tensors are taken as given (checking one would force a sync)."""
    if isinstance(value, Tensor):
        return value.to(dtype)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value
