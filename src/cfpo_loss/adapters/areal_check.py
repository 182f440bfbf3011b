"""Does the installed AReaL still have the functions the AReaL adapter relies on, text for text?

    python -m cfpo_loss.adapters.areal_check             # the installed areal: MATCH, or the diff per function
    python -m cfpo_loss.adapters.areal_check --update    # after a reviewed bump: store the installed texts

The adapter (``cfpo_loss.adapters.areal``) reproduces AReaL's ``ppo_actor_loss_fn`` around the core's objective,
reruns AReaL's ``grpo_loss_fn`` with that loss bound in, and swaps the actor's engine class in ``PPOTrainer``. Each
AReaL function it depends on is listed in ``FINGERPRINTS`` with why; its text in areal ``FINGERPRINTED_AREAL_VERSION``
is stored in ``areal/fingerprinted/<module>.<qualname>.txt`` and its sha256 pinned here. The adapter's import guard
(``areal/_guard.py``) refuses to import when a hash differs; this check prints the unified diff from the stored text
to the installed one, so a version bump is a reviewed diff:

1. ``pip install areal==NEW`` into the `areal` test environment; run this check; read each diff.
2. Carry every change that matters into the adapter (``areal/_loss.py``, ``_actor.py``, ``_trainer.py``).
3. ``--update`` stores the new texts and prints the new sha256 values: paste them into ``FINGERPRINTS``, set
   ``FINGERPRINTED_AREAL_VERSION`` and the areal rows of ``adapters/_support.py`` (SUPPORTED, TESTED); run
   ``nox -s areal`` (the conformance tests hold the translation to the new ``ppo_actor_loss_fn``).

This module imports ``areal`` but never ``cfpo_loss.adapters.areal``, whose guard would refuse on a mismatch.
Exit status: 0 every text matches; 1 one differs (diff printed); 2 it cannot be checked (no areal, no source).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "FINGERPRINTED_AREAL_VERSION",
    "FINGERPRINTS",
    "Fingerprint",
    "installed_text",
    "main",
    "problems",
    "stored_text",
]

#: the AReaL release whose texts are stored in STORE_DIR and hashed in FINGERPRINTS
FINGERPRINTED_AREAL_VERSION = "1.0.4"
STORE_DIR = Path(__file__).resolve().parent / "areal" / "fingerprinted"


class Fingerprint(NamedTuple):
    module: str  # the AReaL module that defines it
    qualname: str  # function, or Class.method
    why: str  # what the adapter relies on
    sha256: str  # of inspect.getsource(...) in FINGERPRINTED_AREAL_VERSION

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"


#: every AReaL function whose text the adapter depends on
FINGERPRINTS: tuple[Fingerprint, ...] = (
    Fingerprint("areal.utils.functional.functional", "ppo_actor_loss_fn",
                "policy_loss_fn reproduces its ratio, normalisation, behaviour weight and stat keys",
                "1f044d1dac960c9875c5b1ba77e6e05fd5a86dbba6c59174da9279ade2072ec4"),
    Fingerprint("areal.utils.functional.functional", "apply_rejection_sampling",
                "policy_loss_fn calls it for the filtered mask and the behaviour weight",
                "6fa91ebada54b369d9da2e68a6d2f515cc2ef35623832512c8f00f06d4390399"),
    Fingerprint("areal.utils.functional.functional", "_compute_sequence_level_ratio_and_advantages",
                "policy_loss_fn reproduces its sequence ratio and per-sequence mean advantage",
                "08c2eff0374f1bf35e7bd8ee3811839cd13ddd1e833469cab4a2f6441033d756"),
    Fingerprint("areal.trainer.ppo.actor", "grpo_loss_fn",
                "the CFPO engine reruns it with its global ppo_actor_loss_fn bound to policy_loss_fn",
                "11c7ce7b1d109ed193586e335e15457e508021ce519e3a8f194fc96212eed0b1"),
    Fingerprint("areal.trainer.ppo.actor", "PPOActor._ppo_update",
                "it hands engine.train_batch a functools.partial of grpo_loss_fn, which the CFPO engine swaps",
                "a8d0cf58a2b1bbdddd072030cfa61c9bc614bcda0427bcf6b1eb98cf1dc83153"),
    Fingerprint("areal.engine.fsdp_engine", "FSDPEngine.train_batch",
                "CFPOFSDPPPOActor.train_batch wraps it: (input_, loss_fn, loss_weight_fn)",
                "d24873db0943bbeddc1973cc02f982eab0aef5559b619ac78b6fe3a2ad026842"),
    Fingerprint("areal.engine.fsdp_engine", "FSDPPPOActor.as_controller",
                "single-controller mode hands the engine class itself to the controller",
                "0a49b1616e7987950f1ce881db0ca6ab59f3bf8e4bee47462a9ca4d87da9167a"),
    Fingerprint("areal.trainer.rl_trainer", "PPOTrainer._create_train_engine",
                "the adapter's PPOTrainer replaces it to build the CFPO engine for the actor",
                "ccb17539d707f8b740218b8d33b35a27b1a31499c11116415369a8193a7fa578"),
)  # fmt: skip


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def installed_text(fp: Fingerprint) -> str:
    """``inspect.getsource`` of the installed AReaL object (ImportError / AttributeError if it is gone)."""
    obj = importlib.import_module(fp.module)
    for part in fp.qualname.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(obj)


def stored_path(fp: Fingerprint) -> Path:
    return STORE_DIR / f"{fp.name}.txt"


def stored_text(fp: Fingerprint) -> str:
    return stored_path(fp).read_text(encoding="utf-8")


def problems() -> list[str]:
    """Every way the installed AReaL differs from the one the adapter is written against ([] when none): the
    version outside ``SUPPORTED["areal"]``, a function gone, a function whose text hashes differently."""
    from ._support import installed_version, is_supported, supported_range

    version = installed_version("areal")
    found = []
    if version is None or not is_supported("areal", version):
        found.append(f"areal=={version} is outside the supported range {supported_range('areal')}")
    for fp in FINGERPRINTS:
        try:
            text = installed_text(fp)
        except ImportError as exc:
            found.append(f"{fp.name} cannot be imported ({type(exc).__name__}: {exc})")
            continue
        except AttributeError as exc:
            found.append(f"{fp.name} is missing ({type(exc).__name__}: {exc})")
            continue
        except (OSError, TypeError) as exc:  # no source (replaced at run time, zipapp, frozen): cannot be trusted
            found.append(f"{fp.name}: its source cannot be read ({type(exc).__name__}: {exc}), so it cannot be checked")
            continue
        if sha256(text) != fp.sha256:
            found.append(f"{fp.name} differs from the areal=={FINGERPRINTED_AREAL_VERSION} text ({fp.why})")
    return found


def _diff(fp: Fingerprint, text: str, label: str) -> str:
    lines = difflib.unified_diff(stored_text(fp).splitlines(keepends=True), text.splitlines(keepends=True),
                                 f"areal {FINGERPRINTED_AREAL_VERSION} {fp.name}", f"{label} {fp.name}")  # fmt: skip
    return "".join(ln if ln.endswith("\n") else ln + "\n" for ln in lines)


def main(argv: Sequence[str] | None = None) -> int:
    summary = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m cfpo_loss.adapters.areal_check", description=summary)
    parser.add_argument(
        "--update",
        action="store_true",
        help="store the installed areal's texts and print the new sha256 values for FINGERPRINTS (after the "
        "reviewed diffs are carried into the adapter)",
    )
    args = parser.parse_args(argv)
    try:
        import areal

        label = f"installed areal {areal.__version__}"
        texts = [(fp, installed_text(fp)) for fp in FINGERPRINTS]
    except (ImportError, AttributeError, OSError, TypeError) as exc:
        print(f"CANNOT CHECK: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    status = 0
    for fp, text in texts:
        if args.update:
            stored_path(fp).write_text(text, encoding="utf-8")
            print(f"stored {fp.name}: sha256 {sha256(text)}")
        elif sha256(text) == fp.sha256 and text == stored_text(fp):
            print(f"MATCH: {fp.name} (sha256 {fp.sha256[:16]}...)")
        else:
            status = 1
            print(f"DIFFERS: {fp.name}: sha256 {sha256(text)}, pinned {fp.sha256}\n  the adapter relies on it "
                  f"because {fp.why}\n" + _diff(fp, text, label))  # fmt: skip
    if args.update:
        print("Now paste these sha256 values into FINGERPRINTS, set FINGERPRINTED_AREAL_VERSION here and the areal "
              "rows of adapters/_support.py (SUPPORTED, TESTED), and run `nox -s areal`.")  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
