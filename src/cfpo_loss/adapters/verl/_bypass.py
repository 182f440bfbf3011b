"""Rollout-correction bypass mode (``algorithm.rollout_correction.bypass_mode=True``) with loss_mode cfpo / cfpo_seq.

In bypass mode verl uses the rollout log-probs as old log-probs (the ratio is pi_theta / pi_rollout), and its
``rollout_corr_helper.apply_bypass_mode`` sets ``policy_loss.loss_mode`` to "bypass_mode" (PPO-clip or REINFORCE
with a rejection mask) - but only in the trainer's own config: each Ray worker built its loss from its own copy of
the config when it started (``engine_workers.py``, ``init_model``), so the workers run the loss_mode the user chose,
without the rejection mask, whose settings they never see (verl issues #4912, #4272; verl 0.9.x's v1 trainer does not
call apply_bypass_mode at all). So, for loss_mode cfpo / cfpo_seq only:

* at config time, ``prepare_config`` (run by our wrapper of ``verl.utils.device.auto_set_device``, which every PPO
  entry point calls on the composed config before Ray starts) refuses ``rollout_correction.loss_type="reinforce"``
  by name and copies ``algorithm.rollout_correction`` to ``actor_rollout_ref.actor.policy_loss.rollout_correction``
  (verl's own field, which its bypass loss reads, and which reaches the workers);
* in the workers, the CFPO loss reads that field (``bypass_correction``) and applies verl's
  ``compute_rollout_correction_and_rejection_mask`` (``bypass_mask``): the rejected tokens are masked and the
  ``rollout_corr/*`` metrics logged, as verl's ppo_clip bypass loss does; no IS weight (the ratio already is
  pi_theta / pi_rollout);
* in the trainer, our wrapper of ``apply_bypass_mode`` keeps ``loss_mode`` cfpo / cfpo_seq (what the workers run)
  and refuses, before the first actor update, a bypass run with ``rollout_rs`` whose workers' config was not
  prepared (a custom entry point must call ``prepare_config(config)`` itself).

For every other loss_mode both wrappers call verl's function with the same arguments and change nothing. Decoupled
mode (bypass_mode=False) needs none of this: verl passes ``rollout_is_weights`` to the loss.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from ._common import EXTERNAL_MODULES_ENV, LOG, LOSS_NAMES, MARK, PLUGIN_MODULE, cfg, is_ours, state

#: verl's switch that makes the trainer use the rollout log-probs as old log-probs (two policies, no old-log-prob pass)
BYPASS_SWITCH = "algorithm.rollout_correction.bypass_mode"
#: where the workers' own copy of the config carries the rollout-correction settings (verl's PolicyLossConfig field,
#: the one verl's ``bypass_mode`` loss reads); ``prepare_config`` fills it for cfpo / cfpo_seq
WORKER_CORRECTION_KEY = "actor_rollout_ref.actor.policy_loss.rollout_correction"


def bypass_correction(config: Any) -> Any | None:
    """The rollout-correction settings a loss runs under in bypass mode, read from the actor config the worker
    holds (``config.policy_loss.rollout_correction``, the field verl's own ``bypass_mode`` loss reads), or None
    when that config is not in bypass mode (verl's default ``RolloutCorrectionConfig`` has bypass_mode=False)."""
    policy_loss = cfg(config, "policy_loss")
    correction = None if policy_loss is None else cfg(policy_loss, "rollout_correction")
    if correction is None or not cfg(correction, "bypass_mode", False):
        return None
    return correction


def _check_bypass(loss_mode: str, correction: Any) -> None:
    loss_type = cfg(correction, "loss_type", "ppo_clip")
    if loss_type != "ppo_clip":
        raise ValueError(
            f"loss_mode={loss_mode} cannot run with algorithm.rollout_correction.loss_type={loss_type!r} in bypass "
            f"mode ({BYPASS_SWITCH}=True): verl's loss_type 'reinforce' replaces the policy loss by an IS-weighted "
            "REINFORCE objective, which has no CFPO form. Use algorithm.rollout_correction.loss_type=ppo_clip "
            "(the bypass objective is then CFPO on the ratio pi_theta / pi_rollout, with verl's rejection mask), "
            f"or a loss_mode other than {' / '.join(LOSS_NAMES)}."
        )


def bypass_mask(loss_mode: str, correction: Any, log_prob, rollout_log_prob, response_mask):
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
            rollout_is=cfg(correction, "rollout_is"),
            rollout_is_threshold=cfg(correction, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=cfg(correction, "rollout_is_batch_normalize", False),
            rollout_rs=cfg(correction, "rollout_rs"),
            rollout_rs_threshold=cfg(correction, "rollout_rs_threshold"),
        )
    return mask, metrics


def _select(config: Any, path: str) -> Any:
    for key in path.split("."):
        if config is None:
            return None
        config = cfg(config, key)
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
    loss_mode = None if policy_loss is None else cfg(policy_loss, "loss_mode")
    if loss_mode not in LOSS_NAMES:
        return
    correction = _select(config, "algorithm.rollout_correction")
    if correction is None or not cfg(correction, "bypass_mode", False):
        return
    _check_bypass(loss_mode, correction)
    wanted = _plain(correction)
    current = cfg(policy_loss, "rollout_correction")
    if current is not None:
        if _plain(current) != wanted:
            raise ValueError(
                f"loss_mode={loss_mode} with {BYPASS_SWITCH}=True: {WORKER_CORRECTION_KEY}={_plain(current)} differs "
                f"from algorithm.rollout_correction={wanted}; the workers would run one and the trainer the other. "
                f"Remove {WORKER_CORRECTION_KEY} (cfpo_loss copies algorithm.rollout_correction there)."
            )
        return
    _set(policy_loss, "rollout_correction", wanted)
    LOG.info("cfpo_loss: %s=True with loss_mode=%s: copied algorithm.rollout_correction to %s (%s)",
              BYPASS_SWITCH, loss_mode, WORKER_CORRECTION_KEY, wanted)  # fmt: skip


def _unprepared(loss_mode: str, correction: Any) -> None:
    fix = (
        "cfpo_loss copies it there when verl's entry point (main_ppo, one-step-off, fully-async) calls "
        "verl.utils.device.auto_set_device(config) in the launching process; this run's launcher did not go "
        "through it (a custom entry point, or verl 0.8.0 without "
        f"{EXTERNAL_MODULES_ENV}={PLUGIN_MODULE} exported in the launching shell). "
        "Call cfpo_loss.adapters.verl.prepare_config(config) before the workers are built."
    )
    if cfg(correction, "rollout_rs") is not None:
        raise ValueError(
            f"loss_mode={loss_mode} with {BYPASS_SWITCH}=True and rollout_rs={cfg(correction, 'rollout_rs')!r}: "
            f"the workers' config has no {WORKER_CORRECTION_KEY}, so their CFPO loss cannot apply verl's rejection "
            f"mask. {fix}"
        )
    if not state.get("warned_unprepared"):
        state["warned_unprepared"] = True
        msg = (
            f"cfpo_loss: loss_mode={loss_mode} with {BYPASS_SWITCH}=True runs CFPO on pi_theta / pi_rollout, but the "
            f"workers' config has no {WORKER_CORRECTION_KEY}, so verl's rollout_corr/* metrics are not logged. {fix}"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        LOG.warning(msg)


def _wrap_apply_bypass_mode(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def apply_bypass_mode(*args, **kwargs):
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:  # not a call this wrapper knows: verl's function answers it
            return original(*args, **kwargs)
        policy_loss = arguments.get("policy_loss_config")
        loss_mode = None if policy_loss is None else cfg(policy_loss, "loss_mode")
        if loss_mode not in LOSS_NAMES:
            return original(*args, **kwargs)  # every other loss: verl's function, untouched
        correction = arguments.get("rollout_corr_config")
        _check_bypass(loss_mode, correction)
        prepared = cfg(policy_loss, "rollout_correction")
        if prepared is None or correction is None or _plain(prepared) != _plain(correction):
            _unprepared(loss_mode, correction)
        result = original(*args, **kwargs)  # old_log_probs = rollout_log_probs; sets loss_mode="bypass_mode"
        # verl's loss_mode rewrite changes only this (trainer-side) copy; the workers run loss_mode=cfpo from their
        # own copy of the config, so say so here as well
        _set(policy_loss, "loss_mode", loss_mode)
        return result

    setattr(apply_bypass_mode, MARK, "apply_bypass_mode")
    return apply_bypass_mode


def _wrap_auto_set_device(original: Callable) -> Callable:
    @functools.wraps(original)
    def auto_set_device(config, *args, **kwargs):
        result = original(config, *args, **kwargs)
        prepare_config(config)
        return result

    setattr(auto_set_device, MARK, "auto_set_device")
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
        if not is_ours(current):
            setattr(module, name, wrap(current))
        done.append(f"{module.__name__}.{name}")
    return tuple(done)
