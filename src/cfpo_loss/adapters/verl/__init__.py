"""verl plugin: registers the ``cfpo`` and ``cfpo_seq`` policy losses in verl's POLICY_LOSS_REGISTRY.

Select the loss with::

    actor_rollout_ref.actor.policy_loss.loss_mode=cfpo        # token-level ratio
    actor_rollout_ref.actor.policy_loss.loss_mode=cfpo_seq    # GSPO sequence-level ratio

How verl finds this module (``python -m cfpo_loss`` says which mechanism is active):

* **verl 0.9.x**: nothing to do. Installing cfpo-loss declares this module under the entry-point
  group ``verl.plugins``; ``import verl`` loads every entry point of that group, in the driver and in
  every Ray worker (``VERL_USE_EXTERNAL_PLUGINS``: "auto" by default, "none" disables, or a comma list
  of entry-point names such as "cfpo_loss").
* **verl 0.8.0** has no entry-point group; its ``import verl`` imports the modules listed in
  ``VERL_USE_EXTERNAL_MODULES``. Set it for every Ray worker through Ray's job-level ``runtime_env``
  with ``HYDRA_OVERRIDE`` (verl's ``main_ppo`` passes ``ray_kwargs.ray_init`` to ``ray.init``)::

      +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=cfpo_loss.adapters.verl

  and export ``VERL_USE_EXTERNAL_MODULES=cfpo_loss.adapters.verl`` in the launching shell too, so the
  driver registers the losses and runs the bypass-mode config step.

Both mechanisms name this module, ``PLUGIN_MODULE``: it must stay ``cfpo_loss.adapters.verl``.
Importing it registers the losses and the bypass-mode hooks; it imports without verl installed (the
registration then records why it failed, with a warning). One concern per module:

    _loss.py           verl's loss signature and config -> cfpo_loss.compute_policy_loss, verl's metric keys
    _bypass.py         rollout-correction bypass mode: the config step, the two wrapped verl functions
    _registration.py   register(), the import-time registration and its loud failure
    _status.py         plugin_status() / loading_mechanism(): which mechanism loads the plugin, and does it
    _common.py         the plugin's identity and the switches' names, reading any verl config
"""

from __future__ import annotations

from ._bypass import BYPASS_SWITCH, WORKER_CORRECTION_KEY, bypass_correction, install_hooks, prepare_config
from ._common import (
    ENTRY_POINT_GROUP,
    ENTRY_POINT_NAME,
    EXTERNAL_MODULES_ENV,
    HYDRA_OVERRIDE,
    LOSS_NAMES,
    PLUGIN_MODULE,
)
from ._common import state as _state  # noqa: F401 - the warn-once flags, reset by tests
from ._loss import compute_policy_loss_cfpo, compute_policy_loss_cfpo_seq, make_policy_loss
from ._registration import register, register_at_import, registration_error
from ._status import loading_mechanism, plugin_status, verl_loads_entry_points

__all__ = [
    "LOSS_NAMES",
    "ENTRY_POINT_NAME",
    "ENTRY_POINT_GROUP",
    "PLUGIN_MODULE",
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

register_at_import()
