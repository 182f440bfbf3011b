"""Does the installed TRL's ``GRPOTrainer._compute_loss`` still match the text ``CFPOTrainer`` mirrors?

    python -m cfpo_loss.adapters.trl_check                    # the installed trl
    python -m cfpo_loss.adapters.trl_check --source FILE      # a grpo_trainer.py not installed (e.g. unpacked
                                                              # from a newer TRL wheel)
    python -m cfpo_loss.adapters.trl_check --update           # after a reviewed bump: store the installed text

``CFPOTrainer._compute_loss`` (``adapters/trl.py``) is TRL's method copied with only the objective swapped
(every departure marked ``# CFPO:``). The exact TRL text it mirrors is stored beside this file
(``trl_mirror/GRPOTrainer._compute_loss.txt``, TRL ``MIRRORED_TRL_VERSION``); ``adapters/trl.py`` pins its
sha256 and refuses to import when the installed TRL's method hashes differently. This check says precisely
whether it still matches and, when it does not, prints the unified diff from the mirrored text to the new
TRL's, so a TRL bump is a reviewed diff applied to ``CFPOTrainer._compute_loss``, not a re-copy from scratch
(the bump procedure is in ``adapters/trl.py``'s docstring). It imports ``trl`` (or reads ``--source``) but
never ``cfpo_loss.adapters.trl``, which would refuse to import on a mismatch.

Exit status: 0 the text matches; 1 it differs (the diff is printed); 2 it cannot be checked (no trl, no source).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

__all__ = ["MIRRORED_TRL_VERSION", "MIRROR_PATH", "CheckResult", "check", "mirrored_source", "method_source"]

#: the TRL release whose GRPOTrainer._compute_loss is stored in MIRROR_PATH (and copied by CFPOTrainer)
MIRRORED_TRL_VERSION = "1.16.0"
MIRROR_PATH = Path(__file__).resolve().parent / "trl_mirror" / "GRPOTrainer._compute_loss.txt"
_CLASS, _METHOD = "GRPOTrainer", "_compute_loss"


class CheckResult(NamedTuple):
    matches: bool
    mirrored_sha256: str
    candidate_sha256: str
    candidate_label: str
    diff: str  # unified diff mirrored -> candidate ("" when they match)
    changed_lines: int  # lines removed + added


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mirrored_source() -> str:
    """The stored text of trl==MIRRORED_TRL_VERSION's GRPOTrainer._compute_loss (what the adapter copies)."""
    return MIRROR_PATH.read_text(encoding="utf-8")


def method_source(grpo_trainer_py: Optional[str] = None) -> str:
    """``GRPOTrainer._compute_loss``'s text exactly as ``inspect.getsource`` gives it (the adapter hashes that).

    From the installed trl when ``grpo_trainer_py`` is None, else parsed out of that file's text.
    """
    if grpo_trainer_py is None:
        import inspect

        from trl import GRPOTrainer

        return inspect.getsource(getattr(GRPOTrainer, _METHOD))
    tree = ast.parse(grpo_trainer_py)
    lines = grpo_trainer_py.splitlines(keepends=True)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == _CLASS:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == _METHOD:
                    start = min([item.lineno, *(d.lineno for d in item.decorator_list)]) - 1
                    return "".join(lines[start : item.end_lineno])
            raise ValueError(f"class {_CLASS} has no method {_METHOD}")
    raise ValueError(f"no class {_CLASS} in the given source")


def check(candidate: str, label: str = "installed") -> CheckResult:
    """Compare ``candidate`` (a ``_compute_loss`` text) with the mirrored text."""
    mirrored = mirrored_source()
    diff_lines = list(
        difflib.unified_diff(
            mirrored.splitlines(keepends=True),
            candidate.splitlines(keepends=True),
            fromfile=f"trl {MIRRORED_TRL_VERSION} {_CLASS}.{_METHOD} (mirrored by CFPOTrainer)",
            tofile=f"{label} {_CLASS}.{_METHOD}",
        )
    )
    changed = sum(1 for ln in diff_lines if ln[:1] in "+-" and not ln.startswith(("+++", "---")))
    return CheckResult(
        matches=candidate == mirrored,
        mirrored_sha256=sha256(mirrored),
        candidate_sha256=sha256(candidate),
        candidate_label=label,
        diff="".join(ln if ln.endswith("\n") else ln + "\n" for ln in diff_lines),
        changed_lines=changed,
    )


def report(result: CheckResult) -> str:
    head = f"{result.candidate_label} {_CLASS}.{_METHOD}: sha256 {result.candidate_sha256}"
    if result.matches:
        return (
            f"MATCH: {head}\n"
            f"  is exactly the trl {MIRRORED_TRL_VERSION} text that CFPOTrainer._compute_loss mirrors; the objective "
            "swap still applies as written."
        )
    return (
        f"DIFFERS: {head}\n"
        f"  mirrored trl {MIRRORED_TRL_VERSION} text has sha256 {result.mirrored_sha256}; {result.changed_lines} "
        "line(s) removed or added.\n"
        "  Review the diff below and apply it to CFPOTrainer._compute_loss in cfpo_loss/adapters/trl.py (its own "
        "departures are marked `# CFPO:`), then follow the bump procedure in that module's docstring.\n\n"
        + result.diff
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfpo_loss.adapters.trl_check", description=__doc__.split("\n")[0])
    parser.add_argument("--source", metavar="GRPO_TRAINER_PY", help="check this trl/trainer/grpo_trainer.py instead "
                        "of the installed trl")
    parser.add_argument("--update", action="store_true", help="store the installed trl's text as the mirrored text "
                        "(after the reviewed diff is applied to CFPOTrainer._compute_loss) and print its sha256 for "
                        "adapters/trl.py's _MIRRORED_SHA256")
    args = parser.parse_args(argv)
    try:
        if args.source is not None:
            text = Path(args.source).read_text(encoding="utf-8")
            candidate, label = method_source(text), args.source
        else:
            import trl

            candidate, label = method_source(), f"installed trl {trl.__version__}"
    except (ImportError, OSError, TypeError, ValueError, SyntaxError) as exc:
        print(f"CANNOT CHECK: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.update:
        if args.source is not None:
            parser.error("--update stores the installed trl's text; it does not take --source")
        MIRROR_PATH.write_text(candidate, encoding="utf-8")
        print(f"stored {label}'s {_CLASS}.{_METHOD} in {MIRROR_PATH}\nsha256 {sha256(candidate)}\n"
              "Now set _MIRRORED_SHA256 in adapters/trl.py to it, MIRRORED_TRL_VERSION here, and the trl rows of "
              "adapters/_support.py (SUPPORTED, TESTED).")  # fmt: skip
        return 0
    result = check(candidate, label)
    print(report(result), end="" if result.diff.endswith("\n") else "\n")
    return 0 if result.matches else 1


if __name__ == "__main__":
    sys.exit(main())
