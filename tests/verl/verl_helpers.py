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


def rounding_bounds(old, new, adv, mask, mode="token-mean", global_batch_info=None, weights=None, *, objective="cfpo",
                    ratio_level="token", eps_low=0.2, eps_high=0.28, dual_clip=3.0, log_prob_cond=None):  # fmt: skip
    """How far ONE fp32 evaluation of a verl-signature policy loss on these inputs may lie from the exact value:
    ``(RoundingBound, {verl metric key: bound})``. Two fp32 evaluations written differently (ours and verl's vanilla /
    gspo, or ours and the paper's equation evaluated in fp32 by the test) differ by at most twice these.

    The loss bound is cfpo_loss.reference.token_rounding_bound (first-order forward error of r, J and the sum, times
    SAFETY; derivation in reference.py) with each token's coefficient read off verl's own ``agg_loss`` in float64
    (it is linear in the per-token loss: d agg / d loss_t), times ``weights`` (rollout_is_weights); forming that
    coefficient in fp32 costs up to 5 roundings (÷ n_i, ÷ the global count, × dp_size, ÷ loss_scale_factor, × the
    weight: seq-mean-token-sum-norm with weights), counted as ``coef_roundings``. Metrics:
    pg_clipfrac / pg_clipfrac_lower are counts over the valid tokens (exact, off the clip boundaries) divided once;
    ppo_kl the masked mean of the token log-ratios; penalty the core's metric (reference.metric_bounds)."""
    from verl.trainer.ppo.core_algos import agg_loss

    from cfpo_loss.reference import SAFETY, UNIT_ROUNDOFF, metric_bounds, token_rounding_bound

    mask = mask.bool()
    x = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
    (coef,) = torch.autograd.grad(agg_loss(x, mask.double(), mode, **dict(global_batch_info or {})), x)
    if weights is not None:
        coef = coef * weights.double()
    kw = dict(eps_low=eps_low, eps_high=eps_high)
    bound = token_rounding_bound(new, old, adv, mask, coef, objective=objective, ratio_level=ratio_level,
                                 log_prob_cond=log_prob_cond, coef_roundings=5, **kw)  # fmt: skip
    d = (new.detach().double() - old.double()).clamp(-20, 20)
    a = adv.double().reshape(mask.shape[0], -1).expand(mask.shape)
    extra = 0.0 if log_prob_cond is None else log_prob_cond.double()
    token = metric_bounds(d.exp()[mask], a[mask], (d.abs() + extra)[mask], **kw)
    if ratio_level == "sequence":
        n = mask.sum(-1, keepdim=True).clamp(min=1)
        log_r = (torch.where(mask, d, 0.0).sum(-1, keepdim=True) / n).expand(mask.shape)
        cond = (torch.where(mask, d.abs() + extra, 0.0).sum(-1, keepdim=True) + log_r.abs()).expand(mask.shape)
        at_level = metric_bounds(log_r.exp()[mask], a[mask], cond[mask], **kw)
    else:
        log_r, at_level = d, token
    dual = ((a < 0) & (log_r.exp() > dual_clip))[mask].double()
    metrics = {
        "actor/pg_clipfrac": at_level["tr_exit_frac"],
        "actor/ppo_kl": token["approx_kl_k1"],
        "actor/pg_clipfrac_lower": 2 * SAFETY * UNIT_ROUNDOFF[torch.float32] * float(dual.mean()),
        "actor/cfpo/penalty": at_level["penalty"],
    }
    return bound, metrics


def bigram_log_prob_cond(table, input_ids, n_prompt):
    """Per response token, the error over u of log p_t = log_softmax(table[token t−1])[token t] computed in fp32 (the
    tests' bigram LM), for ``rounding_bounds(log_prob_cond=...)``: z_b − max (u·|z_b − max|), V exps and their sum
    ((V + 2)·u relative, so (V + 2)·u absolute after the log, plus u·log S), the final subtraction (u·|log p|); as
    |z_b − max| + log S = |log p|, in all 2·|log p_t| + V + 2."""
    logp = torch.log_softmax(table.detach().double()[input_ids[:, n_prompt - 1 : -1]], -1)
    logp = logp.gather(-1, input_ids[:, n_prompt:, None]).squeeze(-1)
    return 2 * logp.abs() + table.shape[-1] + 2


def bigram_table_grad_bound(table, input_ids, n_prompt, logp_grad, logp_grad_bound):
    """Bound on the fp32 error of d loss / d table for the tests' bigram LM, from the exact d loss / d log p_t of each
    response token (``logp_grad``, float64, 0 where the loss does not see the token) and the bound on its error
    (``logp_grad_bound``, e.g. RoundingBound.grad). Row a of the gradient is Σ_{t: token t−1 = a} g_t·(e_{b_t} − p_t)
    (b_t token t, p_t = softmax(table[a])); per element j it carries
      δg_t·|e_{b_t,j} − p_t,j|                                       the error of g_t itself
      u·|g_t|·(p_t,j·(2·|log p_t,j| + V + 4) + 2·(e_{b_t,j} + p_t,j))  log_softmax's backward: exp(log p) (its
                                                                     error as in bigram_log_prob_cond, plus exp's
                                                                     2u), one product and one difference
      u·m_a·Σ_t |g_t|·|e_{b_t,j} − p_t,j|                            the accumulation over the m_a tokens that
                                                                     follow token a (index backward, micro-batches)
    times SAFETY (u = SAFETY·u_fp32)."""
    from cfpo_loss.reference import SAFETY, UNIT_ROUNDOFF

    u = SAFETY * UNIT_ROUNDOFF[torch.float32]
    V = table.shape[-1]
    prev, label = input_ids[:, n_prompt - 1 : -1].reshape(-1), input_ids[:, n_prompt:].reshape(-1)
    p = torch.softmax(table.detach().double()[prev], -1)
    e = torch.nn.functional.one_hot(label, V).double()
    g, dg = logp_grad.double().reshape(-1, 1).abs(), logp_grad_bound.double().reshape(-1, 1)
    diff = (e - p).abs()
    per_token = dg * diff + u * g * (p * (2 * p.log().abs() + V + 4) + 2 * (e + p))
    seen = (g.flatten() != 0).double()
    m = torch.zeros(V, dtype=torch.float64).index_add_(0, prev, seen)
    accumulated = torch.zeros(V, V, dtype=torch.float64).index_add_(0, prev, g * diff)
    return torch.zeros(V, V, dtype=torch.float64).index_add_(0, prev, per_token) + u * m[:, None] * accumulated
