"""Which framework versions each adapter is written and tested against.

The adapters hook into framework internals (TRL's `_compute_loss`, verl's loss registry, OpenRLHF's
`PolicyLoss`), so a version outside these ranges is refused or warned about, never silently trusted.
"""

from __future__ import annotations

import re
from importlib import metadata

#: distribution name -> (lowest supported version, first unsupported version), the pinned test versions
SUPPORTED: dict[str, tuple[str, str]] = {
    "trl": ("1.16.0", "1.17"),
    "verl": ("0.9.1", "0.10"),
    "openrlhf": ("0.11.2", "0.12"),
}


def _key(version: str) -> tuple[int, ...]:
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
    return _key(low) <= _key(version) < _key(high)


def supported_range(dist: str) -> str:
    low, high = SUPPORTED[dist]
    return f">={low},<{high}"
