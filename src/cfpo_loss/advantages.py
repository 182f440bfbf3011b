"""Outcome-reward advantage estimators for groups of responses to the same prompt.

    group_advantages   A_i = (R_i − mean_g) / (std_g + eps)     scale="group"  (GRPO)
                       A_i = (R_i − mean_g) / (std_batch + eps) scale="batch"  (TRL scale_rewards="batch")
                       A_i =  R_i − mean_g                      scale="none"   (Dr.GRPO)
    rloo_advantages    A_i =  R_i − mean_{j≠i, j∈g} R_j  =  K/(K−1) · (R_i − mean_g)

std is the unbiased one (torch.std). Groups are given either by ``group_size`` K (contiguous groups of
K, the TRL / OpenRLHF layout) or by ``group_ids`` (one id per response in any order: verl's ``uid``
array). A group of one has no baseline: by default that is an error; ``singleton="passthrough"``
reproduces verl (GRPO: mean 0, std 1, so A = R/(1+eps) or R; RLOO: A = R).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_choice, check_tensor

SCALES = ("group", "batch", "none")
SINGLETON = ("error", "passthrough")


def group_advantages(
    rewards: Tensor,
    group_size: int | None = None,
    *,
    group_ids: Sequence | Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "error",
) -> Tensor:
    """GRPO group-normalised advantages of shape (N,) for rewards (N,). See the module docstring."""
    check_choice("scale", scale, SCALES)
    check_choice("singleton", singleton, SINGLETON)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rewards, inverse, counts = _groups(rewards, group_size, group_ids, singleton, "group_advantages")
    sums = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    alone = counts == 1
    mean = torch.where(alone, 0.0, sums / counts)[inverse]
    centred = rewards - mean
    if scale == "none":
        return centred
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_ones(())
        return centred / (std + eps)
    sq = torch.zeros_like(sums).index_add_(0, inverse, centred.square())
    std = torch.where(alone, 1.0, sq / (counts - 1).clamp(min=1)).sqrt()[inverse]
    return centred / (std + eps)


def rloo_advantages(
    rewards: Tensor,
    group_size: int | None = None,
    *,
    group_ids: Sequence | Tensor | None = None,
    singleton: str = "error",
) -> Tensor:
    """RLOO leave-one-out advantages R_i − mean of the other K−1 rewards in its group, shape (N,)."""
    check_choice("singleton", singleton, SINGLETON)
    rewards, inverse, counts = _groups(rewards, group_size, group_ids, singleton, "rloo_advantages")
    sums = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    k = counts[inverse]
    loo_mean = (sums[inverse] - rewards) / (k - 1).clamp(min=1)
    return torch.where(k == 1, rewards, rewards - loo_mean)


def _groups(rewards, group_size, group_ids, singleton, caller):
    """Validate; return (rewards as float (N,), group index per response, group sizes as float)."""
    check_tensor("rewards", rewards)
    if rewards.dim() == 2 and rewards.shape[1] == 1:
        rewards = rewards[:, 0]
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards hold {int((~torch.isfinite(rewards)).sum())} non-finite value(s)")
    rewards = rewards.float() if rewards.dtype != torch.float64 else rewards
    n = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError(f"{caller}: give exactly one of group_size (contiguous groups) or group_ids")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size={group_size} does not divide the number of rewards N={n}")
        inverse = torch.arange(n, device=rewards.device) // group_size
    else:
        inverse = _index_of(group_ids, n, rewards.device)
    counts = torch.bincount(inverse).to(rewards.dtype)
    if singleton == "error" and bool((counts == 1).any()):
        raise ValueError(
            f"{caller}: {int((counts == 1).sum())} group(s) hold a single response, which has no baseline; "
            f"generate >= 2 responses per prompt, or pass singleton='passthrough' for verl's behaviour"
        )
    return rewards, inverse, counts


def _index_of(group_ids, n: int, device) -> Tensor:
    """Map arbitrary group ids (tensor, numpy array, list of str/int) to 0..G-1, in first-seen order."""
    if isinstance(group_ids, Tensor):
        if group_ids.dim() != 1 or group_ids.shape[0] != n:
            raise ValueError(f"group_ids must be (N,) with N={n}, got shape {tuple(group_ids.shape)}")
        return torch.unique(group_ids, return_inverse=True)[1].to(device)
    ids = list(group_ids.tolist() if hasattr(group_ids, "tolist") else group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids must hold one id per reward (N={n}), got {len(ids)}")
    first_seen: dict = {}
    return torch.tensor([first_seen.setdefault(i, len(first_seen)) for i in ids], dtype=torch.long, device=device)
