"""``policy_loss_fn``: AReaL's ``ppo_actor_loss_fn`` contract (arguments, ``(loss, stat)``) around the core's objective.

What AReaL hands the loss and where each piece goes:

    AReaL (ppo_actor_loss_fn)                 here
    logprobs / proximal_logprobs              log π_θ / log π_prox: the core's log_prob / old_log_prob, so the ratio
                                              is π_θ / π_prox (the decoupled objective's; without the decoupled
                                              loss AReaL passes π_old as π_prox, and the ratio is π_θ / π_old)
    old_logprobs (π_behave)                   only through rejection_sampling: AReaL's own apply_rejection_sampling
                                              gives the filtered mask and the behaviour weight π_prox / π_behave,
                                              which multiplies the per-token loss (the core's ``weights``)
    eps_clip, eps_clip_higher                 eps_low, eps_high
    c_clip                                    dual_clip (clip only; with cfpo it is refused: it bounds only the
                                              clipped objective)
    importance_sampling_level                 ratio_level "token" / "sequence" (GSPO: exp of the mean log-ratio
                                              per sequence, with the per-sequence mean advantage, as AReaL does)
    loss_mask, cu_seqlens                     (B, T) padded or 1-D packed; packed sequences are unpacked into rows
    Σ_valid loss / N (N: the mask's count     "token-mean" with batch_num_tokens = N, the count before rejection
    before rejection sampling)                (AReaL keeps it so that rejected tokens do not inflate the rest)

The stat dict has every key AReaL's returns, with AReaL's meaning: ``loss`` (per-token loss), ``importance_weight``
(the ratio the objective used, 0 outside the mask), ``approx_kl`` (log π_θ − log π_prox), ``clip_mask`` (for cfpo:
the same trust-region exit, so dashboards compare), ``dual_clip_mask``, and under rejection sampling
``behave_approx_kl``, ``behave_imp_weight``, ``behave_mask``, ``filtered_fraction``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import compute_policy_loss
from ..._checks import check_choice, check_eps
from ._names import OBJECTIVES, RATIO_LEVELS


def policy_loss_fn(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    loss_mask: Tensor,
    eps_clip_higher: float | None = None,
    c_clip: float | None = None,
    rejection_sampling=None,
    importance_sampling_level: str = "token",
    cu_seqlens: Tensor | None = None,
    *,
    objective: str = "cfpo",
) -> tuple[Tensor, dict]:
    """AReaL's ``ppo_actor_loss_fn`` with the per-token objective chosen by ``objective`` ("cfpo" or "clip").

    Same arguments and return value as AReaL's (see the module docstring); ``objective="clip"`` reproduces AReaL's
    loss, gradient and stats, ``"cfpo"`` replaces only the clipped surrogate by the CFPO one. Shapes, NaN at valid
    positions and ε are checked by the core (``compute_policy_loss``), which raises naming the argument.
    """
    check_options(objective, c_clip, importance_sampling_level, eps_clip, eps_clip_higher)
    from areal.utils.functional.functional import apply_rejection_sampling

    count = loss_mask.count_nonzero().clamp(min=1)  # before rejection, as AReaL normalises
    weight = None
    if rejection_sampling is not None:
        rs = apply_rejection_sampling(proximal_logprobs, old_logprobs, loss_mask, cu_seqlens, rejection_sampling)
        loss_mask, weight = rs.loss_mask, rs.behave_imp_weight
    mask = loss_mask.bool()
    rows = Rows(logprobs, cu_seqlens, importance_sampling_level)
    mask_rows, adv_rows = rows.to_rows(mask, False), rows.to_rows(advantages, 0.0)
    if importance_sampling_level == "sequence":
        adv_rows = sequence_mean(adv_rows, mask_rows)
    out = compute_policy_loss(
        rows.to_rows(logprobs, 0.0),
        rows.to_rows(proximal_logprobs, 0.0),
        adv_rows,
        mask_rows,
        objective=objective,
        eps_low=eps_clip,
        eps_high=eps_clip_higher,
        dual_clip=c_clip,
        agg="token-mean",
        ratio_level=importance_sampling_level,
        weights=None if weight is None else rows.to_rows(weight, 0.0),
        batch_num_tokens=count.to(torch.float32),
    )
    stat = areal_stats(
        rows.from_rows(out.per_token_loss.detach()),
        rows.from_rows(out.ratio),
        rows.from_rows(adv_rows),
        mask,
        logprobs,
        proximal_logprobs,
        (eps_clip, eps_clip if eps_clip_higher is None else eps_clip_higher, c_clip),
    )
    if rejection_sampling is not None:
        stat.update(behave_stats(proximal_logprobs, old_logprobs, weight, mask, rs.filtered_fraction))
    return out.loss, stat


def check_options(objective, c_clip, importance_sampling_level, eps_clip, eps_clip_higher) -> None:
    """Refuse, by AReaL's option names, what is invalid or has no meaning for the objective (no tensor touched)."""
    check_choice("objective", objective, OBJECTIVES)
    check_choice("importance_sampling_level", importance_sampling_level, RATIO_LEVELS)
    check_eps(eps_clip, eps_clip_higher, names=("eps_clip", "eps_clip_higher"))
    if objective == "cfpo" and c_clip is not None:
        raise ValueError(
            f"c_clip={c_clip} (AReaL's dual clip) bounds only the clipped PPO objective; the CFPO objective clips "
            "nothing, so it has no meaning there. Set actor.c_clip=null, or objective='clip'."
        )


class Rows:
    """AReaL's layout <-> the core's (B, T) rows. 2-D padded tensors are rows already. 1-D packed tensors
    (AReaL's engines pack micro-batches; ``cu_seqlens`` marks where each sequence starts) become one row per
    sequence when the ratio is per sequence, else a single row (a token-level loss needs no sequence bounds)."""

    def __init__(self, like: Tensor, cu_seqlens: Tensor | None, level: str):
        self.packed = like.dim() == 1
        self.index = None
        if not self.packed or level == "token":
            return
        if cu_seqlens is None:
            raise ValueError(
                "cu_seqlens is required for 1-D (packed) tensors with importance_sampling_level='sequence': it "
                "marks where each sequence starts (AReaL's packed micro-batches carry it)"
            )
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = cu_seqlens[:-1].long()
        row = torch.repeat_interleave(torch.arange(lengths.numel(), device=like.device), lengths)
        col = torch.arange(row.numel(), device=like.device) - starts[row]
        self.shape = (lengths.numel(), int(lengths.max()) if lengths.numel() else 0)
        self.index = (row, col)

    def to_rows(self, x: Tensor, fill) -> Tensor:
        if not self.packed:
            return x
        if self.index is None:
            return x.unsqueeze(0)
        out = torch.full(self.shape, fill, dtype=x.dtype, device=x.device)
        return out.index_put(self.index, x)  # differentiable in x

    def from_rows(self, x: Tensor) -> Tensor:
        if not self.packed:
            return x
        return x[0] if self.index is None else x[self.index]


def sequence_mean(advantages: Tensor, mask: Tensor) -> Tensor:
    """Each row's mean advantage over its valid tokens, on every token (AReaL's GSPO advantage)."""
    total = torch.where(mask, advantages, 0.0).sum(-1, keepdim=True)
    return (total / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(advantages)


def areal_stats(per_token_loss, ratio, advantages, mask, logprobs, proximal_logprobs, eps) -> dict:
    """AReaL's stat keys, each as AReaL defines it (per token, in the input layout)."""
    eps_low, eps_high, c_clip = eps
    ratio = torch.where(mask, ratio, 0.0)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clip_mask = (unclipped < clipped) & mask  # the trust-region exit, also for cfpo (which clips nothing)
    if c_clip is not None:
        dual_clip_mask = (torch.sign(advantages) * c_clip * advantages < torch.max(unclipped, clipped)) & mask
    else:
        dual_clip_mask = torch.zeros_like(clip_mask)
    return dict(
        loss=per_token_loss,
        importance_weight=ratio,
        approx_kl=(logprobs - proximal_logprobs).detach(),
        clip_mask=clip_mask,
        dual_clip_mask=dual_clip_mask,
    )


def behave_stats(proximal_logprobs, old_logprobs, weight, mask, filtered_fraction) -> dict:
    """The rejection-sampling keys: the behaviour policy's log-ratio and weight where the weight survives."""
    behave_mask = (weight > 0) & mask
    behave_approx_kl = torch.where(behave_mask, proximal_logprobs.detach() - old_logprobs.detach(), 0.0)
    return dict(
        behave_approx_kl=behave_approx_kl,
        behave_imp_weight=weight.detach(),
        behave_mask=behave_mask,
        filtered_fraction=filtered_fraction,
    )
