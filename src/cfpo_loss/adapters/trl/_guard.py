"""The TRL adapter's import guard: the installed TRL's version lies in ``SUPPORTED_TRL`` (the one table of
``adapters/_support.py``) and the sources of the TRL methods the adapter mirrors hash to ``MIRRORED_SHA256``, or
``import cfpo_loss.adapters.trl`` raises ``ImportError``: a silently changed TRL loss would otherwise be replaced by a
stale copy. One guard for the package: a changed RLOO method also stops ``CFPOTrainer``'s import.
``CFPO_LOSS_ALLOW_UNSUPPORTED_TRL=1`` turns the error into a warning, at the user's own risk.

Only versions whose trainers can be tested here are supported: TRL 1.15.0's ``GRPOTrainer._compute_loss`` is the same
text, but its trainer cannot run on a CPU (its chunked log-prob kernel is ``None`` without Triton), so no test could
hold it to TRL's own loss.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings

import trl

from .._support import SUPPORTED, is_supported, supported_range

#: TRL versions this adapter is written and tested against (half-open range; one table for all adapters).
SUPPORTED_TRL = (f">={SUPPORTED['trl'][0]}", f"<{SUPPORTED['trl'][1]}")
#: mirrored TRL class -> sha256 of ``inspect.getsource(<class>._compute_loss)`` in trl==1.16.0, the text stored in
#: ``mirror/<class>._compute_loss.txt`` (a test holds them together; ``trl_check --update`` prints new values)
MIRRORED_SHA256 = {
    "GRPOTrainer": "80295546bbdbf6f711acce7f6e69b0100ab40aa8f23ed8052cc564ff024e3e40",
    "RLOOTrainer": "c1f9fa0cd5a6948ce73ab66dc76896449797e22531d5237606c3f66963b29311",
}
#: mirrored TRL class -> the adapter class whose ``_compute_loss`` is that method's copy
MIRRORED_BY = {"GRPOTrainer": "CFPOTrainer", "RLOOTrainer": "CFPORLOOTrainer"}
ALLOW_ENV = "CFPO_LOSS_ALLOW_UNSUPPORTED_TRL"


def check_trl_version() -> None:
    """Raise ImportError (a RuntimeWarning with ``ALLOW_ENV`` set) naming every problem found."""
    problems = []
    if not is_supported("trl", trl.__version__):
        problems.append(f"trl=={trl.__version__} is outside the supported range {supported_range('trl')}")
    for cls, pinned in MIRRORED_SHA256.items():
        method, ours = f"{cls}._compute_loss", MIRRORED_BY[cls]
        try:
            src = inspect.getsource(getattr(trl, cls)._compute_loss)
        except (OSError, TypeError):  # no source shipped (zipapp, frozen): fall back to the version check alone
            src = None
            warnings.warn(
                f"cfpo_loss.adapters.trl: cannot read the source of trl.{method} to check that it is the version "
                f"mirrored by {ours}; relying on the version check only.",
                RuntimeWarning,
                stacklevel=3,
            )
        if src is not None and hashlib.sha256(src.encode()).hexdigest() != pinned:
            problems.append(f"trl.{method} differs from the trl==1.16.0 text that {ours}._compute_loss mirrors")
    if not problems:
        return
    msg = (
        "cfpo_loss.adapters.trl: " + "; ".join(problems) + ". CFPOTrainer and CFPORLOOTrainer copy TRL's loss methods "
        "with only the objective swapped, so on another TRL they could silently compute a wrong loss. Install trl"
        f"{supported_range('trl')} (pip install 'cfpo-loss[trl]'), or set {ALLOW_ENV}=1 to proceed anyway at "
        "your own risk. `python -m cfpo_loss.adapters.trl_check` shows how the installed TRL's methods differ."
    )
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        raise ImportError(msg)
