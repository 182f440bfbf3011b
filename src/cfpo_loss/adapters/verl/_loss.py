"""The losses verl calls: verl's PolicyLossFn signature and config translated to ``cfpo_loss.compute_policy_loss``.

    verl                                    core
    clip_ratio_low / clip_ratio_high        eps_low / eps_high (each falls back to clip_ratio when None,
                                            exactly as verl's ``vanilla`` loss reads them)
    loss_agg_mode                           agg (verl ``agg_loss`` semantics; "token-sum" only on verl
                                            >= 0.9.0, where verl's agg_loss has it: on 0.8.0 it is refused
                                            by name, as verl's own losses refuse it)
    config.global_batch_info                dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    rollout_is_weights                      weights (multiplied onto the per-token loss, as vanilla does)

``cfpo_seq`` honours ``loss_agg_mode`` on every verl version, as verl 0.9.1's ``gspo`` does (verl 0.8.0 /
0.9.0's ``gspo`` ignores it and always aggregates "seq-mean-token-mean": set that mode to match them).

Metrics, with verl's meaning:
    actor/pg_clipfrac        fraction of valid tokens outside the trust region in the direction the
                             advantage pushes (A>0 & r>1+eps_high, or A<0 & r<1-eps_low). For the clip
                             objective this is exactly verl's clip fraction; for CFPO nothing is clipped,
                             but it is the same statistic, so runs compare side by side.
    actor/ppo_kl             masked mean of log pi_old - log pi (clamped log-ratio), as verl.
    actor/pg_clipfrac_lower  fraction of A<0 tokens where the dual-clip bound (clip_ratio_c) replaced the
                             loss. CFPO has no dual clip, so this is 0.0 (as verl's own ``gspo`` reports).
    actor/cfpo/<name>        every core metric (ratio_mean, ratio_min, ratio_max, ratio_dev, tr_exit_frac,
                             tr_exit_low, tr_exit_high, approx_kl_k1, approx_kl_k3, penalty).

In bypass mode the loss also applies verl's rejection mask (``_bypass``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._metric_names import EVERY_CORE_METRIC, framework_keys
from ._bypass import bypass_correction, bypass_mask
from ._common import MARK, PLUGIN_MODULE, cfg, verl_version

_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
#: core metric -> verl's key (actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower), and the prefix of the rest
_VERL_KEYS = framework_keys("verl")
_EVERY_CORE_METRIC = EVERY_CORE_METRIC["verl"]


def _eps(config: Any) -> tuple[float, float]:
    clip_ratio = cfg(config, "clip_ratio")
    low = cfg(config, "clip_ratio_low")
    high = cfg(config, "clip_ratio_high")
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    if low is None or high is None:
        raise ValueError(
            "config must set clip_ratio, or both clip_ratio_low and clip_ratio_high "
            f"(got clip_ratio={clip_ratio!r}, clip_ratio_low={low!r}, clip_ratio_high={high!r})"
        )
    return low, high


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = cfg(config, "global_batch_info") or {}
    unknown = set(info) - set(_GLOBAL_BATCH_KEYS)
    if unknown:
        # verl's own losses pass global_batch_info to agg_loss(**info): unknown keys would fail there too
        raise ValueError(f"config.global_batch_info has unknown key(s) {sorted(unknown)}; known: {_GLOBAL_BATCH_KEYS}")
    return {k: info[k] for k in _GLOBAL_BATCH_KEYS if k in info}


def make_policy_loss(objective: str = "cfpo", ratio_level: str = "token", name: str | None = None) -> Callable:
    """Build a loss function with verl's PolicyLossFn signature around ``cfpo_loss.compute_policy_loss``.

    ``objective`` "cfpo" or "clip" (the latter, with dual_clip = config.clip_ratio_c, is the PPO/GRPO
    clip objective, which equals verl's ``vanilla`` loss). ``ratio_level`` "token" or "sequence" (GSPO
    ratio). The returned function is not registered.
    """
    from cfpo_loss import compute_policy_loss, get_objective  # the math lives once, in the core

    record = get_objective(objective)  # an unknown name raises here, when the loss is built
    loss_name = name or objective

    def policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights=None,
    ):
        if config is None:
            raise ValueError(f"policy loss {policy_loss.__name__!r}: config (verl ActorConfig) is required")
        _check_agg(loss_agg_mode)
        eps_low, eps_high = _eps(config)
        dual_clip = cfg(config, "clip_ratio_c", 3.0) if record.takes_dual_clip else None
        rollout_metrics: dict[str, float] = {}
        correction = bypass_correction(config)
        if correction is not None:  # old_log_prob is pi_rollout: verl's bypass-mode rejection mask and metrics
            response_mask, rollout_metrics = bypass_mask(loss_name, correction, log_prob, old_log_prob, response_mask)
            rollout_is_weights = None  # as verl's ppo_clip bypass: the ratio already is pi_theta / pi_rollout
        out = compute_policy_loss(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            objective=objective,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            agg=loss_agg_mode,
            ratio_level=ratio_level,
            weights=rollout_is_weights,
            **_global_batch_info(config),
        )
        return out.loss, {**_verl_metrics(out), **rollout_metrics}

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_name}"
    policy_loss.__module__ = PLUGIN_MODULE  # where users and verl's registry find it (and what is ours is checked by)
    policy_loss.__doc__ = (
        f"verl policy loss {loss_name!r}: cfpo_loss.compute_policy_loss(objective={objective!r}, "
        f"ratio_level={ratio_level!r}) with verl's signature, eps, loss_agg_mode, global_batch_info, "
        "rollout_is_weights, bypass-mode rejection mask and metric keys."
    )
    setattr(policy_loss, MARK, (objective, ratio_level))
    return policy_loss


def _check_agg(loss_agg_mode: str) -> None:
    if loss_agg_mode == "token-sum" and not _verl_has_token_sum():
        raise ValueError(
            f"loss_agg_mode='token-sum' is not an aggregation of verl {verl_version()} (its agg_loss raises "
            "'Invalid loss_agg_mode'; verl added it in 0.9.0). Use token-mean, seq-mean-token-sum, "
            "seq-mean-token-mean or seq-mean-token-sum-norm."
        )


def _verl_metrics(out) -> dict[str, float]:
    """verl's own keys (0.0 for one the objective does not compute: cfpo has no dual clip), then every core metric.

    Floats already on the host: the loss's one device sync (its finite check) brought them along (verl's own losses
    call .item() on each)."""
    values = out.metric_floats()
    metrics = {key: values.get(name, 0.0) for name, key in _VERL_KEYS.items()}
    metrics.update({f"{_EVERY_CORE_METRIC}{k}": v for k, v in values.items()})
    return metrics


def _verl_has_token_sum() -> bool:
    """verl's agg_loss knows "token-sum" from 0.9.0 on (0.8.0's raises 'Invalid loss_agg_mode')."""
    from .._support import version_key

    version = verl_version()
    return version is None or version_key(version) >= (0, 9, 0)


compute_policy_loss_cfpo = make_policy_loss("cfpo", "token", name="cfpo")
compute_policy_loss_cfpo_seq = make_policy_loss("cfpo", "sequence", name="cfpo_seq")
LOSSES = {"cfpo": compute_policy_loss_cfpo, "cfpo_seq": compute_policy_loss_cfpo_seq}
