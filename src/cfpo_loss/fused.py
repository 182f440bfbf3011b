"""Fused chunked LM head + policy loss: never materialises the (tokens × vocabulary) logits.

    fused_linear_policy_loss(hidden, lm_head_weight, target_ids, old_log_prob, advantages, mask, ...)

equals, in value and in gradient w.r.t. ``hidden``, ``lm_head_weight`` and ``lm_head_bias``::

    logits   = (hidden @ lm_head_weight.T + lm_head_bias) / temperature
    log_prob = log_softmax(logits.float()).gather(-1, target_ids)
    compute_policy_loss(log_prob, old_log_prob, advantages, mask, ...)   (+ beta · k3 KL, as TRL)

How (one pass, no recompute). The aggregation is linear in the per-token loss, L = Σ c_t ℓ_t, and its
coefficients c_t depend only on the mask (and the global counts the caller passes), so they are known
before the pass (the core's ``aggregation.aggregation_scale``). Then, for each block
of valid tokens (padding is skipped entirely):

    z = h_blk @ W.T (+ b) / temperature                    one (n, V) fp32 tile
    log-softmax statistics and the target log-probs         in place on the tile
    g = dL/dlog_prob                                        autograd through the core's compute_policy_loss
                                                            on these n tokens (the math lives once, in the core)
    dL/dz = g · (onehot − softmax(z)) / temperature         in place on the tile
    grad_h[blk] = dL/dz @ W,  grad_W += dL/dz.T @ h_blk,  grad_b += Σ dL/dz

Three matmuls per token, like the unfused path, and at most one tile alive at a time. The gradients are
computed in the forward and scaled by the incoming gradient in the backward (nothing is recomputed).
The returned loss and metrics are the core's ``compute_policy_loss`` on the gathered log-probs.

With ``ratio_level="sequence"`` (GSPO) a token's gradient depends on its whole row, so blocks are made
of whole rows (as many as fit in ``chunk_size`` valid tokens, at least one row).

Low precision (bf16 / fp16 inputs): each logits tile comes out of the matmul in the input dtype (the
backend accumulates in fp32, exactly as the model's own lm_head would), and everything after it —
log-softmax, loss, the tile's gradient — is fp32. The hidden-state gradient is one matmul per block over
the whole vocabulary with the tile's gradient cast to the input dtype (as autograd does in the unfused
bf16 path). The weight and bias gradients sum one product per block, so they are accumulated in fp32
(the fp32 tile times an fp32 copy of the block's hidden states) and cast once at the end: a bf16
accumulator would round every block's contribution (TRL's chunked kernel makes the same choice). Cost
in bf16: one fp32 (V × H) buffer, and the weight-gradient matmul runs in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_choice, check_tensor
from .aggregation import AGG_MODES, aggregate_loss, aggregation_scale
from .loss import RATIO_LEVELS, PolicyLossOutput, compute_policy_loss
from .surrogates import OBJECTIVES  # noqa: F401  (rewritten below)

__all__ = ["fused_linear_policy_loss", "default_chunk_size"]

#: target size of one fp32 logits tile (elements); 2**25 elements = 128 MiB. Smaller tiles make the
#: logits matmul (tokens × H) @ (H × V) measurably less efficient on CPU (short M dimension).
_TILE_ELEMENTS = 2**25


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per block so that one fp32 (tokens × V) tile is about 128 MiB (clamped to [64, 4096])."""
    return int(min(4096, max(64, _TILE_ELEMENTS // max(1, vocab_size))))


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
    """Policy loss straight from the last hidden states, chunk by chunk (see the module docstring).

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
        chunk_size: valid tokens per block (default: :func:`default_chunk_size` of V, a ~128 MiB fp32
            tile). Smaller saves memory, larger amortises better; any positive int works.
        temperature: logits are divided by it before the softmax (as TRL / verl do when scoring).
        lm_head_bias: optional (V,) bias.
        ref_log_prob, beta: with ``beta > 0``, adds ``beta · k3`` per valid token, k3 = exp(ref − logp)
            − (ref − logp) − 1 (TRL's GRPO KL term, added after ``weights``), aggregated with ``agg``;
            the masked mean of k3 is reported as ``metrics["kl"]``.
        compute_entropy: also report the masked mean entropy of the (tempered) token distribution as
            ``metrics["entropy"]`` (detached; one extra pass over each tile). No entropy gradient.

    Returns:
        PolicyLossOutput whose ``loss`` (fp32 scalar) is differentiable w.r.t. ``hidden``,
        ``lm_head_weight`` and ``lm_head_bias``; ``metrics`` and ``ratio`` are those of
        ``compute_policy_loss`` on the same log-probs; ``per_token_loss`` is the (B, T) per-token term
        that was aggregated (policy + beta·KL), **detached** (only ``loss`` carries a gradient).
    """
    # ---- argument checks (all before the expensive pass) ----------------------------------------
    check_choice("objective", objective, tuple(OBJECTIVES))
    check_choice("agg", agg, AGG_MODES)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_tensor("hidden", hidden)
    check_tensor("lm_head_weight", lm_head_weight)
    check_tensor("target_ids", target_ids, floating=False)
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be (V, H), got shape {tuple(lm_head_weight.shape)}")
    vocab, width = lm_head_weight.shape
    if target_ids.dim() != 2:
        raise ValueError(f"target_ids must be (B, T), got shape {tuple(target_ids.shape)}")
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool or target_ids.is_complex():
        raise TypeError(f"target_ids must be an integer tensor, got dtype {target_ids.dtype}")
    bsz, seq = target_ids.shape
    if hidden.dim() == 3:
        if hidden.shape != (bsz, seq, width):
            raise ValueError(
                f"hidden must be (B, T, H) = {(bsz, seq, width)} to match target_ids (B, T) and "
                f"lm_head_weight (V, H), got {tuple(hidden.shape)}"
            )
    elif hidden.dim() == 2:
        if hidden.shape != (bsz * seq, width):
            raise ValueError(
                f"hidden must be (B*T, H) = {(bsz * seq, width)} to match target_ids (B, T) and "
                f"lm_head_weight (V, H), got {tuple(hidden.shape)}"
            )
    else:
        raise ValueError(f"hidden must be (B, T, H) or (B*T, H), got shape {tuple(hidden.shape)}")
    if lm_head_weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight dtype {lm_head_weight.dtype} differs from hidden dtype {hidden.dtype}")
    device = hidden.device
    for name, t in (("lm_head_weight", lm_head_weight), ("target_ids", target_ids)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    if lm_head_bias is not None:
        check_tensor("lm_head_bias", lm_head_bias)
        if lm_head_bias.shape != (vocab,):
            raise ValueError(f"lm_head_bias must be (V,) = ({vocab},), got {tuple(lm_head_bias.shape)}")
        if lm_head_bias.dtype != hidden.dtype or lm_head_bias.device != device:
            raise TypeError(
                f"lm_head_bias must match hidden's dtype/device ({hidden.dtype}, {device}), "
                f"got ({lm_head_bias.dtype}, {lm_head_bias.device})"
            )
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    temperature = _positive_float("temperature", temperature)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")
    beta = float(beta)
    if beta > 0:
        if ref_log_prob is None:
            raise ValueError("ref_log_prob is required when beta > 0")
        check_tensor("ref_log_prob", ref_log_prob)
        if ref_log_prob.shape != (bsz, seq):
            raise ValueError(f"ref_log_prob must be (B, T) = {(bsz, seq)}, got {tuple(ref_log_prob.shape)}")
    policy_kw = dict(objective=objective, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    agg_kw = dict(
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    # The core validates everything else (shapes of old_log_prob / advantages / mask / weights, eps,
    # dual_clip, the global-batch arguments, non-finite values at valid positions): run it once on
    # cheap (B, T) stand-in log-probs before the expensive pass.
    stand_in = torch.zeros(bsz, seq, device=device)
    if old_log_prob is not None:
        check_tensor("old_log_prob", old_log_prob)
        stand_in = stand_in.to(old_log_prob.device)
    compute_policy_loss(
        stand_in, stand_in if old_log_prob is None else old_log_prob, advantages, mask, agg=agg, ratio_level=ratio_level,
        weights=weights, check_finite=check_finite, **policy_kw, **agg_kw,
    )
    mask = mask.bool() if mask.dtype != torch.bool else mask
    for name, t in (("old_log_prob", old_log_prob), ("mask", mask), ("advantages", advantages),
                    ("ref_log_prob", ref_log_prob), ("weights", weights)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    if beta > 0 and check_finite and not bool(torch.isfinite(torch.where(mask, ref_log_prob, 0)).all()):
        raise ValueError("ref_log_prob holds non-finite value(s) at valid (mask=True) positions")
    valid = mask.reshape(-1).nonzero().squeeze(1)  # one device sync: the block layout needs the count
    n_valid = valid.numel()
    if n_valid:
        tgt_valid = target_ids.reshape(-1)[valid]
        if bool(((tgt_valid < 0) | (tgt_valid >= vocab)).any()):
            raise ValueError(f"target_ids must lie in [0, {vocab}) at valid (mask=True) positions")

    # ---- the pass ----------------------------------------------------------------------------------
    fp = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if advantages.dim() == 1 or advantages.shape[-1] == 1:
        advantages = advantages.reshape(bsz, 1).expand(bsz, seq)
    ctx_data = dict(
        bsz=bsz, seq=seq, vocab=vocab, fp=fp, mask=mask, valid=valid, n_valid=n_valid,
        target_ids=target_ids, old_log_prob=old_log_prob, advantages=advantages, weights=weights,
        ref_log_prob=ref_log_prob if beta > 0 else None, beta=beta, temperature=temperature,
        chunk_size=chunk_size, ratio_level=ratio_level, agg=agg, agg_kw=agg_kw, policy_kw=policy_kw,
        check_finite=check_finite, compute_entropy=bool(compute_entropy),
    )
    hidden2d = hidden.reshape(bsz * seq, width)
    loss = _FusedLinearPolicyLoss.apply(hidden2d, lm_head_weight, lm_head_bias, ctx_data)
    return PolicyLossOutput(
        loss=loss, metrics=ctx_data["metrics"], per_token_loss=ctx_data["per_token_loss"], ratio=ctx_data["ratio"]
    )


def _positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return value


def _blocks(d: dict) -> list[tuple[int, int]]:
    """[start, end) ranges into the (row-major) list of valid tokens, one per block."""
    n, size = d["n_valid"], d["chunk_size"]
    if d["ratio_level"] == "token":
        return [(s, min(s + size, n)) for s in range(0, n, size)]
    # sequence ratio: whole rows per block (a row's tokens are contiguous in the valid list)
    counts = d["mask"].sum(-1).tolist()
    blocks, start, filled = [], 0, 0
    for c in counts:
        if filled and filled + c > size:
            blocks.append((start, start + filled))
            start, filled = start + filled, 0
        filled += c
    if filled:
        blocks.append((start, start + filled))
    return blocks


def _k3(ref: Tensor, log_prob: Tensor) -> Tensor:
    """TRL's per-token KL estimate exp(ref − logp) − (ref − logp) − 1 (Schulman's k3 of KL[π_θ‖π_ref])."""
    delta = ref - log_prob
    return torch.exp(delta) - delta - 1.0


class _FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d: Tensor, weight: Tensor, bias: Tensor | None, d: dict) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_any = need_h or need_w or need_b
        fp, bsz, seq = d["fp"], d["bsz"], d["seq"]
        mask, valid, temperature = d["mask"], d["valid"], d["temperature"]
        device, low = hidden2d.device, hidden2d.dtype
        flat_tgt = d["target_ids"].reshape(-1)
        all_valid = d["n_valid"] == bsz * seq
        valid_cpu = None if all_valid else valid.cpu()  # block -> rows lookups without a sync per block

        # aggregation weights c_bt = dL/dℓ_bt (a per-row weight for every mode), known before the pass
        coef = aggregation_scale(mask, d["agg"], **d["agg_kw"], dtype=fp).expand(bsz, seq)

        log_prob = torch.zeros(bsz * seq, dtype=fp, device=device)
        entropy_sum = torch.zeros((), dtype=fp, device=device) if d["compute_entropy"] else None
        grad_h = torch.zeros(hidden2d.shape, dtype=low, device=device) if need_h else None
        # the weight gradient sums one product per block: accumulate it in fp32 (a bf16 accumulator would
        # round every block's contribution and swamp small ones), cast once at the end
        grad_w = torch.zeros(weight.shape, dtype=fp, device=device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=fp, device=device) if need_b else None
        old, adv, wts = d["old_log_prob"], d["advantages"], d["weights"]
        ref, beta = d["ref_log_prob"], d["beta"]

        blocks = _blocks(d)
        # one tile buffer for the whole pass (a fresh (n, V) allocation per block costs page faults)
        rows_max = max((e - s for s, e in blocks), default=0)
        tile_buf = torch.empty(rows_max, weight.shape[0], dtype=fp, device=device)
        low_buf = torch.empty(rows_max, weight.shape[0], dtype=low, device=device) if low != fp else None
        for start, end in blocks:
            if all_valid:
                idx = None
                h_blk, tgt = hidden2d[start:end], flat_tgt[start:end]
                row0, row1 = start // seq, (end - 1) // seq + 1
            else:
                idx = valid[start:end]
                h_blk, tgt = hidden2d.index_select(0, idx), flat_tgt.index_select(0, idx)
                row0, row1 = int(valid_cpu[start]) // seq, int(valid_cpu[end - 1]) // seq + 1
            tgt = tgt.unsqueeze(1)
            # one logits tile; in low precision the matmul is in the input dtype (fp32 accumulation)
            n = end - start
            z = tile_buf[:n]
            mm_out = z if low_buf is None else low_buf[:n]
            if bias is not None:
                torch.addmm(bias, h_blk, weight.t(), out=mm_out)
            else:
                torch.mm(h_blk, weight.t(), out=mm_out)
            if low_buf is not None:
                z.copy_(mm_out)
            if temperature != 1.0:
                z.div_(temperature)
            z_tgt = z.gather(1, tgt).squeeze(1)
            z_max = z.amax(1)
            z.sub_(z_max.unsqueeze(1)).exp_()  # z := exp(z − max), in place
            sum_exp = z.sum(1)
            lp_blk = z_tgt - z_max - sum_exp.log()
            if entropy_sum is not None:  # H = log Σe − Σ e·log e / Σe, with e = exp(z − max)
                entropy_sum += (sum_exp.log() - torch.xlogy(z, z).sum(1) / sum_exp).sum()
            flat_pos = torch.arange(start, end, device=device) if idx is None else idx
            log_prob[flat_pos] = lp_blk
            if not need_any:
                continue

            # dL/dlog_prob for this block, through the core's own per-token loss
            g = _dloss_dlogprob(lp_blk, flat_pos, row0, row1, coef, old, adv, wts, ref, beta, d)
            # dL/dz_pre = g·(onehot − softmax) / temperature, in place on the tile
            g = g / temperature
            z.mul_((-g / sum_exp).unsqueeze(1))
            z.scatter_add_(1, tgt, g.unsqueeze(1))
            if need_w:  # fp32 tile x fp32 copy of the block's hidden states, into the fp32 accumulator
                grad_w.addmm_(z.t(), h_blk if h_blk.dtype == fp else h_blk.to(fp))
            if need_b:
                grad_b.add_(z.sum(0))
            if need_h:  # in the input dtype, as autograd does in the unfused path
                gz = z if low_buf is None else low_buf[:n].copy_(z)
                if idx is None:
                    torch.mm(gz, weight, out=grad_h[start:end])
                else:
                    grad_h.index_copy_(0, idx, gz @ weight)
                del gz
            del z
        del tile_buf, low_buf

        # loss and metrics: the core's compute_policy_loss on the gathered log-probs
        log_prob = log_prob.view(bsz, seq)
        out = compute_policy_loss(
            log_prob, log_prob if old is None else old, adv, mask, agg=d["agg"], ratio_level=d["ratio_level"], weights=wts,
            check_finite=d["check_finite"], **d["policy_kw"], **d["agg_kw"],
        )
        loss, per_token = out.loss.detach(), out.per_token_loss.detach()
        metrics = dict(out.metrics)
        if beta > 0:
            kl = torch.where(mask, _k3(ref.to(fp), log_prob), torch.zeros((), dtype=fp, device=device))
            per_token = per_token + beta * kl
            loss = aggregate_loss(per_token, mask, d["agg"], **d["agg_kw"])
            metrics["kl"] = (kl.sum() / mask.sum().clamp(min=1)).float()
        if entropy_sum is not None:
            metrics["entropy"] = (entropy_sum / mask.sum().clamp(min=1)).float()
        d["metrics"], d["per_token_loss"], d["ratio"], d["log_prob"] = metrics, per_token, out.ratio, log_prob

        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        ctx.grads = (grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads, ctx.grads = ctx.grads, None  # free them once handed over
        if grads is None:
            raise RuntimeError("fused_linear_policy_loss: backward called twice (retain_graph is not supported)")
        unit = grad_out.numel() == 1 and bool(grad_out == 1)
        out = [None if g is None else (g if unit else g * grad_out.to(g.dtype)) for g in grads]
        return out[0], out[1], out[2], None


def _dloss_dlogprob(lp_blk, flat_pos, row0, row1, coef, old, adv, wts, ref, beta, d) -> Tensor:
    """Gradient of Σ_t c_t·ℓ_t over this block's tokens w.r.t. their log-probs, by autograd through the
    core's compute_policy_loss (laid out as the block's rows, so the GSPO sequence ratio works too)."""
    seq = d["seq"]
    local = flat_pos - row0 * seq
    n_rows = row1 - row0
    with torch.enable_grad():
        lp = lp_blk.detach().requires_grad_(True)
        lp_rows = torch.zeros(n_rows * seq, dtype=lp.dtype, device=lp.device).index_put((local,), lp)
        m_rows = torch.zeros(n_rows * seq, dtype=torch.bool, device=lp.device)
        m_rows[local] = True
        lp_rows, m_rows = lp_rows.view(n_rows, seq), m_rows.view(n_rows, seq)
        rows = slice(row0, row1)
        old_rows = lp_rows.detach() if old is None else old[rows]  # None: on-policy, r = 1
        out = compute_policy_loss(
            lp_rows, old_rows, adv[rows], m_rows, agg="token-sum", ratio_level=d["ratio_level"],
            weights=None if wts is None else wts[rows], check_finite=False, **d["policy_kw"],
        )
        total = torch.where(m_rows, out.per_token_loss * coef[rows], 0).sum()
        if beta > 0:
            c_blk = coef.reshape(-1)[flat_pos]
            total = total + beta * (c_blk * _k3(ref.reshape(-1)[flat_pos].to(lp.dtype), lp)).sum()
        (g,) = torch.autograd.grad(total, lp)
    return g
