"""compute_policy_loss: log-probs → ratio → surrogate objective → aggregation → metrics.

This is the one place every adapter calls. The per-token math is in ``surrogates.py``, the per-token
pass (objective, analytic derivative, metrics in one sweep) in ``_per_token.py``, the reduction in
``aggregation.py``, the statistics in ``metrics.py``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._checks import (
    Batch,
    cast,
    check_batch,
    check_choice,
    check_dual_clip,
    check_eps,
    check_finite_where,
    check_tensor,
    raise_if_mask_invalid,
)
from ._per_token import PassOptions, compiled_policy_loss, eager_policy_loss
from .aggregation import GlobalBatch, row_weights
from .metrics import by_name, metric_names, metrics_dict, read_metrics
from .surrogates import get_objective

RATIO_LEVELS = ("token", "sequence")
_LOCAL_BATCH = GlobalBatch()  # dp_size 1, this batch's own counts


@dataclass(frozen=True)
class PolicyLossOutput:
    """What a policy-loss call returns (named fields, no positional tuples).

    Attributes:
        loss: fp32 scalar to minimise (−aggregated objective), carries the autograd graph.
        metrics: detached 0-dim fp32 tensors keyed by the names in ``metrics.py``.
        per_token_loss: (B, T) fp32, the per-token term that ``loss`` aggregates (loss = Σ_b w_b Σ_t of it, w
            the row weights of ``agg``), exactly 0 at masked positions: one meaning, three forms by entry point.
            ``compute_policy_loss``: −objective (× weights), with graph, for frameworks that aggregate or add
            KL terms etc. themselves; with ``compile=True``: None (the compiled pass never materialises it);
            ``fused_linear_policy_loss``: −objective (× weights) + beta·k3 (its KL term, which it aggregates
            too), detached (only ``loss`` carries a gradient there).
        ratio: (B, T) detached ratio as the objective used it (sequence ratio broadcast over T).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    per_token_loss: Tensor | None = None
    ratio: Tensor | None = None

    #: what the loss's one sync read: (``metrics``' (name, tensor) items then, their buffer's version then, floats)
    _host_metrics: tuple | None = field(default=None, repr=False, compare=False)

    def metric_floats(self) -> dict[str, float]:
        """``metrics`` as Python floats, as the dict is when called. With ``check_finite`` (the default)
        ``compute_policy_loss`` already read them in its one device sync, so this costs none while ``metrics``
        holds exactly those tensors, unmodified; otherwise (an entry added, replaced or removed, or the buffer
        written in place) one transfer (``read_metrics``)."""
        if self._host_metrics is not None:
            items, version, floats = self._host_metrics
            now = tuple(self.metrics.items())
            if (
                len(now) == len(items)
                and all(k == k0 and v is v0 for (k, v), (k0, v0) in zip(now, items))
                and now[0][1]._version == version
            ):
                return dict(floats)
        return read_metrics(self.metrics)


def pass_options(objective, eps_low, eps_high, dual_clip, ratio_level, *, with_metrics=True) -> PassOptions:
    """Validate the scalar arguments of a policy loss into the typed options of the per-token pass (the result
    is cached per argument values and types: a training loop passes the same ones every step)."""
    try:
        return _cached_pass_options(objective, eps_low, eps_high, dual_clip, ratio_level, with_metrics)
    except TypeError:  # an unhashable argument: validated (and refused) uncached, with its own message
        return _pass_options(objective, eps_low, eps_high, dual_clip, ratio_level, with_metrics)


def _pass_options(objective, eps_low, eps_high, dual_clip, ratio_level, with_metrics) -> PassOptions:
    record = get_objective(objective)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    eps_low, eps_high = check_eps(eps_low, eps_high)
    dual_clip = check_dual_clip(dual_clip) if record.takes_dual_clip else None
    return PassOptions(record, eps_low, eps_high, dual_clip, ratio_level, with_metrics)


# typed: 1 and True, 0.2 and np.float64(0.2) are cached apart, so each is validated as itself; errors are not cached
_cached_pass_options = functools.lru_cache(maxsize=64, typed=True)(_pass_options)


def compute_policy_loss(
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
    weights: Tensor | None = None,
    check_finite: bool = True,
    dp_size: int = 1,
    batch_num_tokens: float | Tensor | None = None,
    global_batch_size: float | Tensor | None = None,
    loss_scale_factor: float | None = None,
    compile: bool = False,
    fast: bool | None = None,
) -> PolicyLossOutput:
    """Policy-gradient loss for ``objective`` "cfpo" (clipping-free) or "clip" (PPO/GRPO).

    Args:
        log_prob: (B, T) log π_θ of the sampled tokens (carries the gradient).
        old_log_prob: (B, T) log π_old of the same tokens (the behaviour / pre-update policy).
        advantages: (B,), (B, 1) or (B, T).
        mask: (B, T) bool (or 0/1) marking valid response tokens. Masked positions may hold anything.
        objective: "cfpo" or "clip".
        eps_low: the trust region's lower half-width: ε for tokens with A < 0, in (0, 1).
        eps_high: the upper half-width: ε for tokens with A > 0; None means ``eps_low``.
        dual_clip: c > 1 for dual-clip PPO (clip objective only; ignored by cfpo, which has no clip).
        agg: one of ``AGG_MODES`` (verl ``agg_loss`` semantics, see ``aggregation.py``).
        ratio_level: "token", or "sequence" for the GSPO ratio exp(mean_t log r) per sequence.
        weights: optional (B, T) per-token importance weights multiplied onto the per-token loss
            (rollout / train mismatch corrections); no gradient flows into them.
        check_finite: raise on NaN/inf at valid positions. Costs the call's one device sync, which also
            brings every metric to the host (``metric_floats()`` then costs none); off: no sync at all.
        dp_size: data-parallel ranks whose gradients are averaged; the loss is multiplied by it
            (``aggregate_loss``).
        batch_num_tokens: valid tokens in the global batch (token-mean); None: this batch's own count.
        global_batch_size: sequences in the global batch (seq-mean-* modes); None: this batch's own count.
        loss_scale_factor: the divisor of seq-mean-token-sum-norm; None: T, the padded length.
        compile: True runs the per-token pass and the aggregation through ``torch.compile`` (the first
            call per shape family compiles: seconds to tens of seconds; afterwards faster than the default
            eager pass: benchmarks/README.md). Same loss, gradient and metrics; no ``per_token_loss``.
        fast: the old name of ``compile`` (until 0.2); deprecated, warns.
    """
    if fast is not None:
        warnings.warn(
            "compute_policy_loss(fast=...) is deprecated: use compile=... (fast= goes in the release after 0.2)",
            DeprecationWarning,
            stacklevel=2,
        )
        if compile and not fast:
            raise ValueError("compute_policy_loss: pass compile=..., not both compile= and the deprecated fast=")
        compile = fast
    options = pass_options(objective, eps_low, eps_high, dual_clip, ratio_level)
    check_choice("compile", compile, (False, True))
    check_tensor("log_prob", log_prob)
    check_tensor("old_log_prob", old_log_prob)
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be (B, T), got shape {tuple(log_prob.shape)}")
    batch = check_batch(
        log_prob.shape,
        log_prob.device,
        old_log_prob,
        advantages,
        mask,
        weights,
        log_prob=log_prob,
        defer_mask_check=check_finite,
    )
    if (
        type(dp_size) is int
        and dp_size == 1
        and batch_num_tokens is None
        and global_batch_size is None
        and loss_scale_factor is None
    ):
        global_batch = _LOCAL_BATCH  # the default: no dataclass to build per call
    else:
        global_batch = GlobalBatch(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    # validates agg and the counts
    row_weight = row_weights(batch.mask, agg, global_batch, dtype=batch.dtype, valid_tokens=batch.valid_tokens)
    return policy_loss(log_prob, batch, options, row_weight, compile=compile, check_finite=check_finite)


def policy_loss(
    log_prob: Tensor,
    batch: Batch,
    options: PassOptions,
    row_weight: Tensor,
    *,
    compile: bool = False,
    check_finite: bool = True,
) -> PolicyLossOutput:
    """The policy loss of checked inputs: the one core call behind ``compute_policy_loss`` and the fused path.

    ``log_prob`` (B, T), computed in ``batch.dtype`` (its gradient comes in its own dtype); ``batch`` from
    ``check_batch`` (``old_log_prob`` given); ``options`` from ``pass_options`` (with metrics); ``row_weight``
    (B, 1) from ``aggregation.row_weights``: the aggregation mode and the global batch, as the one weight per row
    (loss = Σ_b w_b Σ_t ℓ_bt)."""
    if compile:
        loss, _, ratio, metrics = compiled_policy_loss(
            cast(log_prob, batch.dtype),
            batch.old_log_prob,
            batch.advantages,
            batch.mask,
            row_weight,
            batch.weights,
            options,
        )
        per_token_loss = None
    else:
        loss, per_token_loss, ratio, metrics = eager_policy_loss(
            log_prob,
            batch.old_log_prob,
            batch.advantages,
            batch.mask,
            batch.weights,
            row_weight,
            options,
            valid_tokens=batch.valid_tokens,
        )
    names = metric_names(options.dual_clip is not None, options.objective.has_penalty)
    metrics_by_name = metrics_dict(metrics, names)
    host = None
    if check_finite:  # THE one device sync: every metric and the finiteness sums after them, in one transfer
        mask_invalid = batch.mask_invalid
        if mask_invalid is None:
            values = metrics.tolist()
        else:  # a 0/1 mask's values ride on it too: NaN if one is neither
            values = torch.cat([metrics, torch.where(mask_invalid, torch.nan, 0.0).reshape(1)]).tolist()
        if not all(map(math.isfinite, values[len(names) :])):
            raise_if_mask_invalid(mask_invalid)
            check_finite_where(
                batch.mask,
                log_prob=log_prob.detach(),
                old_log_prob=batch.old_log_prob,
                advantages=batch.advantages,
                weights=batch.weights,
            )
        host = (tuple(metrics_by_name.items()), metrics._version, by_name(values, names))
    # already fp32 (fp64 only when an input is fp64, for gradcheck)
    return PolicyLossOutput(
        loss=loss, metrics=metrics_by_name, per_token_loss=per_token_loss, ratio=ratio, _host_metrics=host
    )
