"""Which framework versions each adapter is written and tested against (one table for all adapters).

The adapters hook into framework internals (TRL's `_compute_loss`, verl's loss registry, OpenRLHF's
`PolicyLoss`), so a version outside these ranges is refused or warned about, never silently trusted:
`warn_if_unsupported` is the one warning (verl, OpenRLHF); TRL's import guard refuses with the same range.
`TESTED` lists the releases CI runs the adapter tests against (noxfile.py reads it): every supported
minor line has at least its latest patch there. Standard library only (noxfile.py loads this file alone).
"""

from __future__ import annotations

import logging
import re
import warnings
from importlib import metadata

#: distribution name -> (lowest supported version, first unsupported version)
SUPPORTED: dict[str, tuple[str, str]] = {
    "trl": ("1.16.0", "1.17"),
    # 0.8.0 has no `verl.plugins` entry-point group: VERL_USE_EXTERNAL_MODULES there (adapters/verl/)
    "verl": ("0.8.0", "0.10"),
    # 0.10.4-0.11.1 have the older PolicyLoss IS-correction API (enable_vllm_is_correction, 4-tuple return)
    "openrlhf": ("0.10.4", "0.12"),
    # Python >= 3.12 (skyrl 0.4.0 fails at import on 3.11); the registry and loss signature read from 0.4.0
    "skyrl": ("0.4.0", "0.5"),
    # 1.0.4 is the only 1.0.x release; the adapter's guard also pins the text of every AReaL function it relies on
    "areal": ("1.0.4", "1.1"),
}

#: distribution name -> the releases CI tests (one nox session each; the first is the extra's pin)
TESTED: dict[str, tuple[str, ...]] = {
    "trl": ("1.16.0",),
    "verl": ("0.9.1", "0.9.0", "0.8.0"),
    "openrlhf": ("0.11.2", "0.10.4"),
    "skyrl": ("0.4.0",),
    "areal": ("1.0.4",),
}


#: torch: the lowest release the package claims (pyproject's `torch>=` floor) and the releases CI runs the core
#: tests on (`nox -s core`: one session each). torch 2.4.1 failed 4 core tests (its inductor cannot compile the
#: fast path under a TorchDispatchMode; a fuzz case raised FloatingPointError), 2.6.0 passed them all.
TORCH_FLOOR = "2.6.0"
TORCH_TESTED: tuple[str, ...] = ("2.13.0", TORCH_FLOOR)


def version_key(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string; ".postN" / "+local" / "rcN" suffixes are ignored."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def is_supported(dist: str, version: str | None = None) -> bool:
    version = version if version is not None else installed_version(dist)
    if version is None:
        return False
    low, high = SUPPORTED[dist]
    return version_key(low) <= version_key(version) < version_key(high)


def supported_range(dist: str) -> str:
    low, high = SUPPORTED[dist]
    return f">={low},<{high}"


def tested_versions(dist: str) -> str:
    return ", ".join(TESTED[dist])


def warn_if_unsupported(
    dist: str, version: str | None, consequence: str, *, logger: logging.Logger | None = None, stacklevel: int = 2
) -> str | None:
    """Warn (RuntimeWarning, and on ``logger`` at WARNING) when ``version`` of ``dist`` (the installed one, passed by
    the adapter) lies outside ``SUPPORTED``, naming the range, the tested releases and ``consequence`` (what the
    adapter does anyway). Returns the message; None for a supported or absent (None) version. ``stacklevel`` counts
    as ``warnings.warn``'s does, from the caller of this function (2: the caller's caller)."""
    if version is None or is_supported(dist, version):
        return None
    msg = (
        f"cfpo_loss: {dist} {version} is outside the supported range: the {dist} adapter supports "
        f"{dist}{supported_range(dist)} (tested: {tested_versions(dist)}), found {version}; {consequence}"
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel + 1)
    if logger is not None:
        logger.warning(msg)
    return msg


def warn_name_taken(
    framework: str, option: str, name: str, existing: object, plugin: str, logger: logging.Logger
) -> None:
    """Warn (RuntimeWarning, and on ``logger`` at WARNING: what a Ray worker's log shows) that ``name`` in the
    framework's loss registry belongs to another package's ``existing`` and is left in place: ``option=name``
    will not run CFPO. Shared by the registry adapters (verl, SkyRL); warns from the caller of ``register``."""
    owner = f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', existing)!s}"
    msg = (
        f"cfpo_loss: {framework} policy loss {name!r} is already registered by {owner}; leaving it in place "
        f"({option}={name} will NOT be CFPO). Call {plugin}.register(override=True) to replace it."
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)  # 3: the caller of the adapter's register()
    logger.warning(msg)
