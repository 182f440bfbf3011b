"""verl plugin: registers the ``cfpo`` and ``cfpo_seq`` policy losses in verl's POLICY_LOSS_REGISTRY.

Select the loss with::

    actor_rollout_ref.actor.policy_loss.loss_mode=cfpo        # token-level ratio
    actor_rollout_ref.actor.policy_loss.loss_mode=cfpo_seq    # GSPO sequence-level ratio

How verl finds this module (``python -m cfpo_loss`` says which mechanism is active):

* **verl 0.9.x**: nothing to do. ``pip install cfpo-loss`` declares this module under the entry-point
  group ``verl.plugins``; ``import verl`` loads every entry point of that group (``verl/__init__.py``,
  governed by ``VERL_USE_EXTERNAL_PLUGINS``: "auto" by default, "none" disables, or a comma list of
  entry-point names such as "cfpo_loss"), in the driver and in every Ray worker.
* **verl 0.8.0** has no entry-point group; its ``import verl`` imports the modules listed in
  ``VERL_USE_EXTERNAL_MODULES``. The one switch is that variable, set for every Ray worker through Ray's
  job-level ``runtime_env`` (which verl's ``main_ppo`` builds from ``ray_kwargs.ray_init``; Ray merges it
  into the per-worker ``env_vars`` verl's worker groups add)::

      +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=cfpo_loss.adapters.verl

  (``HYDRA_OVERRIDE`` below). Exporting ``VERL_USE_EXTERNAL_MODULES=cfpo_loss.adapters.verl`` in the
  launching shell as well registers the losses in the driver too (what ``python -m cfpo_loss`` checks);
  on its own it reaches only the workers of a Ray cluster that the driver starts itself.

The loss functions only translate between verl and the core (``cfpo_loss.compute_policy_loss``):

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

Off-policy (rollout-correction) modes, verl 0.8.0 - 0.9.1:

* Bypass mode, ``algorithm.rollout_correction.bypass_mode=True`` (the default of the fully-async and one-step-off
  recipes, ``verl/experimental/...``): the trainer uses the rollout log-probs as old log-probs, so the ratio is
  pi_theta / pi_rollout. verl's ``rollout_corr_helper.apply_bypass_mode`` also sets ``policy_loss.loss_mode`` to
  "bypass_mode" (PPO-clip or REINFORCE, with a rejection mask) - but only in the trainer's own config: each Ray
  worker built its loss from its own copy of the config when it started (engine_workers.py, ``init_model``), so
  the workers run the loss_mode the user chose, without the rejection mask, whose settings they never see (verl
  issues #4912, #4272; the 0.9.x v1 trainer does not call apply_bypass_mode at all). This plugin therefore:

  - at config time (``prepare_config``, run by its wrapper of ``verl.utils.device.auto_set_device``, which every
    PPO entry point calls on the composed config before Ray starts): for loss_mode cfpo / cfpo_seq only, refuses
    ``rollout_correction.loss_type="reinforce"`` by name and copies ``algorithm.rollout_correction`` to
    ``actor_rollout_ref.actor.policy_loss.rollout_correction`` (verl's own field, which its bypass loss reads);
  - in the workers, the CFPO loss reads that field: verl's ``compute_rollout_correction_and_rejection_mask``
    (current policy against pi_rollout, no gradient) masks the rejected tokens and its ``rollout_corr/*``
    metrics are logged, as verl's ppo_clip bypass loss does; no IS weight is applied (the ratio already is
    pi_theta / pi_rollout);
  - in the trainer (wrapper of ``apply_bypass_mode``): keeps ``loss_mode`` cfpo / cfpo_seq in the trainer's config
    (what the workers run), and refuses, before the first actor update, a bypass run with ``rollout_rs`` whose
    workers' config was not prepared (a custom entry point: call ``prepare_config(config)`` yourself).

  For every other loss_mode both wrappers call verl's function with the same arguments and change nothing.
  On verl 0.8.0 the launching process needs ``VERL_USE_EXTERNAL_MODULES=cfpo_loss.adapters.verl`` exported too,
  or the config step does not run there (the trainer-side refusal still does, through HYDRA_OVERRIDE).
* Decoupled mode (bypass_mode=False, ``rollout_is`` / ``rollout_rs``): the trainer recomputes pi_old, computes IS
  weights and the rejection mask once per batch and puts them in the batch; verl's ``ppo_loss`` passes
  ``rollout_is_weights`` to cfpo, which multiplies its per-token loss by them (three policies, as for vanilla).

If registration fails (e.g. an incompatible verl), a RuntimeWarning naming the cause is emitted and
logged at WARNING level - verl itself only logs plugin import errors at DEBUG, which would leave a
user with a bare "Unsupported loss mode: cfpo". A verl outside the supported range gets a
RuntimeWarning naming the range. ``plugin_status()`` (used by ``python -m cfpo_loss``) reports whether
a bare ``import verl`` registers the losses, and through which mechanism.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from ._metric_names import EVERY_CORE_METRIC, framework_keys

__all__ = [
    "LOSS_NAMES",
    "ENTRY_POINT_NAME",
    "make_policy_loss",
    "compute_policy_loss_cfpo",
    "compute_policy_loss_cfpo_seq",
    "register",
    "registration_error",
    "plugin_status",
    "loading_mechanism",
    "verl_loads_entry_points",
    "EXTERNAL_MODULES_ENV",
    "HYDRA_OVERRIDE",
    "BYPASS_SWITCH",
    "WORKER_CORRECTION_KEY",
    "bypass_correction",
    "prepare_config",
    "install_hooks",
]

_LOG = logging.getLogger(__name__)

#: the names this plugin registers (never a bare "spo": in verl that is Single-stream Policy Optimization)
LOSS_NAMES = ("cfpo", "cfpo_seq")
#: name of our entry point in the ``verl.plugins`` group (what VERL_USE_EXTERNAL_PLUGINS filters on)
ENTRY_POINT_NAME = "cfpo_loss"
ENTRY_POINT_GROUP = "verl.plugins"
#: verl's own import hook (every verl version): ``import verl`` imports the comma-separated modules listed here
EXTERNAL_MODULES_ENV = "VERL_USE_EXTERNAL_MODULES"
#: the verl 0.8.0 switch: this module in every Ray worker's VERL_USE_EXTERNAL_MODULES, via verl's ray_init
HYDRA_OVERRIDE = f"+ray_kwargs.ray_init.runtime_env.env_vars.{EXTERNAL_MODULES_ENV}={__name__}"

#: attribute set on our loss functions, so re-registration can tell ours from someone else's
_MARK = "__cfpo_loss_plugin__"
_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
#: core metric -> verl's key (actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower), and the prefix of the rest
_VERL_KEYS = framework_keys("verl")
_EVERY_CORE_METRIC = EVERY_CORE_METRIC["verl"]

_state: dict[str, Any] = {"error": None}


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from an ActorConfig (dataclass) or a DictConfig / dict alike."""
    if isinstance(config, dict):
        return config.get(name, default)
    try:
        return getattr(config, name)
    except (AttributeError, KeyError):
        getter = getattr(config, "get", None)
        return getter(name, default) if callable(getter) else default


def _eps(config: Any) -> tuple[float, float]:
    clip_ratio = _cfg(config, "clip_ratio")
    low = _cfg(config, "clip_ratio_low")
    high = _cfg(config, "clip_ratio_high")
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    if low is None or high is None:
        raise ValueError(
            "config must set clip_ratio, or both clip_ratio_low and clip_ratio_high "
            f"(got clip_ratio={clip_ratio!r}, clip_ratio_low={low!r}, clip_ratio_high={high!r})"
        )
    return low, high


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = _cfg(config, "global_batch_info") or {}
    unknown = set(info) - set(_GLOBAL_BATCH_KEYS)
    if unknown:
        # verl's own losses pass global_batch_info to agg_loss(**info): unknown keys would fail there too
        raise ValueError(f"config.global_batch_info has unknown key(s) {sorted(unknown)}; known: {_GLOBAL_BATCH_KEYS}")
    return {k: info[k] for k in _GLOBAL_BATCH_KEYS if k in info}


def make_policy_loss(objective: str = "cfpo", ratio_level: str = "token", name: str | None = None) -> Callable:
    """Build a loss function with verl's PolicyLossFn signature around ``cfpo_loss.compute_policy_loss``.

    ``objective`` "cfpo" or "clip" (the latter, with dual_clip = config.clip_ratio_c, is the PPO/GRPO
    clip objective: the tests use it to prove this path equals verl's ``vanilla`` loss).
    ``ratio_level`` "token" or "sequence" (GSPO ratio). The returned function is not registered.
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
        if loss_agg_mode == "token-sum" and not _verl_has_token_sum():
            raise ValueError(
                f"loss_agg_mode='token-sum' is not an aggregation of verl {_verl_version()} (its agg_loss raises "
                "'Invalid loss_agg_mode'; verl added it in 0.9.0). Use token-mean, seq-mean-token-sum, "
                "seq-mean-token-mean or seq-mean-token-sum-norm."
            )
        eps_low, eps_high = _eps(config)
        dual_clip = _cfg(config, "clip_ratio_c", 3.0) if record.takes_dual_clip else None
        rollout_metrics: dict[str, float] = {}
        correction = bypass_correction(config)
        if correction is not None:  # old_log_prob is pi_rollout: verl's bypass-mode rejection mask and metrics
            response_mask, rollout_metrics = _bypass_mask(loss_name, correction, log_prob, old_log_prob, response_mask)
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
        # floats already on the host: the loss's one device sync (its finite check) brought them along
        # (verl's own losses call .item() on each)
        values = out.metric_floats()
        # verl's own keys (0.0 for one the objective does not compute: cfpo has no dual clip), then every core metric
        metrics = {key: values.get(name, 0.0) for name, key in _VERL_KEYS.items()}
        metrics.update({f"{_EVERY_CORE_METRIC}{k}": v for k, v in values.items()})
        metrics.update(rollout_metrics)
        return out.loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_name}"
    policy_loss.__doc__ = (
        f"verl policy loss {loss_name!r}: cfpo_loss.compute_policy_loss(objective={objective!r}, "
        f"ratio_level={ratio_level!r}) with verl's signature, eps, loss_agg_mode, global_batch_info, "
        "rollout_is_weights, bypass-mode rejection mask and metric keys."
    )
    setattr(policy_loss, _MARK, (objective, ratio_level))
    return policy_loss


def _verl_version() -> str | None:
    try:
        return importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return None


def _verl_has_token_sum() -> bool:
    """verl's agg_loss knows "token-sum" from 0.9.0 on (0.8.0's raises 'Invalid loss_agg_mode')."""
    from ._support import version_key

    version = _verl_version()
    return version is None or version_key(version) >= (0, 9, 0)


compute_policy_loss_cfpo = make_policy_loss("cfpo", "token", name="cfpo")
compute_policy_loss_cfpo_seq = make_policy_loss("cfpo", "sequence", name="cfpo_seq")
_LOSSES = {"cfpo": compute_policy_loss_cfpo, "cfpo_seq": compute_policy_loss_cfpo_seq}


# ------------------------------------------------------------------------ rollout-correction modes
#: verl's switch that makes the trainer use the rollout log-probs as old log-probs (two policies, no old-log-prob pass)
BYPASS_SWITCH = "algorithm.rollout_correction.bypass_mode"
#: where the workers' own copy of the config carries the rollout-correction settings (verl's PolicyLossConfig field,
#: the one verl's ``bypass_mode`` loss reads); ``prepare_config`` fills it for cfpo / cfpo_seq
WORKER_CORRECTION_KEY = "actor_rollout_ref.actor.policy_loss.rollout_correction"


def bypass_correction(config: Any) -> Any | None:
    """The rollout-correction settings a loss runs under in bypass mode, read from the actor config the worker
    holds (``config.policy_loss.rollout_correction``, the field verl's own ``bypass_mode`` loss reads), or None
    when that config is not in bypass mode (verl's default ``RolloutCorrectionConfig`` has bypass_mode=False)."""
    policy_loss = _cfg(config, "policy_loss")
    correction = None if policy_loss is None else _cfg(policy_loss, "rollout_correction")
    if correction is None or not _cfg(correction, "bypass_mode", False):
        return None
    return correction


def _check_bypass(loss_mode: str, correction: Any) -> None:
    loss_type = _cfg(correction, "loss_type", "ppo_clip")
    if loss_type != "ppo_clip":
        raise ValueError(
            f"loss_mode={loss_mode} cannot run with algorithm.rollout_correction.loss_type={loss_type!r} in bypass "
            f"mode ({BYPASS_SWITCH}=True): verl's loss_type 'reinforce' replaces the policy loss by an IS-weighted "
            "REINFORCE objective, which has no CFPO form. Use algorithm.rollout_correction.loss_type=ppo_clip "
            "(the bypass objective is then CFPO on the ratio pi_theta / pi_rollout, with verl's rejection mask), "
            f"or a loss_mode other than {' / '.join(LOSS_NAMES)}."
        )


def _bypass_mask(loss_mode: str, correction: Any, log_prob, rollout_log_prob, response_mask):
    """verl's bypass-mode rejection mask and ``rollout_corr/*`` metrics, computed as verl's
    ``compute_policy_loss_bypass_mode`` computes them (current policy against the rollout policy, no gradient)."""
    import torch
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    _check_bypass(loss_mode, correction)
    with torch.no_grad():  # (verl's masked sums already ignore NaN / inf in padding, on 0.8.0 - 0.9.1)
        _, mask, metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob,
            rollout_log_prob=rollout_log_prob,
            response_mask=response_mask,
            rollout_is=_cfg(correction, "rollout_is"),
            rollout_is_threshold=_cfg(correction, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=_cfg(correction, "rollout_is_batch_normalize", False),
            rollout_rs=_cfg(correction, "rollout_rs"),
            rollout_rs_threshold=_cfg(correction, "rollout_rs_threshold"),
        )
    return mask, metrics


def _select(config: Any, path: str) -> Any:
    for key in path.split("."):
        if config is None:
            return None
        config = _cfg(config, key)
    return config


def _plain(node: Any) -> dict:
    """A rollout-correction config (DictConfig, dataclass or dict) as a plain dict, without Hydra's ``_target_``."""
    import dataclasses

    if dataclasses.is_dataclass(node):
        node = dataclasses.asdict(node)
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(node, DictConfig):
                node = OmegaConf.to_container(node, resolve=True)
        except ImportError:  # pragma: no cover - verl always brings omegaconf
            pass
    return {k: v for k, v in dict(node).items() if not str(k).startswith("_")}


def _set(node: Any, key: str, value: Any) -> None:
    try:
        from omegaconf import DictConfig, open_dict
    except ImportError:  # pragma: no cover
        DictConfig = ()
    if isinstance(node, DictConfig):
        with open_dict(node):
            node[key] = value
    else:
        node[key] = value


def prepare_config(config: Any) -> None:
    """Make a composed verl config run CFPO soundly in rollout-correction bypass mode; a no-op for any other
    config. Called by this plugin on verl's ``auto_set_device(config)`` (see ``install_hooks``); a custom entry
    point calls it itself, on the whole config, before its workers are built.

    For ``loss_mode`` cfpo / cfpo_seq with ``algorithm.rollout_correction.bypass_mode=True``:

    * ``loss_type`` other than "ppo_clip" (verl's "reinforce") is refused by name (ValueError);
    * ``algorithm.rollout_correction`` is copied to ``actor_rollout_ref.actor.policy_loss.rollout_correction``,
      the copy that reaches the workers (each worker builds its loss from its own copy of the config, made when
      the workers start): there the CFPO loss applies verl's rejection mask (``rollout_rs``) and logs verl's
      ``rollout_corr/*`` metrics, as verl's ppo_clip bypass loss would. A different value already there is
      refused, never overwritten. The logged config then shows what the workers run.
    """
    policy_loss = _select(config, "actor_rollout_ref.actor.policy_loss")
    loss_mode = None if policy_loss is None else _cfg(policy_loss, "loss_mode")
    if loss_mode not in LOSS_NAMES:
        return
    correction = _select(config, "algorithm.rollout_correction")
    if correction is None or not _cfg(correction, "bypass_mode", False):
        return
    _check_bypass(loss_mode, correction)
    wanted = _plain(correction)
    current = _cfg(policy_loss, "rollout_correction")
    if current is not None:
        if _plain(current) != wanted:
            raise ValueError(
                f"loss_mode={loss_mode} with {BYPASS_SWITCH}=True: {WORKER_CORRECTION_KEY}={_plain(current)} differs "
                f"from algorithm.rollout_correction={wanted}; the workers would run one and the trainer the other. "
                f"Remove {WORKER_CORRECTION_KEY} (cfpo_loss copies algorithm.rollout_correction there)."
            )
        return
    _set(policy_loss, "rollout_correction", wanted)
    _LOG.info("cfpo_loss: %s=True with loss_mode=%s: copied algorithm.rollout_correction to %s (%s)",
              BYPASS_SWITCH, loss_mode, WORKER_CORRECTION_KEY, wanted)  # fmt: skip


def _unprepared(loss_mode: str, correction: Any) -> None:
    fix = (
        "cfpo_loss copies it there when verl's entry point (main_ppo, one-step-off, fully-async) calls "
        "verl.utils.device.auto_set_device(config) in the launching process; this run's launcher did not go "
        "through it (a custom entry point, or verl 0.8.0 without "
        f"{EXTERNAL_MODULES_ENV}={__name__} exported in the launching shell). "
        "Call cfpo_loss.adapters.verl.prepare_config(config) before the workers are built."
    )
    if _cfg(correction, "rollout_rs") is not None:
        raise ValueError(
            f"loss_mode={loss_mode} with {BYPASS_SWITCH}=True and rollout_rs={_cfg(correction, 'rollout_rs')!r}: "
            f"the workers' config has no {WORKER_CORRECTION_KEY}, so their CFPO loss cannot apply verl's rejection "
            f"mask. {fix}"
        )
    if not _state.get("warned_unprepared"):
        _state["warned_unprepared"] = True
        msg = (
            f"cfpo_loss: loss_mode={loss_mode} with {BYPASS_SWITCH}=True runs CFPO on pi_theta / pi_rollout, but the "
            f"workers' config has no {WORKER_CORRECTION_KEY}, so verl's rollout_corr/* metrics are not logged. {fix}"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        _LOG.warning(msg)


def _wrap_apply_bypass_mode(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def apply_bypass_mode(*args, **kwargs):
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:  # not a call this wrapper knows: verl's function answers it
            return original(*args, **kwargs)
        policy_loss = arguments.get("policy_loss_config")
        loss_mode = None if policy_loss is None else _cfg(policy_loss, "loss_mode")
        if loss_mode not in LOSS_NAMES:
            return original(*args, **kwargs)  # every other loss: verl's function, untouched
        correction = arguments.get("rollout_corr_config")
        _check_bypass(loss_mode, correction)
        prepared = _cfg(policy_loss, "rollout_correction")
        if prepared is None or correction is None or _plain(prepared) != _plain(correction):
            _unprepared(loss_mode, correction)
        result = original(*args, **kwargs)  # old_log_probs = rollout_log_probs; sets loss_mode="bypass_mode"
        # verl's loss_mode rewrite changes only this (trainer-side) copy; the workers run loss_mode=cfpo from their
        # own copy of the config, so say so here as well
        _set(policy_loss, "loss_mode", loss_mode)
        return result

    setattr(apply_bypass_mode, _MARK, "apply_bypass_mode")
    return apply_bypass_mode


def _wrap_auto_set_device(original: Callable) -> Callable:
    @functools.wraps(original)
    def auto_set_device(config, *args, **kwargs):
        result = original(config, *args, **kwargs)
        prepare_config(config)
        return result

    setattr(auto_set_device, _MARK, "auto_set_device")
    return auto_set_device


def install_hooks() -> tuple[str, ...]:
    """Wrap the two verl functions through which bypass mode reaches cfpo (idempotent; returns their names).

    * ``verl.utils.device.auto_set_device``: the one verl function every PPO entry point (``main_ppo``,
      ``main_ppo_sync``, ``one_step_off_policy.main_ppo``, ``fully_async_policy.fully_async_main``; verl 0.8.0 -
      0.9.1) calls on the composed config in the launching process, before Ray and before any worker copies the
      config. The wrapper calls verl's, then ``prepare_config`` (a no-op unless loss_mode is cfpo / cfpo_seq).
    * ``verl.trainer.ppo.rollout_corr_helper.apply_bypass_mode`` (imported by its callers at call time): for
      cfpo / cfpo_seq, refuses what the workers cannot honour and keeps the trainer's loss_mode what the workers
      run; for every other loss mode it calls verl's function with the same arguments and returns its result.
    """
    from verl.trainer.ppo import rollout_corr_helper
    from verl.utils import device

    done = []
    for module, name, wrap in (
        (device, "auto_set_device", _wrap_auto_set_device),
        (rollout_corr_helper, "apply_bypass_mode", _wrap_apply_bypass_mode),
    ):
        current = getattr(module, name)
        if not _is_ours(current):
            setattr(module, name, wrap(current))
        done.append(f"{module.__name__}.{name}")
    return tuple(done)


def _is_ours(fn: Any) -> bool:
    return getattr(fn, _MARK, None) is not None


def register(*, override: bool = False) -> tuple[str, ...]:
    """Register ``cfpo`` and ``cfpo_seq`` with verl's ``register_policy_loss``. Idempotent.

    A name already held by a loss from another package is left alone (with a warning) unless
    ``override``. Returns the names that now map to our losses. Raises if verl cannot be imported or
    lacks the registry (the module-level call turns that into a loud warning).
    """
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    done = []
    for name, fn in _LOSSES.items():
        existing = POLICY_LOSS_REGISTRY.get(name)
        if existing is fn:
            done.append(name)
            continue
        if existing is not None and not _is_ours(existing) and not override:
            msg = (
                f"cfpo_loss: verl policy loss {name!r} is already registered by "
                f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', existing)!s}; "
                f"leaving it in place (loss_mode={name} will NOT be CFPO). "
                "Call cfpo_loss.adapters.verl.register(override=True) to replace it."
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            _LOG.warning(msg)
            continue
        register_policy_loss(name)(fn)
        done.append(name)
    return tuple(done)


def registration_error() -> str | None:
    """The cause recorded when the import-time registration failed, else None."""
    return _state["error"]


def _register_at_import() -> None:
    from ._support import supported_range, tested_versions, warn_if_unsupported

    consequence = f"registering {LOSS_NAMES} anyway, but its loss signature and agg_loss are not known to match."
    warn_if_unsupported("verl", _verl_version(), consequence, logger=_LOG)
    try:
        register()
        _state["error"] = None
    except Exception as exc:  # noqa: BLE001 - must never break `import verl`; report loudly instead
        _state["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        msg = (
            f"cfpo_loss: could not register the verl policy losses {LOSS_NAMES} "
            f"(loss_mode=cfpo will fail with 'Unsupported loss mode'): {_state['error']}. "
            f"The adapter supports verl{supported_range('verl')} (tested: {tested_versions('verl')}); "
            "run `python -m cfpo_loss` for a diagnosis."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        _LOG.warning(msg)
        return
    try:
        install_hooks()
    except Exception as exc:  # noqa: BLE001 - must never break `import verl`; report loudly instead
        cause = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        msg = (
            f"cfpo_loss: could not install the rollout-correction hooks ({cause}); loss_mode=cfpo works, but with "
            f"{BYPASS_SWITCH}=True verl's rejection mask (rollout_rs) will not reach the CFPO loss. "
            f"The adapter supports verl{supported_range('verl')} (tested: {tested_versions('verl')})."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        _LOG.warning(msg)


# ----------------------------------------------------------------------------------------- status
_PROBE = r"""
import json, sys
out = {}
try:
    import verl
    out["verl_version"] = getattr(verl, "__version__", "?")
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
    out["registered"] = {n: (getattr(POLICY_LOSS_REGISTRY.get(n), "__module__", None)) for n in %r}
    mod = sys.modules.get("cfpo_loss.adapters.verl")
    out["error"] = mod.registration_error() if mod is not None else None
except Exception as e:
    out["exception"] = "%%s: %%s" %% (type(e).__name__, e)
print("CFPO_PROBE " + json.dumps(out))
""" % (LOSS_NAMES,)  # noqa: UP031 - a %-template: the probe's own % are escaped above


def _entry_points() -> list:
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10 API, kept for completeness
        eps = importlib.metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return [ep for ep in eps if ep.value.split(":")[0] == __name__]


def verl_loads_entry_points() -> bool | None:
    """Does the installed verl's ``import verl`` load the ``verl.plugins`` entry-point group (verl >= 0.9.0)?

    Read from ``verl/__init__.py`` without importing verl; None when verl is not installed.
    """
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return f'"{ENTRY_POINT_GROUP}"' in f.read()
    except OSError:  # no source: fall back to the release that added it
        from ._support import version_key

        version = _verl_version()
        return version is not None and version_key(version) >= (0, 9, 0)


def _external_modules_lists_us(environ=None) -> bool:
    value = (environ if environ is not None else os.environ).get(EXTERNAL_MODULES_ENV, "")
    return __name__ in {m.strip() for m in value.split(",")}


def loading_mechanism(environ=None) -> str:
    """How a bare ``import verl`` reaches this module here: "entry point", "VERL_USE_EXTERNAL_MODULES", or
    "none" (the mechanism that applies, given the installed verl and ``environ``, default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    policy = environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    by_entry_point = (
        verl_loads_entry_points()
        and bool(_entry_points())
        and policy != "none"
        and (policy == "auto" or ENTRY_POINT_NAME in {p.strip() for p in policy.split(",")})
    )
    if by_entry_point:
        return "entry point"
    if _external_modules_lists_us(environ):
        return EXTERNAL_MODULES_ENV
    return "none"


def plugin_status(fresh_process: bool = True, timeout: float = 300.0) -> str:
    """One human-readable paragraph: is the verl plugin installed, does it register, through what?

    With ``fresh_process`` (default) the decisive check runs what a user's Ray worker runs: a new
    Python process (this environment) that does a bare ``import verl`` (never importing cfpo_loss
    itself) and looks up ``cfpo`` / ``cfpo_seq`` in POLICY_LOSS_REGISTRY (about 15 s: importing verl is
    slow). Otherwise the check runs in this process (where importing this module has already registered
    the losses).
    """
    from ._support import is_supported, supported_range, tested_versions

    verl_version = _verl_version()
    if verl_version is None:
        return "verl is not installed (pip install 'cfpo-loss[verl]' to use loss_mode=cfpo)"
    details = []
    if not is_supported("verl", verl_version):
        details.append(
            f"WARNING: verl {verl_version} is outside the supported range verl{supported_range('verl')} "
            f"(tested: {tested_versions('verl')})"
        )
    mechanism = loading_mechanism()
    has_group = verl_loads_entry_points()
    if has_group:
        eps = _entry_points()
        if eps:
            details.append(f"entry point: [{ENTRY_POINT_GROUP}] {eps[0].name} = {eps[0].value}")
        else:
            details.append(
                f"PROBLEM: no [{ENTRY_POINT_GROUP}] entry point for {__name__} in the installed metadata "
                "(install cfpo-loss with pip rather than putting src/ on PYTHONPATH, or set "
                f"{EXTERNAL_MODULES_ENV}={__name__})"
            )
        policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
        if policy == "none":
            details.append("PROBLEM: VERL_USE_EXTERNAL_PLUGINS=none disables all verl plugins")
        elif policy != "auto" and ENTRY_POINT_NAME not in {p.strip() for p in policy.split(",")}:
            details.append(f"PROBLEM: VERL_USE_EXTERNAL_PLUGINS={policy!r} does not list {ENTRY_POINT_NAME!r}")
        else:
            details.append(f"VERL_USE_EXTERNAL_PLUGINS={policy!r} lets verl load it")
    else:
        details.append(
            f"verl {verl_version} has no [{ENTRY_POINT_GROUP}] entry-point group: it loads this plugin only through "
            f"{EXTERNAL_MODULES_ENV}={__name__}"
        )
        if mechanism == "none":
            details.append(
                f"PROBLEM: {EXTERNAL_MODULES_ENV} does not list {__name__} in this shell. For training, pass "
                f"{HYDRA_OVERRIDE} to verl (reaches every Ray worker); export "
                f"{EXTERNAL_MODULES_ENV}={__name__} to register it in this process too"
            )
        else:
            details.append(
                f"Ray workers: pass {HYDRA_OVERRIDE} to verl's main_ppo (an exported variable reaches only a Ray "
                "cluster the driver starts itself)"
            )
    details.insert(0, f"mechanism: {mechanism}")

    probe = _probe_fresh_process(timeout) if fresh_process else _probe_here()
    if "exception" in probe:
        details.append(f"PROBLEM: {probe['exception']}")
    reg = probe.get("registered", {})
    for n in LOSS_NAMES:
        if reg.get(n) not in (None, __name__):
            details.append(f"PROBLEM: loss_mode={n} is held by {reg[n]}, not cfpo_loss")
    if probe.get("error"):
        details.append(f"cause: {probe['error']}")
    ok = [n for n in LOSS_NAMES if reg.get(n) == __name__]
    where = "a fresh process after a bare `import verl`" if fresh_process else "this process"
    if len(ok) == len(LOSS_NAMES):
        verdict = f"REGISTERED (loss_mode={' / '.join(ok)}) in {where}"
    else:
        missing = ", ".join(n for n in LOSS_NAMES if n not in ok)
        verdict = f"NOT REGISTERED ({missing}) in {where}"
    return "\n".join([verdict, *("  " + d for d in details)])


def _probe_here() -> dict:
    out: dict[str, Any] = {}
    try:
        import verl  # noqa: F401
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

        out["registered"] = {n: getattr(POLICY_LOSS_REGISTRY.get(n), "__module__", None) for n in LOSS_NAMES}
    except Exception as exc:  # noqa: BLE001
        out["exception"] = f"{type(exc).__name__}: {exc}"
    out["error"] = registration_error()
    return out


def _probe_fresh_process(timeout: float) -> dict:
    import json

    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired:
        return {"exception": f"`import verl` in a fresh process took longer than {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("CFPO_PROBE "):
            return json.loads(line[len("CFPO_PROBE ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"exception": f"probe process exited with {proc.returncode}: {' | '.join(tail)}"}


_register_at_import()
