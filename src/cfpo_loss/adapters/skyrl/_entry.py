"""The one-flag launch: ``trainer.override_entrypoint=cfpo_loss.adapters.skyrl`` on SkyRL's own entry point.

SkyRL's ``main_base.main`` sees that flag before it parses the config, imports the named module (which registers
``cfpo`` / ``cfpo_seq``) and calls its ``main()``. ``main`` here then does what SkyRL's own ``main`` does, in the
same order: parse, ``validate_cfg`` (which refuses a ``policy_loss_type`` the registry does not know, so the
registration has to come first), ``initialize_ray`` (whose ``sync_registries`` sends the losses to every Ray
worker) and the training task.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from ._loss import check_options
from ._registry import LOSS_NAMES, PLUGIN_MODULE, register

__all__ = ["OVERRIDE_FLAG", "check_config", "main", "training_args"]

_LOG = logging.getLogger(__name__)

#: the flag that makes SkyRL's entry point run ``main`` below
OVERRIDE_FLAG = f"trainer.override_entrypoint={PLUGIN_MODULE}"
_OVERRIDE_KEY = "trainer.override_entrypoint="


def training_args(argv: list[str]) -> list[str]:
    """The command-line overrides without ``trainer.override_entrypoint=...``, which SkyRL's entry point reads
    before parsing and its config class does not have (its strict parse would refuse it)."""
    return [arg for arg in argv if not arg.startswith(_OVERRIDE_KEY)]


def check_config(cfg: Any) -> None:
    """What the adapter checks on a whole SkyRL config before Ray starts (the losses check it again per call):
    options with no CFPO meaning are refused by name; a fully-async run without off-policy correction gets a
    warning, because there the loss's ratio is π_θ / π_old with π_old recomputed at the step (1 on the first
    update), so nothing acts on the rollout policy's staleness unless the correction does."""
    algorithm = cfg.trainer.algorithm
    if algorithm.policy_loss_type not in LOSS_NAMES:
        return
    check_options(algorithm, algorithm.policy_loss_type)
    from skyrl.backends.skyrl_train.utils.off_policy_correction_utils import off_policy_correction_enabled

    if cfg.trainer.fully_async.enabled and not off_policy_correction_enabled(algorithm.off_policy_correction):
        msg = (
            f"cfpo_loss: policy_loss_type={algorithm.policy_loss_type} with trainer.fully_async.enabled=True and no "
            "trainer.algorithm.off_policy_correction: SkyRL recomputes π_old at each step, so the CFPO ratio "
            "π_θ / π_old starts at 1 and the rollout policy's staleness is not corrected; set e.g. "
            "trainer.algorithm.off_policy_correction.tis_ratio_type=token (docs: Off-policy and asynchronous training)"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        _LOG.warning(msg)


def main(argv: list[str] | None = None) -> None:
    """SkyRL's ``main_base.main`` with ``cfpo`` / ``cfpo_seq`` registered before the config is validated."""
    import ray
    from skyrl.train.config import SkyRLTrainConfig
    from skyrl.train.entrypoints.main_base import skyrl_entrypoint
    from skyrl.train.utils import validate_cfg
    from skyrl.train.utils.utils import initialize_ray

    register()  # done at import already; idempotent, and says plainly that it precedes validate_cfg
    cfg = SkyRLTrainConfig.from_cli_overrides(training_args(sys.argv[1:] if argv is None else argv))
    check_config(cfg)
    validate_cfg(cfg)
    initialize_ray(cfg)  # its sync_registries sends the registered losses to the actor every worker reads
    ray.get(skyrl_entrypoint.remote(cfg))
