"""The import guard: the installed AReaL's version lies in ``SUPPORTED["areal"]`` and the source of every AReaL
function the adapter relies on (``areal_check.FINGERPRINTS``, with why) hashes to its pinned value, or
``import cfpo_loss.adapters.areal`` raises ``ImportError`` naming each difference: a changed loss in AReaL would
otherwise be "reproduced" by a stale translation, and a changed actor could silently train with AReaL's own loss.
``CFPO_LOSS_ALLOW_UNSUPPORTED_AREAL=1`` turns the error into a warning, at the user's own risk.
"""

from __future__ import annotations

import os
import warnings

from .._support import supported_range
from ..areal_check import problems
from ._names import ADAPTER_MODULE

ALLOW_ENV = "CFPO_LOSS_ALLOW_UNSUPPORTED_AREAL"


def check_areal() -> None:
    """Raise ImportError (a RuntimeWarning with ``ALLOW_ENV`` set) naming every problem found."""
    found = problems()
    if not found:
        return
    msg = (
        f"{ADAPTER_MODULE}: " + "; ".join(found) + ". The adapter reproduces AReaL's loss around the CFPO "
        "objective and swaps its actor's engine; on another AReaL it could silently compute a wrong loss or train "
        f"with AReaL's own. Install areal{supported_range('areal')}, or set {ALLOW_ENV}=1 to proceed anyway at your "
        "own risk. `python -m cfpo_loss.adapters.areal_check` shows how the installed AReaL's functions differ."
    )
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        raise ImportError(msg)
