"""SkyRL's policy-loss signature around the core: SkyRL's tensors and ``trainer.algorithm`` config in, the core's
loss and metrics out, under SkyRL's names.

SkyRL calls a registered loss as ``fn(log_probs, old_log_probs, advantages, config, loss_mask=None,
rollout_logprobs=None) -> (loss, metrics)`` and expects a masked *sum*: its trainer has already scaled the
advantages so that the sum is the ``loss_reduction`` asked for (``apply_loss_reduction_to_advantages_minibatch``).
The CFPO objective is linear in A (r·cA − |cA|/(2ε)·(r−1)² = c·J for c > 0), so the same scaled advantages give
every reduction for CFPO too: the core aggregates with "token-sum".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..._checks import check_eps
from .._metric_names import EVERY_CORE_METRIC, framework_keys

__all__ = ["LOSSES", "check_options", "compute_policy_loss_cfpo", "compute_policy_loss_cfpo_seq", "make_policy_loss"]

#: attribute set on the loss functions built here (how registration tells ours from another package's)
MARK = "__cfpo_loss_skyrl__"
#: the names SkyRL's ``trainer.algorithm.<name>`` options are spelled with in errors
_EPS_NAMES = ("trainer.algorithm.eps_clip_low", "trainer.algorithm.eps_clip_high")
#: SkyRL options of its clipped losses that mean nothing to CFPO: refused when set away from SkyRL's default
NO_CFPO_MEANING = {
    "clip_ratio_c": "the dual-clip bound of SkyRL's policy_loss_type=dual_clip; CFPO clips nothing, so no bound "
    "applies to it",
}
#: core metric -> SkyRL's key (``clip_ratio``), and the prefix under which every core metric is logged as well
_SKYRL_KEYS = framework_keys("skyrl")
_EVERY_CORE_METRIC = EVERY_CORE_METRIC["skyrl"]


def check_options(config: Any, loss_name: str) -> None:
    """Refuse, by name, a SkyRL option that would be silently ignored: each of ``NO_CFPO_MEANING`` must hold
    SkyRL's own default (``AlgorithmConfig``'s field default)."""
    fields = {f.name: f for f in dataclasses.fields(type(config))} if dataclasses.is_dataclass(config) else {}
    for option, meaning in NO_CFPO_MEANING.items():
        field = fields.get(option)
        if field is None or field.default is dataclasses.MISSING:
            continue
        value = getattr(config, option)
        if value != field.default:
            raise ValueError(
                f"policy_loss_type={loss_name}: trainer.algorithm.{option}={value!r} has no meaning here ({meaning}); "
                f"remove the override (SkyRL's default is {field.default!r})"
            )


def _check_shapes(log_probs: Tensor, old_log_probs: Tensor, rollout_logprobs: Tensor | None) -> None:
    """SkyRL's off-policy correction runs before the core's own checks and would broadcast a mismatched shape
    silently: the log-probs it reads must have the shape of ``log_probs``."""
    for name, t in (("old_log_probs", old_log_probs), ("rollout_logprobs", rollout_logprobs)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != log_probs.shape):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have the shape of log_probs {tuple(log_probs.shape)}, got {shape}")


def off_policy_weights(
    old_log_probs: Tensor, rollout_logprobs: Tensor | None, loss_mask: Tensor, correction: Any
) -> tuple[Tensor | None, dict[str, float]]:
    """SkyRL's own off-policy correction (``compute_off_policy_correction``: truncated IS weights π_old/π_rollout,
    outlier / token / sequence rejection) as one per-token weight: the IS weight times the rejection mask, which
    is what SkyRL's clipped loss multiplies onto its per-token loss and mask. None when nothing applies."""
    if rollout_logprobs is None:
        return None, {}
    from skyrl.backends.skyrl_train.utils.off_policy_correction_utils import compute_off_policy_correction

    tis_ratio, metrics, kept = compute_off_policy_correction(old_log_probs, rollout_logprobs, loss_mask, correction)
    if tis_ratio is None and kept is loss_mask:
        return None, metrics
    weights = kept if tis_ratio is None else tis_ratio * kept  # kept is 0/1: the product is tis or 0, exactly
    return weights.expand(loss_mask.shape), metrics


def skyrl_metrics(values: dict[str, float]) -> dict[str, float]:
    """The core's metrics under SkyRL's key where it has one (``clip_ratio``), and each as ``cfpo/<core name>``.
    SkyRL's worker reduces keys ending in ``_min`` / ``_max`` with min / max and the rest by mean."""
    metrics = {key: values[name] for name, key in _SKYRL_KEYS.items() if name in values}
    metrics.update({f"{_EVERY_CORE_METRIC}{k}": v for k, v in values.items()})
    return metrics


def make_policy_loss(objective: str = "cfpo", ratio_level: str = "token", name: str | None = None) -> Callable:
    """A loss with SkyRL's policy-loss signature around ``cfpo_loss.compute_policy_loss``; not registered.

    ``objective`` "cfpo", or "clip" (SkyRL's ``regular`` PPO loss through the same path: the tests hold it to
    SkyRL's own ``ppo_policy_loss``); ``ratio_level`` "token", or "sequence" (exp(mean_t log r) per sequence).
    """
    from ... import compute_policy_loss, get_objective  # the math lives once, in the core

    get_objective(objective)  # an unknown name fails here, when the loss is built
    loss_name = name or objective

    def policy_loss(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_logprobs=None):
        eps_low, eps_high = check_eps(config.eps_clip_low, config.eps_clip_high, names=_EPS_NAMES)
        if objective == "cfpo":
            check_options(config, loss_name)
        _check_shapes(log_probs, old_log_probs, rollout_logprobs)
        mask = loss_mask if loss_mask is not None else log_probs.new_ones(log_probs.shape)
        weights, correction_metrics = off_policy_weights(
            old_log_probs, rollout_logprobs, mask, config.off_policy_correction
        )
        out = compute_policy_loss(
            log_probs,
            old_log_probs,
            advantages,
            mask,
            objective=objective,
            eps_low=eps_low,
            eps_high=eps_high,
            agg="token-sum",  # SkyRL's reductions are in the advantages already (module docstring)
            ratio_level=ratio_level,
            weights=weights,
        )
        # floats already on the host: the core's one device sync brought them (SkyRL's own losses call .item())
        return out.loss, {**skyrl_metrics(out.metric_floats()), **correction_metrics}

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_name}"
    policy_loss.__doc__ = (
        f"SkyRL policy loss {loss_name!r}: cfpo_loss.compute_policy_loss(objective={objective!r}, "
        f"ratio_level={ratio_level!r}) on SkyRL's pre-scaled advantages, eps_clip_low / eps_clip_high, "
        "off-policy correction and metric keys."
    )
    setattr(policy_loss, MARK, (objective, ratio_level))
    return policy_loss


# module-level names equal to each function's __qualname__: cloudpickle (SkyRL's registry sync) sends them to the
# Ray workers by reference, and a worker imports this module to resolve them
compute_policy_loss_cfpo = make_policy_loss("cfpo", "token", name="cfpo")
compute_policy_loss_cfpo_seq = make_policy_loss("cfpo", "sequence", name="cfpo_seq")
#: trainer.algorithm.policy_loss_type -> loss (never a bare "spo")
LOSSES = {"cfpo": compute_policy_loss_cfpo, "cfpo_seq": compute_policy_loss_cfpo_seq}
