"""Shared helpers for the verl adapter tests (real verl==0.9.1, CPU tensors).

Expected values always come from verl's own code (vanilla / gspo losses, agg_loss, advantage
estimators) or from the paper's equation written out here, never from cfpo_loss itself.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def actor_config(loss_mode="cfpo", loss_agg_mode="token-mean", global_batch_info=None, **kw) -> ActorConfig:
    """A real verl ActorConfig, as verl's own CPU tests build it."""
    kw.setdefault("clip_ratio", 0.2)
    kw.setdefault("clip_ratio_low", 0.2)
    kw.setdefault("clip_ratio_high", 0.28)
    kw.setdefault("clip_ratio_c", 3.0)
    return ActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_mini_batch_size=4,
        ppo_micro_batch_size_per_gpu=2,
        loss_agg_mode=loss_agg_mode,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
        global_batch_info=dict(global_batch_info or {}),
        **kw,
    )


def make_batch(seed=0, B=6, T=7, spread=0.5, dtype=torch.float32):
    """Random (old_log_prob, log_prob leaf, token advantages, bool mask, rollout_is_weights).

    Ratios spread widely so that clipping (both sides), dual clip (r > 3 with A < 0) and zero
    advantages all occur; one row is fully masked and rows have different lengths.
    """
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3 - 0.05
    delta = torch.randn(B, T, generator=g, dtype=dtype) * spread
    delta[0, :3] = torch.tensor([1.3, -0.6, 0.35], dtype=dtype)  # r = 3.7 (dual clip), 0.55, 1.42
    new = (old + delta).detach().requires_grad_(True)
    adv_row = torch.randn(B, generator=g, dtype=dtype)
    adv_row[0] = -1.0
    adv_row[1] = 0.0
    adv_row[2] = 0.8
    delta[2, 0] = 0.5  # A > 0, r = 1.65: upper clip
    adv = adv_row[:, None].expand(B, T).clone()
    lengths = torch.tensor([T, T - 1, 3, 0, T, 1][:B])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    weights = torch.rand(B, T, generator=g, dtype=dtype) * 1.5 + 0.25
    return old, new, adv, mask, weights


def global_info(mask, mode_kind="global", dp_size=2):
    """global_batch_info as verl's ppo_loss fills it (global counts of a batch twice this size)."""
    if mode_kind == "none":
        return {}
    return {
        "dp_size": dp_size,
        "batch_num_tokens": int(mask.sum()) * dp_size,
        "global_batch_size": int((mask.sum(-1) > 0).sum()) * dp_size,
        "loss_scale_factor": 11,
    }
