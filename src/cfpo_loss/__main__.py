"""`python -m cfpo_loss`: versions, and which framework adapters can run here."""

from __future__ import annotations

import sys

import torch

from . import __version__
from .adapters._support import SUPPORTED, installed_version, is_supported, supported_range, tested_versions


def report() -> str:
    lines = [f"cfpo_loss {__version__}", f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    for dist in SUPPORTED:
        version = installed_version(dist)
        if version is None:
            state = f"not installed (adapter supports {supported_range(dist)}; tested: {tested_versions(dist)})"
        else:
            ok = "supported" if is_supported(dist, version) else "NOT SUPPORTED"
            state = f"{version} ({ok}; adapter supports {supported_range(dist)}; tested: {tested_versions(dist)})"
        lines.append(f"{dist}: {state}")
    if installed_version("verl") is not None:
        lines.append(f"verl plugin: {_verl_plugin_status()}")
    if installed_version("skyrl") is not None:
        lines.append(f"skyrl loss registry: {_skyrl_status()}")
    if installed_version("areal") is not None:
        lines.append(f"areal adapter: {_areal_adapter_status()}")
    return "\n".join(lines)


def _verl_plugin_status() -> str:
    try:
        from .adapters.verl import plugin_status
    except Exception as exc:  # noqa: BLE001 - the report must go on when the adapter itself cannot import: say why
        return f"adapter import failed: {type(exc).__name__}: {exc}"
    return plugin_status()


def _skyrl_status() -> str:
    try:
        from .adapters.skyrl import status
    except Exception as exc:  # noqa: BLE001 - the report must go on when the adapter itself cannot import: say why
        return f"adapter import failed: {type(exc).__name__}: {exc}"
    return status()


def _areal_adapter_status() -> str:
    try:
        from .adapters.areal_check import FINGERPRINTS, problems

        found = problems()
    except Exception as exc:  # noqa: BLE001 - the report must go on when AReaL itself cannot import: say why
        return f"check failed: {type(exc).__name__}: {exc}"
    if found:
        return "REFUSED (`python -m cfpo_loss.adapters.areal_check` shows why): " + "; ".join(found)
    return f"READY (the version and the text of the {len(FINGERPRINTS)} AReaL functions it relies on match)"


if __name__ == "__main__":
    print(report())
