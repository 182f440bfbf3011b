"""Fused chunked LM head + policy loss: never materialises the (tokens × vocabulary) logits.

    fused_linear_policy_loss(hidden, lm_head_weight, target_ids, old_log_prob, advantages, mask, ...)

equals, in value and in gradient w.r.t. ``hidden``, ``lm_head_weight`` and ``lm_head_bias``::

    logits   = (hidden @ lm_head_weight.T + lm_head_bias) / temperature
    log_prob = log_softmax(logits.float()).gather(-1, target_ids)
    compute_policy_loss(log_prob, old_log_prob, advantages, mask, ...)   (+ beta · k3 KL, as TRL)

How (one pass, three GEMMs, no recompute). The aggregation is linear in the per-token loss,
L = Σ_b w_b Σ_t ℓ_bt, and its row weights w_b depend only on the mask and the global counts the caller passes
(``aggregation.row_weights``), so they are known before the pass. Then, for each block of valid tokens
(padding is skipped entirely), with no host synchronisation inside the loop:

    z = h_blk @ W.T (+ b)                                  GEMM 1: one (n, V) tile
    log-softmax statistics, target log-probs               the fold's forward, in fp32
    g = dL/dlog_prob                                       the core's per-token pass (_per_token.dloss_dlog_prob)
    z := g · (onehot − softmax(z / T)) / T                 the fold's backward, in place on the tile
    grad_h[blk] = z @ W                                    GEMM 2
    grad_W += z.T @ h_blk,  grad_b += Σ z                  GEMM 3, accumulated in fp32

The returned loss, metrics and ratio are the core's policy loss on the gathered log-probs (``loss.policy_loss``, the
call ``compute_policy_loss`` makes after its checks), from the plan's checked batch and row weight.

The file reads top-down: the entry point; the plan (every check, once, before the pass); the layout (which
valid tokens form each block); the pass (``Pass``: its state, built once) and one block's step; the folds; the
fp32 accumulation; the KL term; the autograd wrapper that hands the precomputed gradients back.

Two folds, one per device, behind one protocol (``Fold``: ``forward`` gives a tile's log-softmax statistics,
``backward_`` writes dL/dz over the tile; ``compiled`` says whether it runs compiled kernels, and so whether the
pass runs the core's per-token pass compiled too, a choice ``Pass.build`` makes once):

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

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ._checks import Batch, check_batch, check_float, check_positive_int, check_tensor
from ._per_token import PassOptions, compiled_dloss_dlog_prob, dloss_dlog_prob
from .aggregation import GlobalBatch, row_weights, weighted_row_sum
from .loss import PolicyLossOutput, pass_options, policy_loss

__all__ = ["fused_linear_policy_loss", "default_chunk_size"]

#: CPU: target size of one fp32 logits tile (elements); 2**25 elements = 128 MiB. Smaller tiles make the
#: logits matmul (tokens × H) @ (H × V) measurably less efficient on CPU (short M dimension).
_CPU_TILE_ELEMENTS = 2**25
#: CUDA: the tile (input dtype) may take this share of the free device memory, at most _GPU_TILE_BYTES;
#: at most 4096 tokens × the whole vocabulary (1.2 GB at V=152k bf16):
#: the block benchmarks/README.md measured on an H200
_GPU_TILE_SHARE, _GPU_TILE_BYTES = 1 / 16, 1536 * 2**20


# ---- the entry point ----------------------------------------------------------------------------------------


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

    ``advantages``, ``mask``, ``objective``, ``eps_low``, ``eps_high``, ``dual_clip``, ``agg``, ``ratio_level``,
    ``weights``, ``check_finite``, ``dp_size``, ``batch_num_tokens``, ``global_batch_size`` and
    ``loss_scale_factor`` mean exactly what they mean in ``cfpo_loss.compute_policy_loss``.

    Args:
        hidden: (B, T, H) or (B·T, H) hidden states that predict ``target_ids`` (already shifted: row
            t is the state whose logits score token ``target_ids[:, t]``). Floating point.
        lm_head_weight: (V, H) output embedding, same dtype and device as ``hidden``.
        target_ids: (B, T) integer token ids; only valid (mask=True) positions are read, so padding
            may hold anything (e.g. -100).
        old_log_prob: (B, T) log π_old of the targets, or None for on-policy (π_old = the current policy,
            detached: r = 1), as TRL does when it has no old log-probs.
        chunk_size: valid tokens per block (default: ``default_chunk_size``, per device). Smaller
            saves memory, larger amortises better; any positive int works.
        temperature: logits are divided by it before the softmax (as TRL / verl do when scoring).
        lm_head_bias: optional (V,) bias.
        ref_log_prob: (B, T) log-probs of the reference policy, used when ``beta > 0``.
        beta: with ``beta > 0``, adds ``beta · k3`` per valid token, k3 = exp(ref − logp) − (ref − logp) − 1
            (TRL's GRPO KL term, added after ``weights``), aggregated with ``agg``; the masked mean of k3 is
            reported as ``metrics["kl"]``.
        compute_entropy: also report the masked mean entropy of the (tempered) token distribution as
            ``metrics["entropy"]`` (detached). No entropy gradient.

    Returns:
        PolicyLossOutput whose ``loss`` (fp32 scalar) is differentiable w.r.t. ``hidden``,
        ``lm_head_weight`` and ``lm_head_bias``; ``metrics`` and ``ratio`` are those of
        ``compute_policy_loss`` on the same log-probs; ``per_token_loss`` is the (B, T) per-token term
        that was aggregated (policy + beta·KL), **detached** (only ``loss`` carries a gradient).
    """
    config = FusedConfig.build(
        objective=objective, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, agg=agg,
        ratio_level=ratio_level, temperature=temperature, beta=beta, check_finite=check_finite,
        compute_entropy=compute_entropy,
        global_batch=GlobalBatch(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor),
    )  # fmt: skip
    plan = make_plan(
        config,
        hidden,
        lm_head_weight,
        lm_head_bias,
        target_ids,
        old_log_prob,
        advantages,
        mask,
        weights,
        ref_log_prob,
        chunk_size,
    )
    head = LMHead(hidden.reshape(plan.bsz * plan.seq, lm_head_weight.shape[1]), lm_head_weight, lm_head_bias)
    wanted = Wanted.of(head) if torch.is_grad_enabled() else Wanted(False, False, False)
    with torch.no_grad():  # the pass: every block's log-probs and gradients, no host sync inside the loop
        state = Pass.build(plan, head.detached(), target_ids, default_fold(hidden.device), wanted)
        for block in state.blocks:
            state.step(block)
        result = state.result()
        del state  # its buffers, the logits tile above all, go before the loss below allocates
    out = loss_and_metrics(plan, result.log_prob, result.entropy_sum)
    loss = _FusedLoss.apply(out.loss.detach(), result.grads, head.hidden, head.weight, head.bias)
    return PolicyLossOutput(loss=loss, metrics=out.metrics, per_token_loss=out.per_token_loss, ratio=out.ratio)


class LMHead(NamedTuple):
    hidden: Tensor  # (B·T, H)
    weight: Tensor  # (V, H)
    bias: Tensor | None  # (V,)

    def detached(self) -> LMHead:
        return LMHead(*(None if t is None else t.detach() for t in self))


class Wanted(NamedTuple):
    """Which gradients the pass computes (those whose tensor requires one, with grad mode on)."""

    hidden: bool
    weight: bool
    bias: bool

    @staticmethod
    def of(head: LMHead) -> Wanted:
        return Wanted(
            head.hidden.requires_grad, head.weight.requires_grad, head.bias is not None and head.bias.requires_grad
        )


class Gradients(NamedTuple):
    hidden: Tensor | None  # (B·T, H), input dtype, 0 at padding
    weight: Tensor | None  # (V, H), accumulated in fp32, cast to the weight's dtype at the end
    bias: Tensor | None  # (V,), likewise


# ---- the plan: the configuration, once, and every check before the pass ----------------------------------


@dataclass(frozen=True)
class FusedConfig:
    """The scalar options of one call, validated: the one copy of the configuration."""

    options: PassOptions  # objective record, eps_low, eps_high, dual_clip, ratio_level; with metrics (the loss)
    block_options: PassOptions  # the same without metrics: the per-block gradient pass
    agg: str  # validated with the global batch by ``make_plan`` (``aggregation.row_weights``)
    global_batch: GlobalBatch
    temperature: float
    beta: float
    check_finite: bool
    compute_entropy: bool

    @staticmethod
    def build(
        *,
        objective,
        eps_low,
        eps_high,
        dual_clip,
        agg,
        ratio_level,
        temperature,
        beta,
        check_finite,
        compute_entropy,
        global_batch: GlobalBatch,
    ) -> FusedConfig:
        options = pass_options(objective, eps_low, eps_high, dual_clip, ratio_level)
        return FusedConfig(
            options,
            dataclasses.replace(options, with_metrics=False),
            agg,
            global_batch,
            check_float("temperature", temperature, above=0.0),
            check_float("beta", beta, at_least=0.0),
            bool(check_finite),
            bool(compute_entropy),
        )


@dataclass(frozen=True)
class FusedPlan:
    """The configuration and the (B, T) tensors checked and cast to the compute dtype."""

    config: FusedConfig
    bsz: int
    seq: int
    chunk_size: int  # valid tokens per block
    batch: Batch  # old_log_prob (None: on-policy), advantages (B, T), mask (bool), weights, compute dtype
    row_weight: Tensor  # (B, 1) the aggregation as one weight per row (``aggregation.row_weights``), compute dtype
    ref_log_prob: Tensor | None  # only when beta > 0

    @property
    def mask(self) -> Tensor:
        return self.batch.mask

    @property
    def token_level(self) -> bool:
        return self.config.options.ratio_level == "token"


def make_plan(
    config: FusedConfig,
    hidden,
    weight,
    bias,
    target_ids,
    old_log_prob,
    advantages,
    mask,
    weights,
    ref_log_prob,
    chunk_size,
) -> FusedPlan:
    """Validate every tensor (shape, dtype, device) without touching the vocabulary dimension."""
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
        raise ValueError(
            f"hidden must be (B, T, H) = {(bsz, seq, width)} or (B*T, H) = {(bsz * seq, width)} to match "
            f"target_ids (B, T) and lm_head_weight (V, H), got {tuple(hidden.shape)}"
        )
    device = hidden.device
    for name, t in (("lm_head_weight", weight), ("lm_head_bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != device):
            raise TypeError(
                f"{name} must match hidden's dtype/device ({hidden.dtype}, {device}), got ({t.dtype}, {t.device})"
            )
    if target_ids.device != device:
        raise ValueError(f"target_ids is on {target_ids.device} but hidden is on {device}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must be (V,) = ({vocab},), got {tuple(bias.shape)}")
    chunk_size = default_chunk_size(vocab, hidden.dtype, device) if chunk_size is None else chunk_size
    check_positive_int("chunk_size", chunk_size)
    if config.beta > 0:
        if ref_log_prob is None:
            raise ValueError("ref_log_prob is required when beta > 0")
        check_tensor("ref_log_prob", ref_log_prob)
        if ref_log_prob.shape != (bsz, seq) or ref_log_prob.device != device:
            raise ValueError(
                f"ref_log_prob must be (B, T) = {(bsz, seq)} on {device}, "
                f"got {tuple(ref_log_prob.shape)} on {ref_log_prob.device}"
            )
    batch = check_batch((bsz, seq), device, old_log_prob, advantages, mask, weights, log_prob=hidden)
    # validates agg too
    row_weight = row_weights(
        batch.mask, config.agg, config.global_batch, dtype=batch.dtype, valid_tokens=batch.valid_tokens
    )
    ref = ref_log_prob.to(batch.dtype) if config.beta > 0 else None
    return FusedPlan(config, bsz, seq, chunk_size, batch, row_weight, ref)


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


# ---- the layout: which valid tokens form each block ----------------------------------------------------------


class Block(NamedTuple):
    start: int  # [start, end) into the row-major list of valid tokens
    end: int
    rows: slice | None  # sequence level: the whole rows the block holds; None at token level

    @property
    def tokens(self) -> slice:
        return slice(self.start, self.end)


class ValidTokens:
    """The valid (mask=True) tokens of a (B, T) batch, flat and row-major.

    When every token is valid, ``index`` is None and each gather / scatter below is a plain slice or view (no
    index kernel): the common case of an unpadded batch, kept in this one class rather than at every use.
    """

    def __init__(self, mask: Tensor):
        self.device, self.total = mask.device, mask.numel()
        self.count = int(mask.sum())  # host sync 1
        self.index = None if self.count == self.total else mask.reshape(-1).nonzero().squeeze(1)  # host sync 2

    def gather(self, x: Tensor) -> Tensor:
        """The valid entries of a (B, T) tensor, as a flat (count,) tensor."""
        return x.reshape(-1) if self.index is None else x.reshape(-1)[self.index]

    def take_rows(self, x2d: Tensor, block: Block) -> Tensor:
        """The block's rows of a (B·T, ·) tensor."""
        return x2d[block.tokens] if self.index is None else x2d.index_select(0, self.index[block.tokens])

    def mm_into_rows(self, out2d: Tensor, block: Block, a: Tensor, b: Tensor) -> None:
        """out2d[the block's rows] = a @ b."""
        if self.index is None:
            torch.mm(a, b, out=out2d[block.tokens])
        else:
            out2d.index_copy_(0, self.index[block.tokens], a @ b)

    def scatter(self, values: Tensor) -> Tensor:
        """A flat (B·T,) tensor holding ``values`` at the valid tokens and 0 elsewhere."""
        if self.index is None:
            return values.clone()
        return values.new_zeros(self.total).index_copy_(0, self.index, values)

    def block_positions(self, block: Block) -> Tensor:
        """Flat (B·T) positions of the block's tokens."""
        if self.index is None:
            return torch.arange(block.start, block.end, device=self.device)
        return self.index[block.tokens]


class Layout(NamedTuple):
    tokens: ValidTokens
    blocks: list[Block]


def make_layout(plan: FusedPlan, target_ids: Tensor, vocab: int) -> Layout:
    """The blocks, from the only host synchronisations of the pass (all before the loop): the valid count and
    positions, one combined range / finiteness check, and (sequence level) the row lengths."""
    mask = plan.mask
    tokens = ValidTokens(mask)
    if tokens.count:
        targets = tokens.gather(target_ids)
        checks = [((targets < 0) | (targets >= vocab)).any()]
        if plan.ref_log_prob is not None and plan.config.check_finite:
            checks.append((~torch.isfinite(plan.ref_log_prob) & mask).any())
        bad = torch.stack(checks).tolist()  # host sync 3
        if bad[0]:
            raise ValueError(f"target_ids must lie in [0, {vocab}) at valid (mask=True) positions")
        if len(bad) > 1 and bad[1]:
            raise ValueError("ref_log_prob holds non-finite value(s) at valid (mask=True) positions")
    size = plan.chunk_size
    if plan.token_level:
        return Layout(tokens, [Block(s, min(s + size, tokens.count), None) for s in range(0, tokens.count, size)])
    blocks, start, filled, first = [], 0, 0, 0  # sequence ratio: whole rows per block
    for row, count in enumerate(mask.sum(-1).tolist()):  # host sync 4
        if filled and filled + count > size:
            blocks.append(Block(start, start + filled, slice(first, row)))
            start, filled, first = start + filled, 0, row
        filled += count
    if filled:
        blocks.append(Block(start, start + filled, slice(first, plan.bsz)))
    return Layout(tokens, blocks)


# ---- the pass: its state, built once, and one block's step ---------------------------------------------------


class PassResult(NamedTuple):
    log_prob: Tensor  # (B, T) in the compute dtype, 0 at padding
    entropy_sum: Tensor | None  # Σ entropy over the valid tokens, if asked for
    grads: Gradients


class TokenInputs(NamedTuple):
    """The per-valid-token inputs of the block step, gathered once (a block's are slices of them: free)."""

    targets: Tensor  # (count,) token ids
    row_weight: Tensor | None  # (count,) each token's row weight (token level, or with the KL term)
    every: Tensor | None  # (1, largest block) all True: the mask of a token-level block laid out as one row
    old_log_prob: Tensor | None  # token level only (None: on-policy)
    advantages: Tensor | None  # token level only
    weights: Tensor | None  # token level only
    ref_log_prob: Tensor | None  # with the KL term


class Buffers(NamedTuple):
    """What the loop writes: the log-probs of the valid tokens, the entropy sum, the gradient accumulators and
    the one logits tile of the whole pass (``low`` holds the GEMM output when the tile is in another dtype)."""

    log_prob: Tensor
    entropy_sum: Tensor | None
    grads: Gradients
    tile: Tensor
    low: Tensor | None


class Pass:
    """One pass over the blocks: everything a block's step reads, built once (``Pass.build``).

    The plan, the valid tokens and their blocks, the detached LM head, the fold, the wanted gradients, the
    per-token inputs gathered once, the buffers the loop writes, and the two choices a block's dL/dlog π
    depends on, made here and not per block: the core's per-token pass, eager or compiled (``dloss_dlog_prob``,
    compiled where the fold is), and the layout it is given a block in (``block_grad``: the subclass,
    ``TokenLevelPass`` or ``SequenceLevelPass``)."""

    def __init__(self, plan, layout, head, fold, wanted, inputs, buffers, per_token_grad):
        self.plan, self.tokens, self.blocks = plan, layout.tokens, layout.blocks
        self.head, self.fold, self.wanted = head, fold, wanted
        self.inputs, self.buffers, self.dloss_dlog_prob = inputs, buffers, per_token_grad

    @staticmethod
    def build(plan: FusedPlan, head: LMHead, target_ids: Tensor, fold: Fold, wanted: Wanted) -> Pass:
        layout = make_layout(plan, target_ids, head.weight.shape[0])
        options = plan.config.block_options
        if fold.compiled:
            per_token_grad = compiled_dloss_dlog_prob(options)
        else:
            per_token_grad = functools.partial(dloss_dlog_prob, options=options)
        inputs, buffers = gather_inputs(plan, layout.tokens, target_ids), allocate(plan, layout, head, fold, wanted)
        kind = TokenLevelPass if plan.token_level else SequenceLevelPass
        return kind(plan, layout, head, fold, wanted, inputs, buffers, per_token_grad)

    def block_grad(self, block: Block, log_prob: Tensor) -> Tensor:
        """dL/dlog π of the block's tokens (policy term only), from their log-probs."""
        raise NotImplementedError

    def step(self, block: Block) -> None:
        """One block: the logits tile, its statistics, dL/dlog π, the tile's gradient in place, GEMMs 2 and 3."""
        n, config = block.end - block.start, self.plan.config
        head, buffers, wanted = self.head, self.buffers, self.wanted
        h_blk = self.tokens.take_rows(head.hidden, block)
        target = self.inputs.targets[block.tokens]
        z, gemm_out = buffers.tile[:n], (buffers.tile if buffers.low is None else buffers.low)[:n]
        if head.bias is not None:  # GEMM 1, in the input dtype
            torch.addmm(head.bias, h_blk, head.weight.t(), out=gemm_out)
        else:
            torch.mm(h_blk, head.weight.t(), out=gemm_out)
        if buffers.low is not None:
            z.copy_(gemm_out)
        stats = self.fold.forward(z, target, config.temperature, buffers.entropy_sum is not None)
        buffers.log_prob[block.tokens] = stats.log_prob
        if buffers.entropy_sum is not None:
            buffers.entropy_sum.add_(stats.entropy.sum())
        if not any(wanted):
            return
        g = self.block_grad(block, stats.log_prob)
        if self.inputs.ref_log_prob is not None:  # TRL's KL term, β·w·k3 per token
            sl = block.tokens
            g = g + config.beta * self.inputs.row_weight[sl] * kl_k3_grad(self.inputs.ref_log_prob[sl] - stats.log_prob)
        dz = self.fold.backward_(z, target, stats, g, config.temperature)
        grads = buffers.grads
        if wanted.hidden:  # GEMM 2, in the input dtype
            low = head.hidden.dtype
            dz_low = dz if dz.dtype == low else buffers.low[:n].copy_(dz)
            self.tokens.mm_into_rows(grads.hidden, block, dz_low, head.weight)
        if wanted.weight:  # GEMM 3, accumulated in fp32
            accumulate_fp32(grads.weight, dz.t(), h_blk)
        if wanted.bias:
            grads.bias.add_(dz.sum(0, dtype=grads.bias.dtype))

    def result(self) -> PassResult:
        """The log-probs as (B, T), the entropy sum, the gradients (weight and bias cast to their dtype)."""
        grads, head = self.buffers.grads, self.head
        grads = Gradients(
            grads.hidden,
            None if grads.weight is None else grads.weight.to(head.weight.dtype),
            None if grads.bias is None else grads.bias.to(head.bias.dtype),
        )
        log_prob = self.tokens.scatter(self.buffers.log_prob).view(self.plan.bsz, self.plan.seq)
        return PassResult(log_prob, self.buffers.entropy_sum, grads)


class TokenLevelPass(Pass):
    """Token ratio: a token's gradient is its own, so a block is any run of valid tokens."""

    def block_grad(self, block: Block, log_prob: Tensor) -> Tensor:
        """The block's tokens laid out as one row, each with its own row's weight."""
        sl, inputs = block.tokens, self.inputs
        lp = log_prob[None]
        old = lp if inputs.old_log_prob is None else inputs.old_log_prob[sl][None]
        weights = None if inputs.weights is None else inputs.weights[sl][None]
        every = inputs.every[:, : lp.shape[1]]
        advantages, row_weight = inputs.advantages[sl][None], inputs.row_weight[sl][None]
        return self.dloss_dlog_prob(lp, old, advantages, every, row_weight, weights)[0]


class SequenceLevelPass(Pass):
    """Sequence ratio (GSPO): a token's gradient depends on its whole row, so a block is whole rows."""

    def block_grad(self, block: Block, log_prob: Tensor) -> Tensor:
        """The block's whole rows laid out as rows (a token's ratio is its row's)."""
        plan, batch, rows = self.plan, self.plan.batch, block.rows
        local = self.tokens.block_positions(block) - rows.start * plan.seq
        lp = log_prob.new_zeros((rows.stop - rows.start) * plan.seq).index_copy_(0, local, log_prob)
        lp = lp.view(rows.stop - rows.start, plan.seq)
        old = lp if batch.old_log_prob is None else batch.old_log_prob[rows]
        weights = None if batch.weights is None else batch.weights[rows]
        g = self.dloss_dlog_prob(lp, old, batch.advantages[rows], batch.mask[rows], plan.row_weight[rows], weights)
        return g.reshape(-1).index_select(0, local)


def gather_inputs(plan: FusedPlan, tokens: ValidTokens, target_ids: Tensor) -> TokenInputs:
    batch = plan.batch
    token_level, kl = plan.token_level, plan.ref_log_prob is not None
    gather = lambda x: None if x is None else tokens.gather(x)
    return TokenInputs(
        targets=gather(target_ids),
        row_weight=gather(plan.row_weight.expand(plan.bsz, plan.seq)) if token_level or kl else None,
        every=torch.ones(1, min(plan.chunk_size, max(tokens.count, 1)), dtype=torch.bool, device=target_ids.device)
        if token_level
        else None,
        old_log_prob=gather(batch.old_log_prob) if token_level else None,
        advantages=gather(batch.advantages) if token_level else None,
        weights=gather(batch.weights) if token_level else None,
        ref_log_prob=gather(plan.ref_log_prob),
    )


def allocate(plan: FusedPlan, layout: Layout, head: LMHead, fold: Fold, wanted: Wanted) -> Buffers:
    device, low, fp = head.hidden.device, head.hidden.dtype, plan.batch.dtype
    vocab = head.weight.shape[0]
    acc = torch.float64 if low == torch.float64 else torch.float32  # the weight / bias gradients' accumulators
    grads = Gradients(
        hidden=torch.zeros(head.hidden.shape, dtype=low, device=device) if wanted.hidden else None,
        weight=torch.zeros(head.weight.shape, dtype=acc, device=device) if wanted.weight else None,
        bias=torch.zeros(vocab, dtype=acc, device=device) if wanted.bias else None,
    )
    rows = max((block.end - block.start for block in layout.blocks), default=0)
    tile_dtype = fold.tile_dtype(low)
    return Buffers(
        log_prob=torch.zeros(layout.tokens.count, dtype=fp, device=device),
        entropy_sum=torch.zeros((), dtype=fp, device=device) if plan.config.compute_entropy else None,
        grads=grads,
        tile=torch.empty(rows, vocab, dtype=tile_dtype, device=device),  # one tile for the whole pass
        low=torch.empty(rows, vocab, dtype=low, device=device) if tile_dtype != low else None,
    )


# ---- the folds: one tile's log-softmax statistics forward, dL/dz backward -----------------------------------


class Fold(Protocol):
    """How a device works on one (n, V) logits tile (see the module docstring)."""

    def tile_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the tile the pass allocates for inputs of ``input_dtype``."""

    def forward(self, z: Tensor, target: Tensor, temperature: float, entropy: bool):
        """Statistics of softmax(z / T) per row: ``.log_prob`` of the target, ``.entropy`` (or None) and
        whatever the fold's own ``backward_`` needs. May overwrite ``z``."""

    def backward_(self, z: Tensor, target: Tensor, stats, g: Tensor, temperature: float) -> Tensor:
        """Write dL/dz = g · (onehot(target) − softmax(z / T)) / T over ``z`` (in its dtype) and return it."""

    #: whether the fold runs compiled kernels: the pass then runs the core's per-token pass compiled too
    compiled: bool


class InPlaceStats(NamedTuple):
    log_prob: Tensor  # (n,) log softmax(z / T)[target], compute dtype
    entropy: Tensor | None  # (n,)
    sum_exp: Tensor  # (n,) Σ exp(z/T − max): the tile holds exp(z/T − max) after the forward


class InPlaceFold:
    """CPU: the tile in fp32 (fp64 for fp64 inputs); softmax and its gradient written over it in place."""

    compiled = False

    def tile_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if input_dtype == torch.float64 else torch.float32

    def forward(self, z, target, temperature, entropy) -> InPlaceStats:
        if temperature != 1.0:
            z.div_(temperature)
        z_target = z.gather(1, target[:, None])[:, 0]
        z_max = z.amax(1)
        z.sub_(z_max[:, None]).exp_()  # z := exp(z − max)
        sum_exp = z.sum(1)
        log_sum = sum_exp.log()
        ent = log_sum - torch.xlogy(z, z).sum(1) / sum_exp if entropy else None  # H = log Σe − Σ e·log e / Σe
        return InPlaceStats(z_target - z_max - log_sum, ent, sum_exp)

    def backward_(self, z, target, stats: InPlaceStats, g, temperature) -> Tensor:
        g = g.to(z.dtype) / temperature
        z.mul_((-g / stats.sum_exp)[:, None])  # −g·softmax
        return z.scatter_add_(1, target[:, None], g[:, None])  # + g·onehot


class CompiledStats(NamedTuple):
    log_prob: Tensor  # (n,) log softmax(z / T)[target], fp32
    entropy: Tensor | None  # (n,)
    logsumexp: Tensor  # (n,) logsumexp(z / T) in fp32; the tile is left unchanged by the forward


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


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=None)


class CompiledFold:
    """CUDA: the tile in the input dtype; the two folds and the per-token pass compiled (``compile=False``:
    their eager torch twins, which the tests hold the compiled ones to)."""

    def __init__(self, compile: bool = True):
        self.compiled = compile

    def tile_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return input_dtype

    def forward(self, z, target, temperature, entropy) -> CompiledStats:
        fn = _compiled(fold_forward) if self.compiled else fold_forward
        lse, z_target, ent = fn(z, target, temperature, entropy)
        return CompiledStats(z_target - lse, ent, lse)

    def backward_(self, z, target, stats: CompiledStats, g, temperature) -> Tensor:
        fn = _compiled(fold_backward_) if self.compiled else fold_backward_
        return fn(z, target, stats.logsumexp, g.to(stats.logsumexp.dtype), temperature)


def default_fold(device: torch.device) -> Fold:
    """CUDA: compiled folds on an input-dtype tile; elsewhere the in-place fp32 fold (measured faster on CPU)."""
    return CompiledFold() if device.type == "cuda" else InPlaceFold()


# ---- fp32 accumulation of a low-precision GEMM (GPU branch + its CPU twin) ----------------------------------


@functools.cache
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


# ---- TRL's k3 KL to a reference policy: its value and its derivative, side by side ------------------------


def kl_k3(delta: Tensor) -> Tensor:
    """k3 = exp(δ) − δ − 1 with δ = log π_ref − log π (TRL's per-token KL; ≥ 0, 0 at δ = 0)."""
    return torch.expm1(delta) - delta


def kl_k3_grad(delta: Tensor) -> Tensor:
    """d k3 / d log π = 1 − exp(δ) (δ = log π_ref − log π, so dδ/dlog π = −1)."""
    return -torch.expm1(delta)


# ---- the loss and metrics of the gathered log-probs; the autograd wrapper -------------------------------------


def loss_and_metrics(plan: FusedPlan, log_prob: Tensor, entropy_sum: Tensor | None) -> PolicyLossOutput:
    """The core's policy loss on the gathered log-probs, from the plan's checked batch, options and row weight
    (+ the KL term and the entropy metric)."""
    config, batch = plan.config, plan.batch
    if batch.old_log_prob is None:  # on-policy: π_old = the current policy, r = 1
        batch = batch._replace(old_log_prob=log_prob)
    out = policy_loss(log_prob, batch, config.options, plan.row_weight, check_finite=config.check_finite)
    # the per-token term loss aggregates: the policy's (detached), + β·k3 with the KL term
    loss, aggregated, metrics = out.loss.detach(), out.per_token_loss.detach(), dict(out.metrics)
    count = batch.mask.sum().clamp(min=1)
    if plan.ref_log_prob is not None:
        kl = kl_k3(torch.where(batch.mask, plan.ref_log_prob - log_prob, 0.0))
        aggregated = aggregated + config.beta * kl
        loss = weighted_row_sum(torch.where(batch.mask, aggregated, 0.0), plan.row_weight)
        metrics["kl"] = (kl.sum() / count).float()
    if entropy_sum is not None:
        metrics["entropy"] = (entropy_sum / count).float()
    return PolicyLossOutput(loss=loss, metrics=metrics, per_token_loss=aggregated, ratio=out.ratio)


class _FusedLoss(torch.autograd.Function):
    """Attaches the gradients computed in the pass to the loss; the backward scales them by the incoming
    gradient (nothing is recomputed) and frees them (a second backward raises)."""

    @staticmethod
    def forward(ctx, loss: Tensor, grads: Gradients, hidden2d, weight, bias) -> Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads, ctx.grads = ctx.grads, None  # free them once handed over
        if grads is None:
            raise RuntimeError("fused_linear_policy_loss: backward called twice (retain_graph is not supported)")
        scaled = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]  # ours alone: in place
        return None, None, *scaled
