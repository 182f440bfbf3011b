"""SkyRL adapter: ``trainer.algorithm.policy_loss_type=cfpo`` (token ratio) and ``cfpo_seq`` (sequence ratio
exp(mean_t log r)) through SkyRL's own loss registry.

Importing this package registers both in SkyRL's ``PolicyLossRegistry``; SkyRL's ``sync_registries`` carries
them to its Ray workers. The one-flag launch, on SkyRL's own entry point::

    python -m skyrl.train.entrypoints.main_base trainer.override_entrypoint=cfpo_loss.adapters.skyrl \\
        trainer.algorithm.policy_loss_type=cfpo ...

A custom entry point (e.g. one that builds SkyRL's fully-async trainer) imports this package before it calls
``validate_cfg``.

    SkyRL                                   here
    eps_clip_low / eps_clip_high            eps_low / eps_high
    loss_reduction (every one)              SkyRL's trainer folds it into the advantages; the loss is a masked
                                            sum ("token-sum"), as SkyRL's own losses
    off_policy_correction                   SkyRL's compute_off_policy_correction: IS weight × rejection mask
                                            multiplied onto the per-token loss, exactly as its clipped loss
    clip_ratio_c (dual clip)                refused by name unless at SkyRL's default (CFPO clips nothing)
    metrics                                 ``clip_ratio`` (the trust-region exit fraction), every core metric
                                            as ``cfpo/<name>``, SkyRL's off-policy metrics unchanged

The math is the core's (``cfpo_loss.compute_policy_loss``); ``_loss`` translates, ``_registry`` registers,
``_entry`` is the launch.
"""

from __future__ import annotations

from ._entry import OVERRIDE_FLAG, check_config, main, training_args
from ._loss import LOSSES, compute_policy_loss_cfpo, compute_policy_loss_cfpo_seq, make_policy_loss
from ._registry import LOSS_NAMES, PLUGIN_MODULE, register, register_at_import, registration_error, status

__all__ = [
    "LOSSES",
    "LOSS_NAMES",
    "OVERRIDE_FLAG",
    "PLUGIN_MODULE",
    "check_config",
    "compute_policy_loss_cfpo",
    "compute_policy_loss_cfpo_seq",
    "main",
    "make_policy_loss",
    "register",
    "registration_error",
    "status",
    "training_args",
]

assert __name__ == PLUGIN_MODULE, f"{PLUGIN_MODULE} was imported as {__name__}: the registry checks name it"
register_at_import()
