"""The per-token pass behind compute_policy_loss: ratio, objective, its derivative, metrics, at once.

``policy_terms`` computes everything per token in one sweep over the (B, T) inputs: the ratio, the
objective and its analytic derivative dJ/dr (the objective's ``terms`` function from
``surrogates.OBJECTIVES``: the same code as the public surrogate), the trust-region metrics (one buffer)
and the sums the finiteness check reads (in the same buffer). Autograd then needs one multiply to go backwards
(``EagerPolicyLoss``) instead of replaying every elementwise op.

Three callers, one pass:
  eager      ``EagerPolicyLoss`` (an autograd Function: compute_policy_loss's default)
  compiled   ``compiled_policy_loss``: the pass with the aggregation folded in, under ``torch.compile``
  fused      ``dloss_dlog_prob``: the gradient of the aggregated loss w.r.t. log π only (no metrics), per block
             of tokens, inside cfpo_loss.fused (``compiled_dloss_dlog_prob``: the same under torch.compile)

(This module was ``onepass.py``, named after the speed property; it is named after what it computes.)

The pass is configured by a typed, hashable ``PassOptions`` (one compiled kernel per distinct options).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from ._checks import cast
from .aggregation import weighted_row_sum
from .metrics import trust_region_metrics
from .surrogates import Constants, Objective, constants

#: log-ratios are clamped to this range before exp, as verl and OpenRLHF do
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class PassOptions:
    """Everything that configures the per-token pass besides the tensors (validated by the caller)."""

    objective: Objective
    eps_low: float
    eps_high: float
    dual_clip: float | None  # already None for objectives that take none
    ratio_level: str  # "token" or "sequence" (GSPO)
    with_metrics: bool = True


class Select:
    """``torch.where(mask, x, fill)``; on CPU, for large tensors, as integer bit operations on float32/float64 bits.

    Like ``where`` (and unlike ``x * mask``), NaN or inf at masked positions cannot leak through: the bits
    there are replaced, not multiplied. On CPU ``where`` with a bool condition is much slower than one
    vectorised AND (benchmarks/README.md, "What made the eager path fast"), and a policy loss needs several selects.
    On a GPU both are one memory-bound kernel, and the bit mask costs extra launches, so there, and under
    torch.compile (whose fused kernel selects for free), it is plain ``where``. ``bitwise=False`` asks for
    ``where`` on CPU too: below ``BITWISE_MIN_NUMEL`` elements the bit mask's extra operations (building it,
    three per fill) cost more host time than ``where``'s slower loop (``policy_terms`` passes that).
    No autograd (used inside the forward below).
    """

    _INT: ClassVar[dict[torch.dtype, torch.dtype]] = {torch.float32: torch.int32, torch.float64: torch.int64}

    def __init__(self, mask: Tensor, dtype: torch.dtype, bitwise: bool = True):
        self.mask, self.dtype = mask, dtype
        compiling = torch.compiler.is_compiling()
        #: 0-dim tensors for the scalar operands of eager ops (None under torch.compile: plain numbers there)
        self.scalars = None if compiling else scalars(dtype, mask.device)
        self.bitwise = bitwise and mask.device.type == "cpu" and not compiling
        if self.bitwise:
            self.int_dtype = self._INT[dtype]
            self.bits = mask.to(self.int_dtype).neg_()  # all ones where valid, all zeros elsewhere

    def zero(self, x: Tensor) -> Tensor:
        """where(mask, x, 0)"""
        if not self.bitwise:
            return torch.where(self.mask, x, 0.0 if self.scalars is None else self.scalars.zero)
        return (x.view(self.int_dtype) & self.bits).view(self.dtype)

    def fill(self, x: Tensor, value: float) -> Tensor:
        """where(mask, x, value): ((x ^ f) & m) ^ f is x where m is all ones, f where it is zero."""
        if not self.bitwise:
            return torch.where(self.mask, x, value if self.scalars is None else self.scalars.get(value))
        f = _fill_bits(self.dtype, value)  # a Python int: no tensor to build per call
        return (((x.view(self.int_dtype) ^ f) & self.bits) ^ f).view(self.dtype)


class Scalars(NamedTuple):
    """0-dim tensors of one dtype and device for the scalar operands of the eager pass: an op given a Python
    number wraps it in a fresh tensor each call (measured: ~1.3 µs of the ~1.3-1.5 µs an op on a small tensor
    costs on a CPU; on a GPU the same host work). Cached per (dtype, device) by ``scalars``; never written."""

    zero: Tensor
    one: Tensor
    inf: Tensor
    neg_inf: Tensor
    log_ratio_low: Tensor  # −LOG_RATIO_CLAMP: the clamp's bounds as tensors too (measured: 2.1 → 1.7 µs per clamp)
    log_ratio_high: Tensor  # LOG_RATIO_CLAMP

    def get(self, value: float) -> Tensor | float:
        """The 0-dim tensor for ``value`` if it is 0, 1, inf or -inf, else ``value``."""
        if value == 1.0:
            return self.one
        if value == 0.0:
            return self.zero
        if value == torch.inf:
            return self.inf
        if value == -torch.inf:
            return self.neg_inf
        return value


@functools.lru_cache(maxsize=32)
def scalars(dtype: torch.dtype, device: torch.device) -> Scalars:
    values = (0.0, 1.0, torch.inf, -torch.inf, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return Scalars(*(torch.tensor(v, dtype=dtype, device=device) for v in values))


#: below this many elements ``policy_terms`` selects with ``where`` on CPU too (see ``Select``); measured on a
#: 2-core CPU (benchmarks/README.md, "Host-bound shapes"): the bit mask pays from a few thousand elements on
BITWISE_MIN_NUMEL = 4096


_STRUCT = {torch.float32: ("<f", "<i"), torch.float64: ("<d", "<q")}


def _fill_bits(dtype: torch.dtype, value: float) -> int:
    """The bits of ``value`` in ``dtype`` as a signed Python int of the same width (xor operand of ``fill``);
    on the host, so no tensor is built and nothing is read back."""
    float_format, int_format = _STRUCT[dtype]
    return struct.unpack(int_format, struct.pack(float_format, value))[0]


@functools.lru_cache(maxsize=64)
def pass_constants(options: PassOptions, dtype: torch.dtype, device: torch.device) -> Constants:
    """``surrogates.constants`` of ``options`` as 0-dim tensors of ``dtype`` on ``device``, built once per
    (options, dtype, device), never written: the eager pass's scalar operands (see ``Scalars``: the same
    reason, the same choice of device)."""
    values = constants(options.eps_low, options.eps_high, options.dual_clip)
    return Constants(*(None if v is None else torch.tensor(v, dtype=dtype, device=device) for v in values))


class PolicyTerms(NamedTuple):
    per_token_loss: Tensor  # −J (× weights), exactly 0 at masked positions
    dloss_dratio: Tensor  # d per_token_loss / d ratio, per token (× weights)
    ratio: Tensor
    passes: Select  # valid tokens whose log-ratio the ±20 clamp did not cut (the gradient flows there)
    tokens_per_row: Tensor | None  # (B, 1) valid tokens per sequence, at least 1 (sequence level only)
    # the metric buffer (metrics.buffer_order), then the finiteness sums: all finite iff every valid
    # log-ratio, advantage and weight is (or a sum overflowed); None without with_metrics
    metrics: Tensor | None


def policy_terms(
    log_prob, old_log_prob, advantages, mask, weights, options: PassOptions, valid_tokens=None
) -> PolicyTerms:
    """Everything per token in one pass, from checked, cast, (B, T)-shaped inputs (no autograd here).
    ``valid_tokens``: ``mask``'s count, at least 1, in the compute dtype, if the caller has it (for the metrics).

    Masked positions are selected away first (never multiplied: NaN·0 = NaN, and padding log-probs are
    often NaN or -inf) and then hold ratio 1, log-ratio 0, advantage 0, so every per-token term is 0 there.
    """
    bitwise = mask.numel() >= BITWISE_MIN_NUMEL
    valid = Select(mask, log_prob.dtype, bitwise)
    raw_log_ratio = valid.zero(log_prob - old_log_prob)
    s = valid.scalars  # None under torch.compile: plain numbers there
    low, high = (-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) if s is None else (s.log_ratio_low, s.log_ratio_high)
    log_ratio = raw_log_ratio.clamp(low, high)
    passes = Select(mask & (log_ratio == raw_log_ratio), log_prob.dtype, bitwise)
    advantages = valid.zero(advantages)
    tokens_per_row = None
    if options.ratio_level == "sequence":  # GSPO: r = exp(mean_t log r_t), one per sequence
        tokens_per_row = mask.sum(-1, keepdim=True).clamp(min=1)
        ratio = valid.fill((log_ratio.sum(-1, keepdim=True) / tokens_per_row).exp().expand_as(log_ratio), 1.0)
    else:
        ratio = log_ratio.exp()
    k = None if valid.scalars is None else pass_constants(options, log_prob.dtype, log_prob.device)
    objective, args = options.objective, (ratio, advantages, options.eps_low, options.eps_high, options.dual_clip)
    terms = objective.terms(*args, k=k) if objective.takes_constants else objective.terms(*args)
    per_token_loss, dloss_dratio = -terms.objective, -terms.derivative
    if weights is not None:
        weights = valid.zero(weights)
        per_token_loss.mul_(weights)  # in place: both are fresh from the negation above
        dloss_dratio.mul_(weights)
    metrics = None
    if options.with_metrics:
        metrics = trust_region_metrics(
            ratio,
            log_ratio,
            advantages,
            mask,
            eps_low=options.eps_low,
            eps_high=options.eps_high,
            dual_clip=options.dual_clip,
            penalty=terms.penalty,
            ratio_level=options.ratio_level,
            select=valid,
            exits=terms.exits,
            k=k,
            count=valid_tokens,
            # the finite check's sums, in the same buffer: read in the loss's one transfer
            finite_sums=(raw_log_ratio.sum(), advantages.sum()) + (() if weights is None else (weights.sum(),)),
        )
    return PolicyTerms(per_token_loss, dloss_dratio, ratio, passes, tokens_per_row, metrics)


def chain_to_log_prob(grad_ratio: Tensor, terms: PolicyTerms, ratio_level: str) -> Tensor:
    """A gradient w.r.t. the ratio (per token) as one w.r.t. log π, by the chain rule: dr/dlog π_t = r (token
    ratio), or r/|y| for every token of the row (sequence); 0 at masked tokens and where the ±20 clamp cut the
    log-ratio (``terms.passes``)."""
    if ratio_level == "sequence":
        row = (grad_ratio * terms.ratio).sum(-1, keepdim=True) / terms.tokens_per_row
        return terms.passes.zero(row.expand_as(grad_ratio))
    return terms.passes.zero(grad_ratio * terms.ratio)


# ---- eager: compute_policy_loss's default -------------------------------------------------------------


class EagerCall:
    """One eager call's inputs besides log_prob, and its outputs that carry no gradient (``ratio`` and the
    ``metrics`` buffer, set by the forward). ``EagerPolicyLoss`` takes them as this one non-tensor argument instead of
    as tensor arguments and outputs: ``Function.apply`` does work per tensor argument (does it need a gradient?)
    and per output (a graph edge, version counter and non-differentiable mark each), which is host time, and
    only log_prob needs a gradient and only (loss, per_token_loss) carry one."""

    __slots__ = (
        "advantages",
        "dtype",
        "mask",
        "metrics",
        "old_log_prob",
        "options",
        "ratio",
        "row_weight",
        "valid_tokens",
        "weights",
    )

    def __init__(self, old_log_prob, advantages, mask, weights, row_weight, options: PassOptions, valid_tokens):
        self.old_log_prob, self.advantages, self.mask, self.weights = old_log_prob, advantages, mask, weights
        self.row_weight, self.options, self.valid_tokens = row_weight, options, valid_tokens
        self.dtype = advantages.dtype  # the compute dtype (check_batch cast the batch to it)


class EagerPolicyLoss(torch.autograd.Function):
    """The loss (the aggregation ``weighted_row_sum`` with ``row_weight``) and per_token_loss from
    ``policy_terms``, both differentiable w.r.t. log_prob through the analytic derivative (the backward is one
    multiply, instead of replaying ~a dozen elementwise ops). The aggregation runs inside the Function: the
    same arithmetic as autograd through it would do (forward and backward), without recording three graph
    nodes and replaying them: host time, which is what a small batch, or any batch on a GPU, waits for.
    ``apply(log_prob, call)``: outputs (loss, per_token_loss); the rest goes to ``call`` (``EagerCall``).
    log_prob may come in another float dtype than the compute dtype (bf16 log-probs): the Function casts it and
    casts its gradient back, as autograd through a cast before it would (ToCopyBackward: ``grad.to(dtype)``),
    without a second graph node to record and run."""

    @staticmethod
    def forward(ctx, log_prob, call: EagerCall):
        options = call.options
        ctx.log_prob_dtype = log_prob.dtype
        terms = policy_terms(
            cast(log_prob.detach(), call.dtype),
            call.old_log_prob,
            call.advantages,
            call.mask,
            call.weights,
            options,
            call.valid_tokens,
        )
        # per_token_loss is exactly 0 at masked positions
        loss = weighted_row_sum(terms.per_token_loss, call.row_weight)
        ctx.ratio_level, ctx.row_weight = options.ratio_level, call.row_weight
        if ctx.ratio_level == "sequence":
            ctx.terms = terms._replace(metrics=None)
        else:  # the elementwise gradient, ready for one multiply
            ctx.save_for_backward(chain_to_log_prob(terms.dloss_dratio, terms, "token"))
        # made under the forward's no-grad mode, returned out of band: plain tensors, no gradient
        call.ratio, call.metrics = terms.ratio, terms.metrics
        ctx.set_materialize_grads(False)  # no zero gradient for an unused output (kernels saved)
        return loss, terms.per_token_loss

    @staticmethod
    def backward(ctx, grad_loss, grad_per_token):
        # d loss / d per_token_loss = row_weight (B, 1), as autograd through weighted_row_sum gives it; the
        # gradient reaching per_token_loss from the caller's own use of it adds to that
        if grad_loss is not None:
            grad_loss = grad_loss * ctx.row_weight
            grad_per_token = grad_loss if grad_per_token is None else grad_loss + grad_per_token
        if grad_per_token is None:
            return None, None
        if ctx.ratio_level == "sequence":
            grad = chain_to_log_prob(grad_per_token * ctx.terms.dloss_dratio, ctx.terms, "sequence")
        else:
            (token_grad,) = ctx.saved_tensors
            grad = grad_per_token * token_grad
        return cast(grad, ctx.log_prob_dtype), None


def eager_policy_loss(
    log_prob, old_log_prob, advantages, mask, weights, row_weight, options: PassOptions, valid_tokens=None
):
    """(loss, per_token_loss, ratio, metric buffer) of the eager pass; the first two carry the
    gradient w.r.t. log_prob (``EagerPolicyLoss``)."""
    call = EagerCall(old_log_prob, advantages, mask, weights, row_weight, options, valid_tokens)
    loss, per_token_loss = EagerPolicyLoss.apply(log_prob, call)
    return loss, per_token_loss, call.ratio, call.metrics


# ---- compiled: compute_policy_loss(compile=True) ---------------------------------------------------------


class CompiledResult(NamedTuple):
    loss: Tensor
    grad: Tensor  # dL/dlog_prob
    ratio: Tensor
    metrics: Tensor | None  # as PolicyTerms.metrics


def loss_and_grad(
    log_prob, old_log_prob, advantages, mask, row_weight, weights, options: PassOptions
) -> CompiledResult:
    """policy_terms with the aggregation's row weight folded in: the loss and its gradient w.r.t. log_prob.
    ``mask`` may come as floats (0/1): compiled CPU kernels load a float mask faster than a bool one
    (benchmarks/README.md), so ``compiled_policy_loss`` passes one."""
    if mask.dtype != torch.bool:
        mask = mask > 0
    terms = policy_terms(log_prob, old_log_prob, advantages, mask, weights, options)
    loss = weighted_row_sum(terms.per_token_loss, row_weight)
    grad = chain_to_log_prob(terms.dloss_dratio * row_weight, terms, options.ratio_level)
    return CompiledResult(loss, grad, terms.ratio, terms.metrics)


@functools.lru_cache(maxsize=64)
def _compiled_forward(options: PassOptions):
    return torch.compile(functools.partial(loss_and_grad, options=options), dynamic=None)


class _WithGradient(torch.autograd.Function):
    """Returns ``value`` unchanged; its gradient w.r.t. ``log_prob`` is the precomputed ``grad``."""

    @staticmethod
    def forward(ctx, value: Tensor, log_prob: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        (grad,) = ctx.saved_tensors
        return None, grad_value * grad, None


def compiled_policy_loss(
    log_prob, old_log_prob, advantages, mask, row_weight, weights, options: PassOptions
) -> CompiledResult:
    """Run the compiled pass and attach its analytic gradient to log_prob (``loss`` carries the graph)."""
    with torch.no_grad():
        out = _compiled_forward(options)(
            log_prob.detach(), old_log_prob, advantages, mask.to(log_prob.dtype), row_weight, weights
        )
    if log_prob.requires_grad:
        out = out._replace(loss=_WithGradient.apply(out.loss, log_prob, out.grad.to(log_prob.dtype)))
    return out


# ---- fused: dL/dlog π per block ------------------------------------------------------------------------


def dloss_dlog_prob(log_prob, old_log_prob, advantages, mask, row_weight, weights, options: PassOptions) -> Tensor:
    """dL/dlog π for L = Σ row_weight·per_token_loss; ``row_weight`` (B, 1), or (B, T) holding each token's row
    weight (the fused path lays a block of tokens from many rows out as one row); no metrics."""
    terms = policy_terms(log_prob, old_log_prob, advantages, mask, weights, options)
    return chain_to_log_prob(terms.dloss_dratio * row_weight, terms, options.ratio_level)


@functools.lru_cache(maxsize=64)
def compiled_dloss_dlog_prob(options: PassOptions):
    """``dloss_dlog_prob`` under torch.compile, for one ``options`` (shapes vary: dynamic after the first)."""
    return torch.compile(functools.partial(dloss_dlog_prob, options=options), dynamic=None)
