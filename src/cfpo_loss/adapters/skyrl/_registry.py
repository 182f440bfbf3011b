"""Registration of ``cfpo`` / ``cfpo_seq`` in SkyRL's ``PolicyLossRegistry``, the registry SkyRL keeps for
third-party losses.

A registration in the driver reaches SkyRL's Ray workers through SkyRL's own ``sync_registries`` (called by
``initialize_ray``): it sends every registered function to a named Ray actor, and a worker's
``PolicyLossRegistry.get`` pulls the functions it lacks from there. The functions travel by reference, so the
worker imports this package to resolve them, which registers them there as well.
"""

from __future__ import annotations

import logging
import traceback
import warnings
from typing import Any

from .._support import warn_name_taken
from ._loss import LOSSES, MARK

__all__ = ["LOSS_NAMES", "PLUGIN_MODULE", "register", "register_at_import", "registration_error", "status"]

_LOG = logging.getLogger(__name__)

#: the adapter's module identity: what ``trainer.override_entrypoint=`` names, and what the checks look for
PLUGIN_MODULE = "cfpo_loss.adapters.skyrl"
#: the names users pass as ``trainer.algorithm.policy_loss_type``
LOSS_NAMES = tuple(LOSSES)

_state: dict[str, Any] = {"error": None}


def _is_ours(fn: Any) -> bool:
    return getattr(fn, MARK, None) is not None


def _registered_here(registry: Any) -> dict:
    """The registry's local table, read without ``list_available`` / ``get``: with Ray up those first sync with the
    registry actor, and during import (which may itself be SkyRL unpickling one of these functions in a worker)
    that would re-enter the import."""
    return registry._functions


def register(*, override: bool = False) -> tuple[str, ...]:
    """Register ``cfpo`` and ``cfpo_seq`` in SkyRL's ``PolicyLossRegistry`` (idempotent; with Ray up, SkyRL's
    ``register`` also sends them to the registry actor). A name held by another package's loss is left alone,
    with a warning, unless ``override``. Returns the names that now map to these losses."""
    from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry

    done = []
    for name, fn in LOSSES.items():
        existing = _registered_here(PolicyLossRegistry).get(name)
        if existing is not None and _is_ours(existing):
            done.append(name)
            continue
        if existing is not None:
            if not override:
                warn_name_taken("SkyRL", "policy_loss_type", name, existing, PLUGIN_MODULE, _LOG)
                continue
            PolicyLossRegistry.unregister(name)
        PolicyLossRegistry.register(name, fn)
        done.append(name)
    return tuple(done)


def registration_error() -> str | None:
    """Why the import-time registration failed, else None."""
    return _state["error"]


def register_at_import() -> None:
    """What importing the package does: register, warn on a SkyRL outside the supported range, and turn any failure
    into a loud warning (a worker that imports this package to resolve a loss must not die of it)."""
    from .._support import installed_version, supported_range, tested_versions, warn_if_unsupported

    consequence = f"registering {LOSS_NAMES} anyway, but its loss signature and registry are not known to match."
    warn_if_unsupported("skyrl", installed_version("skyrl"), consequence, logger=_LOG, stacklevel=3)
    try:
        register()
        _state["error"] = None
    except Exception as exc:  # noqa: BLE001 - importing the adapter must not fail: say why, loudly
        _state["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        msg = (
            f"cfpo_loss: could not register the SkyRL policy losses {LOSS_NAMES} (policy_loss_type=cfpo will fail "
            f"with 'invalid policy_loss_type'): {_state['error']}. The adapter supports "
            f"skyrl{supported_range('skyrl')} (tested: {tested_versions('skyrl')}); run `python -m cfpo_loss`."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        _LOG.warning(msg)


def status() -> str:
    """One line for ``python -m cfpo_loss``: are the losses in this process's SkyRL registry, and how to launch."""
    if _state["error"] is not None:
        return f"NOT REGISTERED: {_state['error']}"
    from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry

    here = _registered_here(PolicyLossRegistry)
    missing = [name for name in LOSS_NAMES if not _is_ours(here.get(name))]
    if missing:
        return f"NOT REGISTERED ({', '.join(missing)} held by another loss or absent)"
    return (
        f"REGISTERED (policy_loss_type={' / '.join(LOSS_NAMES)}); launch: python -m skyrl.train.entrypoints.main_base "
        f"trainer.override_entrypoint={PLUGIN_MODULE} trainer.algorithm.policy_loss_type=cfpo ..."
    )
