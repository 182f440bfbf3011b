"""Shared helpers for the verl adapter tests (the real verl of the nox session - 0.8.0, 0.9.0 or 0.9.1 -
on CPU tensors).

Expected values always come from verl's own code (vanilla / gspo losses, agg_loss, advantage
estimators) or from the paper's equation written out here, never from cfpo_loss itself.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("verl")

from importlib.metadata import version as _dist_version

from verl.workers.config.actor import ActorConfig, PolicyLossConfig

from cfpo_loss.adapters._support import version_key

VERL_VERSION = _dist_version("verl")
_V = version_key(VERL_VERSION)
#: verl 0.9.0 added the `verl.plugins` entry-point group; 0.8.0 loads plugins through VERL_USE_EXTERNAL_MODULES
HAS_ENTRY_POINTS = _V >= (0, 9, 0)
#: verl 0.9.0 added agg_loss "token-sum"
HAS_TOKEN_SUM = _V >= (0, 9, 0)
#: verl 0.9.1's gspo honours loss_agg_mode; 0.8.0 / 0.9.0's always aggregates "seq-mean-token-mean"
GSPO_HONOURS_AGG_MODE = _V >= (0, 9, 1)

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
if not HAS_TOKEN_SUM:
    AGG_MODES.remove("token-sum")

#: what a verl 0.8.0 user passes so that every Ray worker imports the plugin (the adapter's HYDRA_OVERRIDE)
EXTERNAL_MODULES = {"VERL_USE_EXTERNAL_MODULES": "cfpo_loss.adapters.verl"}


def torch_attention_fallback(monkeypatch) -> None:
    """verl < 0.9.1 unpads with ``flash_attn.bert_padding`` only (no CPU build); 0.9.1 falls back to these
    pure-torch equivalents (copied from verl 0.9.1's ``verl/utils/attention_utils.py``, Apache-2.0). Only the
    padding-format conversion is replaced; the loss path under test is verl's own."""
    import torch.nn.functional as F
    from verl.utils import attention_utils

    if hasattr(attention_utils, "_fallback_unpad_input"):  # verl >= 0.9.1: its own fallback applies
        return

    def index_first_axis(tensor, indices):
        assert tensor.ndim >= 2
        return tensor[indices]

    def pad_input(hidden_states, indices, batch, seqlen):
        other_shape = hidden_states.shape[1:]
        output = hidden_states.new_zeros(batch * seqlen, *other_shape)
        output[indices] = hidden_states
        return output.view(batch, seqlen, *other_shape)

    def unpad_input(hidden_states, attention_mask, unused_mask=None):
        all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
        seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
        used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
        indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
        cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
        flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
        max_len = seqlens_in_batch.max().item()
        return index_first_axis(flat, indices), indices, cu_seqlens, max_len, used_seqlens_in_batch

    def rearrange(*args, **kwargs):
        from einops import rearrange as einops_rearrange

        return einops_rearrange(*args, **kwargs)

    fns = (index_first_axis, pad_input, rearrange, unpad_input)
    monkeypatch.setattr(attention_utils, "_get_attention_functions", lambda: fns)


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
        policy_loss=kw.pop("policy_loss", None) or PolicyLossConfig(loss_mode=loss_mode),
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


#: verl's PPO entry points with their Hydra config (directory under the installed verl, config name) and the module
#: whose ``main`` composes it; the two off-policy recipes ship in the wheel (verl/experimental/...) on 0.8.0 - 0.9.1
RECIPES = {
    "ppo": ("trainer/config", "ppo_trainer", "verl.trainer.main_ppo"),
    "one_step_off": (
        "experimental/one_step_off_policy/config",
        "one_step_off_ppo_trainer",
        "verl.experimental.one_step_off_policy.main_ppo",
    ),
    "fully_async": (
        "experimental/fully_async_policy/config",
        "fully_async_ppo_trainer",
        "verl.experimental.fully_async_policy.fully_async_main",
    ),
}


def compose_recipe(recipe: str, overrides=()):
    """verl's Hydra config of ``recipe`` (a RECIPES key) with ``overrides``, composed as its ``main`` composes it
    (a fresh copy each call; each composition is made once per session, ~1 s each).

    one_step_off_ppo_trainer.yaml finds its base config through ``hydra.searchpath: file://verl/trainer/config``,
    a path relative to the working directory (a verl source checkout): with a pip-installed verl it composes only
    from the directory that holds the installed ``verl`` package, so compose from there.
    """
    import copy

    return copy.deepcopy(_compose(recipe, tuple(overrides)))


@functools.cache
def _compose(recipe: str, overrides: tuple):
    import os

    import verl
    from hydra import compose, initialize_config_dir

    sub, name, _ = RECIPES[recipe]
    root = os.path.dirname(verl.__file__)
    cwd = os.getcwd()
    os.chdir(os.path.dirname(root))
    try:
        with initialize_config_dir(config_dir=os.path.join(root, sub), version_base=None):
            return compose(config_name=name, overrides=list(overrides))
    finally:
        os.chdir(cwd)
