"""What every part of the verl plugin shares: the plugin's identity, verl's names for the switches that load it,
and reading a verl config that may be a dataclass, a DictConfig or a dict."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

#: the plugin's module identity: what the ``verl.plugins`` entry point (pyproject.toml) names, what
#: VERL_USE_EXTERNAL_MODULES must list on verl 0.8.0, and the ``__module__`` of the losses in verl's registry.
#: Every check of "is this ours" compares against this one name (tests/core/test_plugin_identity.py holds it equal to
#: the package's ``__name__`` and to the entry point).
PLUGIN_MODULE = "cfpo_loss.adapters.verl"
#: the names this plugin registers (never a bare "spo": in verl that is Single-stream Policy Optimization)
LOSS_NAMES = ("cfpo", "cfpo_seq")
#: name of our entry point in the ``verl.plugins`` group (what VERL_USE_EXTERNAL_PLUGINS filters on)
ENTRY_POINT_NAME = "cfpo_loss"
ENTRY_POINT_GROUP = "verl.plugins"
#: verl's own import hook (every verl version): ``import verl`` imports the comma-separated modules listed here
EXTERNAL_MODULES_ENV = "VERL_USE_EXTERNAL_MODULES"
#: the verl 0.8.0 switch: this module in every Ray worker's VERL_USE_EXTERNAL_MODULES, via verl's ray_init
HYDRA_OVERRIDE = f"+ray_kwargs.ray_init.runtime_env.env_vars.{EXTERNAL_MODULES_ENV}={PLUGIN_MODULE}"

#: attribute set on our loss functions and wrappers, so re-registration can tell ours from someone else's
MARK = "__cfpo_loss_plugin__"

LOG = logging.getLogger(PLUGIN_MODULE)

#: the import-time registration's error ("error") and the warn-once flags
state: dict[str, Any] = {"error": None}


def cfg(config: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from an ActorConfig (dataclass) or a DictConfig / dict alike."""
    if isinstance(config, dict):
        return config.get(name, default)
    try:
        return getattr(config, name)
    except (AttributeError, KeyError):
        getter = getattr(config, "get", None)
        return getter(name, default) if callable(getter) else default


def verl_version() -> str | None:
    try:
        return importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_ours(fn: Any) -> bool:
    return getattr(fn, MARK, None) is not None
