"""The import guard: the installed AReaL's version lies in ``SUPPORTED["areal"]`` and the source of every AReaL
function the adapter relies on (``areal_check.FINGERPRINTS``, with why) hashes to its pinned value, or
``import cfpo_loss.adapters.areal`` raises ``ImportError`` naming each difference: a changed loss in AReaL would
otherwise be "reproduced" by a stale translation, and a changed actor could silently train with AReaL's own loss.
``CFPO_LOSS_ALLOW_UNSUPPORTED_AREAL=1`` turns the error into a warning, at the user's own risk.
"""

from __future__ import annotations

import os
import warnings

from .._support import installed_version, is_supported, supported_range
from ..areal_check import FINGERPRINTED_AREAL_VERSION, FINGERPRINTS, installed_text, sha256

ALLOW_ENV = "CFPO_LOSS_ALLOW_UNSUPPORTED_AREAL"


def problems() -> list[str]:
    """Every way the installed AReaL differs from the one the adapter is written against ([] when none)."""
    version = installed_version("areal")
    found = []
    if version is None or not is_supported("areal", version):
        found.append(f"areal=={version} is outside the supported range {supported_range('areal')}")
    for fp in FINGERPRINTS:
        try:
            text = installed_text(fp)
        except (ImportError, AttributeError) as exc:
            found.append(f"{fp.name} is missing ({type(exc).__name__}: {exc})")
            continue
        except (OSError, TypeError):  # no source shipped (zipapp, frozen): the version check alone
            warnings.warn(f"cfpo_loss.adapters.areal: cannot read the source of {fp.name}; relying on the version "
                          "check only", RuntimeWarning, stacklevel=3)  # fmt: skip
            continue
        if sha256(text) != fp.sha256:
            found.append(f"{fp.name} differs from the areal=={FINGERPRINTED_AREAL_VERSION} text ({fp.why})")
    return found


def check_areal() -> None:
    """Raise ImportError (a RuntimeWarning with ``ALLOW_ENV`` set) naming every problem found."""
    found = problems()
    if not found:
        return
    msg = (
        "cfpo_loss.adapters.areal: " + "; ".join(found) + ". The adapter reproduces AReaL's loss around the CFPO "
        "objective and swaps its actor's engine; on another AReaL it could silently compute a wrong loss or train "
        f"with AReaL's own. Install areal{supported_range('areal')}, or set {ALLOW_ENV}=1 to proceed anyway at your "
        "own risk. `python -m cfpo_loss.adapters.areal_check` shows how the installed AReaL's functions differ."
    )
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        raise ImportError(msg)
