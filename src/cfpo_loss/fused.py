"""Fused chunked LM head + policy loss: never materialises the (tokens × vocabulary) logits.

    fused_linear_policy_loss(hidden, lm_head_weight, target_ids, old_log_prob, advantages, mask, ...)

equals, in value and in gradient w.r.t. ``hidden``, ``lm_head_weight`` and ``lm_head_bias``::

    logits   = (hidden @ lm_head_weight.T + lm_head_bias) / temperature
    log_prob = log_softmax(logits.float()).gather(-1, target_ids)
    compute_policy_loss(log_prob, old_log_prob, advantages, mask, ...)   (+ beta · k3 KL, as TRL)

How (one pass, three GEMMs, no recompute). The aggregation is linear in the per-token loss, L = Σ c_t ℓ_t,
and its coefficients c_t depend only on the mask (and the global counts the caller passes), so they are
known before the pass (``aggregation.aggregation_scale``). Then, for each block of valid tokens (padding
is skipped entirely), with no host synchronisation inside the loop:

    z = h_blk @ W.T (+ b)                                  GEMM 1: one (n, V) tile
    log-softmax statistics, target log-probs               the fold's forward, in fp32
    g = dL/dlog_prob                                       the core's per-token pass (onepass.policy_grad)
    z := g · (onehot − softmax(z / T)) / T                 the fold's backward, in place on the tile
    grad_h[blk] = z @ W                                    GEMM 2
    grad_W += z.T @ h_blk,  grad_b += Σ z                  GEMM 3, accumulated in fp32

The returned loss, metrics and ratio are the core's ``compute_policy_loss`` on the gathered log-probs.

Two folds, one per device, each a small class with the same two methods (``TileFold``):

* ``InPlaceFold`` (CPU): an fp32 tile; exp(z − max) is written over the tile in the forward and turned
  into dL/dz in the backward, in place. Fewest passes over memory, which is what a CPU is bound by.
* ``CompiledFold`` (CUDA): the tile stays in the input dtype (bf16: half the bytes of every pass, and the
  GEMMs run on bf16 tensor cores); the two folds are ``torch.compile``d functions that read it, compute
  in fp32 and write dL/dz back over it in the input dtype. The weight gradient is accumulated in fp32
  with ``torch.addmm(..., out_dtype=torch.float32)`` where the device has it (``accumulate_fp32``),
  else from fp32 copies. The plain functions ``fold_forward`` / ``fold_backward_`` are the torch twins
  the tests hold the compiled ones to (on CPU, where inductor compiles them to C++).

With ``ratio_level="sequence"`` (GSPO) a token's gradient depends on its whole row, so blocks are made
of whole rows (as many as fit in ``chunk_size`` valid tokens, at least one row).

Low precision (bf16 / fp16): the tile comes out of the GEMM in the input dtype (fp32 accumulation inside
the GEMM, as the model's own lm_head does); log-softmax, loss and the tile's gradient are computed in fp32;
the gradient tile is stored in the input dtype for the two gradient GEMMs (as autograd does in the unfused
bf16 path); the weight and bias gradients are accumulated in fp32 and cast once at the end (a bf16
accumulator would round every block's contribution; TRL's chunked kernel makes the same choice).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_choice, check_float, check_positive_int, check_tensor
from .aggregation import AGG_MODES, aggregate_loss, aggregation_scale
from .loss import PolicyLossOutput, check_batch, compute_policy_loss, pass_options
from .onepass import PassOptions, compiled_policy_grad, policy_grad

__all__ = ["fused_linear_policy_loss", "default_chunk_size"]

#: CPU: target size of one fp32 logits tile (elements); 2**25 elements = 128 MiB. Smaller tiles make the
#: logits matmul (tokens × H) @ (H × V) measurably less efficient on CPU (short M dimension).
_CPU_TILE_ELEMENTS = 2**25
#: CUDA: the tile (input dtype) may take this share of the free device memory, at most _GPU_TILE_BYTES;
#: 4096 tokens × the whole vocabulary was the fastest block in DESIGN §4c's prototype (1.2 GB at V=152k bf16)
_GPU_TILE_SHARE, _GPU_TILE_BYTES = 1 / 16, 1536 * 2**20


def default_chunk_size(vocab_size: int, dtype: torch.dtype = torch.float32, device="cpu") -> int:
    """Valid tokens per block. CPU: one fp32 (tokens × V) tile of about 128 MiB, clamped to [64, 4096].
    CUDA: a tile in ``dtype`` of at most 1.5 GiB and 1/16 of the free device memory, clamped to
    [128, 4096] and rounded down to a multiple of 128 (GEMM-friendly)."""
    device = torch.device(device)
    if device.type != "cuda":
        return int(min(4096, max(64, _CPU_TILE_ELEMENTS // max(1, vocab_size))))
    free, _ = torch.cuda.mem_get_info(device)
    budget = min(_GPU_TILE_BYTES, free * _GPU_TILE_SHARE)
    tokens = int(budget // (max(1, vocab_size) * torch.finfo(dtype).bits // 8))
    return max(128, min(4096, tokens) // 128 * 128)


# ---- the tile step: log-softmax statistics forward, dL/dz backward ----------------------------------------


class TileStats(NamedTuple):
    log_prob: Tensor  # (n,) log softmax(z / T)[target], compute dtype
    entropy: Tensor | None  # (n,) entropy of softmax(z / T), if asked for
    aux: Tensor  # what the backward needs: Σ exp(z/T − max) (in-place fold) or logsumexp(z/T) (compiled)


def fold_forward(z: Tensor, target: Tensor, temperature: float, entropy: bool):
    """(logsumexp(z/T), (z/T)[target], entropy or None) per row, in fp32 (fp64 for fp64 z); z unchanged."""
    zf = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32) / temperature
    lse = torch.logsumexp(zf, -1)
    z_target = zf.gather(-1, target[:, None])[:, 0]
    ent = lse - (torch.exp(zf - lse[:, None]) * zf).sum(-1) if entropy else None
    return lse, z_target, ent


def fold_backward_(z: Tensor, target: Tensor, lse: Tensor, g: Tensor, temperature: float) -> Tensor:
    """z := g · (onehot(target) − softmax(z/T)) / T, computed in fp32, stored in z's dtype, in place."""
    zf = z.to(lse.dtype) / temperature
    p = torch.exp(zf - lse[:, None])
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == target[:, None]
    return z.copy_(((onehot.to(p.dtype) - p) * (g / temperature)[:, None]).to(z.dtype))


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=None)


class CompiledFold:
    """The tile in the input dtype; the two folds compiled (``compile=False``: their eager torch twins)."""

    def __init__(self, compile: bool = True):
        self.compile = compile

    def tile_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return input_dtype

    def forward(self, z, target, temperature, entropy) -> TileStats:
        fn = _compiled(fold_forward) if self.compile else fold_forward
        lse, z_target, ent = fn(z, target, temperature, entropy)
        return TileStats(z_target - lse, ent, lse)

    def backward_(self, z, target, stats: TileStats, g, temperature) -> Tensor:
        fn = _compiled(fold_backward_) if self.compile else fold_backward_
        return fn(z, target, stats.aux, g.to(stats.aux.dtype), temperature)


class InPlaceFold:
    """The tile in fp32 (fp64 for fp64 inputs); softmax and its gradient written over it in place."""

    def tile_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if input_dtype == torch.float64 else torch.float32

    def forward(self, z, target, temperature, entropy) -> TileStats:
        if temperature != 1.0:
            z.div_(temperature)
        z_target = z.gather(1, target[:, None])[:, 0]
        z_max = z.amax(1)
        z.sub_(z_max[:, None]).exp_()  # z := exp(z − max)
        sum_exp = z.sum(1)
        log_sum = sum_exp.log()
        ent = log_sum - torch.xlogy(z, z).sum(1) / sum_exp if entropy else None  # H = log Σe − Σ e·log e / Σe
        return TileStats(z_target - z_max - log_sum, ent, sum_exp)

    def backward_(self, z, target, stats: TileStats, g, temperature) -> Tensor:
        g = g.to(z.dtype) / temperature
        z.mul_((-g / stats.aux)[:, None])  # −g·softmax
        return z.scatter_add_(1, target[:, None], g[:, None])  # + g·onehot


def default_fold(device: torch.device):
    """CUDA: compiled folds on an input-dtype tile; elsewhere the in-place fp32 fold (measured faster on CPU)."""
    return CompiledFold() if device.type == "cuda" else InPlaceFold()


# ---- fp32 accumulation of a low-precision GEMM (GPU branch + its CPU twin) ----------------------------


@functools.lru_cache(maxsize=None)
def has_out_dtype_addmm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` runs for ``dtype`` a, b here
    (torch >= 2.8 on CUDA for bf16/fp16; not on CPU)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool(acc[0, 0] == 2)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with the product accumulated in acc's dtype, never rounded to a's dtype first.
    GPU: one low-precision GEMM writing fp32 (``out_dtype``); elsewhere: the same GEMM on fp32 copies."""
    if a.dtype == b.dtype != acc.dtype and has_out_dtype_addmm(acc.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


# ---- the plan: every check, once, before the pass ---------------------------------------------------------


@dataclass(frozen=True)
class FusedPlan:
    bsz: int
    seq: int
    options: PassOptions  # the per-block pass (no metrics)
    policy_kw: dict  # objective / eps / dual_clip / ratio_level / agg / weights / global info for the final call
    agg_kw: dict
    old_log_prob: Tensor | None
    advantages: Tensor  # (B, T)
    mask: Tensor  # bool (B, T)
    weights: Tensor | None
    ref_log_prob: Tensor | None  # only when beta > 0
    beta: float
    temperature: float
    chunk_size: int
    check_finite: bool
    compute_entropy: bool
    compute_dtype: torch.dtype


def _plan(hidden, weight, bias, target_ids, old_log_prob, advantages, mask, *, objective, eps_low, eps_high, dual_clip,
          agg, ratio_level, weights, chunk_size, temperature, ref_log_prob, beta, check_finite, compute_entropy,
          agg_kw) -> FusedPlan:
    """Validate every argument (shape, dtype, device, range) without touching the vocabulary dimension."""
    options = pass_options(objective, eps_low, eps_high, dual_clip, ratio_level, with_metrics=False)
    check_choice("agg", agg, AGG_MODES)
    check_tensor("hidden", hidden)
    check_tensor("lm_head_weight", weight)
    check_tensor("target_ids", target_ids, floating=False)
    if weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be (V, H), got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if target_ids.dim() != 2:
        raise ValueError(f"target_ids must be (B, T), got shape {tuple(target_ids.shape)}")
    if target_ids.is_floating_point() or target_ids.dtype == torch.bool or target_ids.is_complex():
        raise TypeError(f"target_ids must be an integer tensor, got dtype {target_ids.dtype}")
    bsz, seq = target_ids.shape
    want = {3: (bsz, seq, width), 2: (bsz * seq, width)}.get(hidden.dim())
    if want is None or hidden.shape != want:
        raise ValueError(f"hidden must be (B, T, H) = {(bsz, seq, width)} or (B*T, H) = {(bsz * seq, width)} to match "
                         f"target_ids (B, T) and lm_head_weight (V, H), got {tuple(hidden.shape)}")
    device = hidden.device
    for name, t in (("lm_head_weight", weight), ("lm_head_bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != device):
            raise TypeError(f"{name} must match hidden's dtype/device ({hidden.dtype}, {device}), "
                            f"got ({t.dtype}, {t.device})")
    if target_ids.device != device:
        raise ValueError(f"target_ids is on {target_ids.device} but hidden is on {device}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must be (V,) = ({vocab},), got {tuple(bias.shape)}")
    chunk_size = default_chunk_size(vocab, hidden.dtype, device) if chunk_size is None else chunk_size
    check_positive_int("chunk_size", chunk_size)
    temperature = check_float("temperature", temperature, above=0.0)
    beta = check_float("beta", beta, at_least=0.0)
    if beta > 0:
        if ref_log_prob is None:
            raise ValueError("ref_log_prob is required when beta > 0")
        check_tensor("ref_log_prob", ref_log_prob)
        if ref_log_prob.shape != (bsz, seq) or ref_log_prob.device != device:
            raise ValueError(f"ref_log_prob must be (B, T) = {(bsz, seq)} on {device}, "
                             f"got {tuple(ref_log_prob.shape)} on {ref_log_prob.device}")
    old_log_prob, advantages, mask, weights, dtype, _ = check_batch(
        (bsz, seq), device, old_log_prob, advantages, mask, weights, log_prob=hidden)
    aggregation_scale(mask, agg, **agg_kw)  # validates dp_size and the global counts
    policy_kw = dict(objective=options.objective, eps_low=options.eps_low, eps_high=options.eps_high,
                     dual_clip=options.dual_clip, ratio_level=ratio_level, agg=agg, weights=weights, **agg_kw)
    return FusedPlan(bsz, seq, options, policy_kw, agg_kw, old_log_prob, advantages, mask, weights,
                     ref_log_prob.to(dtype) if beta > 0 else None, beta, temperature, chunk_size,
                     bool(check_finite), bool(compute_entropy), dtype)


def fused_linear_policy_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    target_ids: Tensor,
    old_log_prob: Tensor | None,
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
    chunk_size: int | None = None,
    temperature: float = 1.0,
    lm_head_bias: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    beta: float = 0.0,
    check_finite: bool = True,
    compute_entropy: bool = False,
    dp_size: int = 1,
    batch_num_tokens: float | Tensor | None = None,
    global_batch_size: float | Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> PolicyLossOutput:
    """Policy loss straight from the last hidden states, block by block (see the module docstring).

    Args:
        hidden: (B, T, H) or (B·T, H) hidden states that predict ``target_ids`` (already shifted: row
            t is the state whose logits score token ``target_ids[:, t]``). Floating point.
        lm_head_weight: (V, H) output embedding, same dtype and device as ``hidden``.
        target_ids: (B, T) integer token ids; only valid (mask=True) positions are read, so padding
            may hold anything (e.g. -100).
        old_log_prob, advantages, mask, objective, eps_low, eps_high, dual_clip, agg, ratio_level,
        weights, check_finite, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor:
            exactly as in :func:`cfpo_loss.compute_policy_loss`. ``old_log_prob=None`` means on-policy
            (π_old = the current policy, detached: r = 1), as TRL does when it has no old log-probs.
        chunk_size: valid tokens per block (default: :func:`default_chunk_size`, per device). Smaller
            saves memory, larger amortises better; any positive int works.
        temperature: logits are divided by it before the softmax (as TRL / verl do when scoring).
        lm_head_bias: optional (V,) bias.
        ref_log_prob, beta: with ``beta > 0``, adds ``beta · k3`` per valid token, k3 = exp(ref − logp)
            − (ref − logp) − 1 (TRL's GRPO KL term, added after ``weights``), aggregated with ``agg``;
            the masked mean of k3 is reported as ``metrics["kl"]``.
        compute_entropy: also report the masked mean entropy of the (tempered) token distribution as
            ``metrics["entropy"]`` (detached). No entropy gradient.

    Returns:
        PolicyLossOutput whose ``loss`` (fp32 scalar) is differentiable w.r.t. ``hidden``,
        ``lm_head_weight`` and ``lm_head_bias``; ``metrics`` and ``ratio`` are those of
        ``compute_policy_loss`` on the same log-probs; ``per_token_loss`` is the (B, T) per-token term
        that was aggregated (policy + beta·KL), **detached** (only ``loss`` carries a gradient).
    """
    agg_kw = dict(dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                  loss_scale_factor=loss_scale_factor)
    plan = _plan(hidden, lm_head_weight, lm_head_bias, target_ids, old_log_prob, advantages, mask, objective=objective,
                 eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, agg=agg, ratio_level=ratio_level,
                 weights=weights, chunk_size=chunk_size, temperature=temperature, ref_log_prob=ref_log_prob, beta=beta,
                 check_finite=check_finite, compute_entropy=compute_entropy, agg_kw=agg_kw)
    hidden2d = hidden.reshape(plan.bsz * plan.seq, lm_head_weight.shape[1])
    need = (hidden.requires_grad, lm_head_weight.requires_grad, lm_head_bias is not None and lm_head_bias.requires_grad)
    need = need if torch.is_grad_enabled() else (False,) * 3
    with torch.no_grad():
        log_prob, entropy_sum, grads = _one_pass(plan, hidden2d.detach(), lm_head_weight.detach(),
                                                 None if lm_head_bias is None else lm_head_bias.detach(), target_ids,
                                                 default_fold(hidden.device), need)
    out = _loss_and_metrics(plan, log_prob, entropy_sum)
    loss = _FusedLoss.apply(out.loss.detach(), grads, hidden2d, lm_head_weight, lm_head_bias)
    return PolicyLossOutput(loss=loss, metrics=out.metrics, per_token_loss=out.per_token_loss, ratio=out.ratio)


# ---- the pass ---------------------------------------------------------------------------------------------


class Blocks(NamedTuple):
    valid: Tensor | None  # flat positions of the valid tokens, row-major (None: every token is valid)
    n_valid: int
    spans: list  # (start, end) into the valid list; sequence level: (start, end, first row, last row + 1)


def _blocks(plan: FusedPlan, target_ids: Tensor, vocab: int) -> Blocks:
    """The block layout, from the only host synchronisations of the pass (all before the loop)."""
    mask = plan.mask
    n_valid = int(mask.sum())
    valid = None if n_valid == mask.numel() else mask.reshape(-1).nonzero().squeeze(1)
    if n_valid:
        targets = target_ids.reshape(-1) if valid is None else target_ids.reshape(-1)[valid]
        checks = [((targets < 0) | (targets >= vocab)).any()]
        if plan.ref_log_prob is not None and plan.check_finite:
            checks.append((~torch.isfinite(plan.ref_log_prob) & mask).any())
        bad = torch.stack(checks).tolist()
        if bad[0]:
            raise ValueError(f"target_ids must lie in [0, {vocab}) at valid (mask=True) positions")
        if len(bad) > 1 and bad[1]:
            raise ValueError("ref_log_prob holds non-finite value(s) at valid (mask=True) positions")
    size = plan.chunk_size
    if plan.options.ratio_level == "token":
        return Blocks(valid, n_valid, [(s, min(s + size, n_valid)) for s in range(0, n_valid, size)])
    spans, start, filled, first = [], 0, 0, 0  # sequence ratio: whole rows per block
    for row, count in enumerate(mask.sum(-1).tolist()):
        if filled and filled + count > size:
            spans.append((start, start + filled, first, row))
            start, filled, first = start + filled, 0, row
        filled += count
    if filled:
        spans.append((start, start + filled, first, plan.bsz))
    return Blocks(valid, n_valid, spans)


def _one_pass(plan: FusedPlan, hidden2d, weight, bias, target_ids, fold, need):
    """Log-probs of the valid tokens, the entropy sum and (if asked) the three gradients, block by block."""
    need_h, need_w, need_b = need
    device, low, fp = hidden2d.device, hidden2d.dtype, plan.compute_dtype
    vocab = weight.shape[0]
    blocks = _blocks(plan, target_ids, vocab)
    gather = (lambda x: x.reshape(-1)) if blocks.valid is None else (lambda x: x.reshape(-1)[blocks.valid])
    token_level = plan.options.ratio_level == "token"
    grad_fn = compiled_policy_grad(plan.options) if isinstance(fold, CompiledFold) and fold.compile else \
        functools.partial(policy_grad, options=plan.options)
    coef = aggregation_scale(plan.mask, plan.policy_kw["agg"], **plan.agg_kw, dtype=fp)  # dL/dℓ per row (B, 1)
    # per-valid-token inputs of the block step, gathered once (slices per block are free)
    targets = gather(target_ids)
    lp_valid = torch.zeros(blocks.n_valid, dtype=fp, device=device)
    ref_valid = None if plan.ref_log_prob is None else gather(plan.ref_log_prob)
    coef_valid = gather(coef.expand(plan.bsz, plan.seq)) if token_level or ref_valid is not None else None
    if token_level:
        flat = [None if x is None else gather(x) for x in (plan.old_log_prob, plan.advantages, plan.weights)]
        ones = torch.ones(1, min(plan.chunk_size, max(blocks.n_valid, 1)), dtype=torch.bool, device=device)
    entropy_sum = torch.zeros((), dtype=fp, device=device) if plan.compute_entropy else None
    grad_h = torch.zeros(hidden2d.shape, dtype=low, device=device) if need_h else None
    acc = torch.float64 if low == torch.float64 else torch.float32  # the weight / bias gradients' accumulators
    grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
    tile_dtype = fold.tile_dtype(low)
    rows_max = max((span[1] - span[0] for span in blocks.spans), default=0)
    tile_buf = torch.empty(rows_max, vocab, dtype=tile_dtype, device=device)  # one tile for the whole pass
    low_buf = torch.empty(rows_max, vocab, dtype=low, device=device) if tile_dtype != low else None

    for span in blocks.spans:
        start, end = span[0], span[1]
        n = end - start
        idx = None if blocks.valid is None else blocks.valid[start:end]
        h_blk = hidden2d[start:end] if idx is None else hidden2d.index_select(0, idx)
        tgt = targets[start:end]
        z = tile_buf[:n]
        gemm_out = z if low_buf is None else low_buf[:n]
        if bias is not None:  # GEMM 1, in the input dtype
            torch.addmm(bias, h_blk, weight.t(), out=gemm_out)
        else:
            torch.mm(h_blk, weight.t(), out=gemm_out)
        if low_buf is not None:
            z.copy_(gemm_out)
        stats = fold.forward(z, tgt, plan.temperature, entropy_sum is not None)
        lp_valid[start:end] = stats.log_prob
        if entropy_sum is not None:
            entropy_sum += stats.entropy.sum()
        if not any(need):
            continue

        lp = stats.log_prob.detach()
        if token_level:
            old, adv, wts = (None if x is None else x[start:end][None] for x in flat)
            g = grad_fn(lp[None], lp[None] if old is None else old, adv, ones[:, :n], coef_valid[start:end][None],
                        wts)[0]
        else:
            g = _row_block_grad(plan, grad_fn, lp, blocks.valid, start, end, span[2], span[3], coef)
        if ref_valid is not None:  # TRL's KL: d/dlogp β·c·k3 = β·c·(1 − exp(ref − logp))
            g = g + plan.beta * coef_valid[start:end] * -torch.expm1(ref_valid[start:end] - lp)
        dz = fold.backward_(z, tgt, stats, g, plan.temperature)
        if need_h:  # GEMM 2, in the input dtype
            dz_low = dz if dz.dtype == low else low_buf[:n].copy_(dz)
            if idx is None:
                torch.mm(dz_low, weight, out=grad_h[start:end])
            else:
                grad_h.index_copy_(0, idx, dz_low @ weight)
        if need_w:  # GEMM 3, accumulated in fp32
            accumulate_fp32(grad_w, dz.t(), h_blk)
        if need_b:
            grad_b += dz.sum(0, dtype=grad_b.dtype)
    del tile_buf, low_buf

    log_prob = torch.zeros(plan.bsz * plan.seq, dtype=fp, device=device)
    if blocks.valid is None:
        log_prob.copy_(lp_valid)
    else:
        log_prob.index_copy_(0, blocks.valid, lp_valid)
    grads = (grad_h,
             None if grad_w is None else grad_w.to(weight.dtype),
             None if grad_b is None else grad_b.to(bias.dtype))
    return log_prob.view(plan.bsz, plan.seq), entropy_sum, grads


def _row_block_grad(plan, grad_fn, lp, valid, start, end, row0, row1, coef) -> Tensor:
    """dL/dlog π for a block of whole rows (sequence ratio): the block's log-probs laid out as its rows."""
    rows = slice(row0, row1)
    seq = plan.seq
    local = torch.arange(start, end, device=lp.device) - row0 * seq if valid is None else valid[start:end] - row0 * seq
    lp_rows = torch.zeros((row1 - row0) * seq, dtype=lp.dtype, device=lp.device).index_copy_(0, local, lp)
    lp_rows = lp_rows.view(row1 - row0, seq)
    old = lp_rows if plan.old_log_prob is None else plan.old_log_prob[rows]
    wts = None if plan.weights is None else plan.weights[rows]
    g_rows = grad_fn(lp_rows, old, plan.advantages[rows], plan.mask[rows], coef[rows], wts)
    return g_rows.reshape(-1).index_select(0, local)


def _loss_and_metrics(plan: FusedPlan, log_prob: Tensor, entropy_sum: Tensor | None) -> PolicyLossOutput:
    """The core's compute_policy_loss on the gathered log-probs (+ the KL term and the entropy metric)."""
    old = log_prob if plan.old_log_prob is None else plan.old_log_prob
    out = compute_policy_loss(log_prob, old, plan.advantages, plan.mask, check_finite=plan.check_finite,
                              **plan.policy_kw)
    loss, per_token, metrics = out.loss.detach(), out.per_token_loss.detach(), dict(out.metrics)
    count = plan.mask.sum().clamp(min=1)
    if plan.ref_log_prob is not None:
        delta = torch.where(plan.mask, plan.ref_log_prob - log_prob, 0.0)
        kl = torch.expm1(delta) - delta  # TRL's k3 = exp(ref − logp) − (ref − logp) − 1
        per_token = per_token + plan.beta * kl
        loss = aggregate_loss(per_token, plan.mask, plan.policy_kw["agg"], **plan.agg_kw)
        metrics["kl"] = (kl.sum() / count).float()
    if entropy_sum is not None:
        metrics["entropy"] = (entropy_sum / count).float()
    return PolicyLossOutput(loss=loss, metrics=metrics, per_token_loss=per_token, ratio=out.ratio)


class _FusedLoss(torch.autograd.Function):
    """Attaches the gradients computed in the pass to the loss; the backward scales them by the incoming
    gradient (nothing is recomputed) and frees them (a second backward raises)."""

    @staticmethod
    def forward(ctx, loss: Tensor, grads, hidden2d, weight, bias) -> Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads, ctx.grads = ctx.grads, None  # free them once handed over
        if grads is None:
            raise RuntimeError("fused_linear_policy_loss: backward called twice (retain_graph is not supported)")
        scaled = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]  # ours alone: in place
        return None, None, *scaled
