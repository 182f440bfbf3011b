"""Registration of ``cfpo`` / ``cfpo_seq`` in verl's POLICY_LOSS_REGISTRY, and of the bypass-mode hooks.

Importing the plugin runs ``register_at_import``. It must never break ``import verl`` (verl imports plugins in the
driver and in every Ray worker), and a failure must not go unseen: verl logs plugin import errors only at DEBUG,
which would leave a user with a bare "Unsupported loss mode: cfpo". So a failure is a RuntimeWarning, also logged at
WARNING level (what a Ray worker's log shows), and its cause is kept for ``plugin_status``.
"""

from __future__ import annotations

import traceback
import warnings

from .._support import warn_name_taken
from ._bypass import BYPASS_SWITCH, install_hooks
from ._common import LOG, LOSS_NAMES, PLUGIN_MODULE, is_ours, state, verl_version
from ._loss import LOSSES


def register(*, override: bool = False) -> tuple[str, ...]:
    """Register ``cfpo`` and ``cfpo_seq`` with verl's ``register_policy_loss``. Idempotent.

    A name already held by a loss from another package is left alone (with a warning) unless
    ``override``. Returns the names that now map to our losses. Raises if verl cannot be imported or
    lacks the registry (the import-time call turns that into a loud warning).
    """
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    done = []
    for name, fn in LOSSES.items():
        existing = POLICY_LOSS_REGISTRY.get(name)
        if existing is fn:
            done.append(name)
            continue
        if existing is not None and not is_ours(existing) and not override:
            warn_name_taken("verl", "loss_mode", name, existing, PLUGIN_MODULE, LOG)
            continue
        register_policy_loss(name)(fn)
        done.append(name)
    return tuple(done)


def registration_error() -> str | None:
    """The cause recorded when the import-time registration failed, else None."""
    return state["error"]


def register_at_import() -> None:
    """``register()`` then ``install_hooks()``, each failure a loud warning; a verl outside the supported range is
    warned about by name."""
    from .._support import supported_range, tested_versions, warn_if_unsupported

    consequence = f"registering {LOSS_NAMES} anyway, but its loss signature and agg_loss are not known to match."
    warn_if_unsupported("verl", verl_version(), consequence, logger=LOG)
    try:
        register()
        state["error"] = None
    except Exception as exc:  # noqa: BLE001 - must never break `import verl`; report loudly instead
        state["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        msg = (
            f"cfpo_loss: could not register the verl policy losses {LOSS_NAMES} "
            f"(loss_mode=cfpo will fail with 'Unsupported loss mode'): {state['error']}. "
            f"The adapter supports verl{supported_range('verl')} (tested: {tested_versions('verl')}); "
            "run `python -m cfpo_loss` for a diagnosis."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        LOG.warning(msg)
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
        LOG.warning(msg)
