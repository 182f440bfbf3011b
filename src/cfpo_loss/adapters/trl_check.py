"""Does the installed TRL still have the loss methods the TRL adapter mirrors, text for text?

    python -m cfpo_loss.adapters.trl_check                    # the installed trl
    python -m cfpo_loss.adapters.trl_check --source FILE      # a grpo_trainer.py / rloo_trainer.py not installed, or
                                                              # the trl/ folder of a newer TRL wheel (repeatable)
    python -m cfpo_loss.adapters.trl_check --update           # after a reviewed bump: store the installed texts

``CFPOTrainer._compute_loss`` and ``CFPORLOOTrainer._compute_loss`` (``adapters/trl.py``) are TRL's
``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss`` copied with only the objective swapped (every
departure marked ``# CFPO:``). The exact TRL texts they mirror are stored beside this file
(``trl_mirror/<Class>._compute_loss.txt``, TRL ``MIRRORED_TRL_VERSION``); ``adapters/trl.py`` pins their sha256 and
refuses to import when the installed TRL's methods hash differently. This check says precisely whether each still
matches and, when one does not, prints the unified diff from the mirrored text to the new TRL's, so a TRL bump is a
reviewed diff applied to the copy, not a re-copy from scratch (the bump procedure is in ``adapters/trl.py``'s
docstring). The RLOO copy's own departures from TRL's text are stored as ``trl_mirror/RLOOTrainer._compute_loss.patch``
(``--update`` rewrites it from ``adapters/trl.py``'s text; a test holds it to the code). It imports ``trl`` (or reads
``--source``) but never ``cfpo_loss.adapters.trl``, which would refuse to import on a mismatch.

Exit status: 0 every checked text matches; 1 one differs (the diff is printed); 2 it cannot be checked (no trl, no
source, no mirrored class in the given file).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

__all__ = ["MIRRORED_TRL_VERSION", "MIRROR_DIR", "MIRROR_PATH", "TARGETS", "CheckResult", "check", "mirror_path",
           "patch_path", "mirrored_source", "method_source", "departures_patch"]

#: the TRL release whose methods are stored in MIRROR_DIR (and copied by the adapter)
MIRRORED_TRL_VERSION = "1.16.0"
MIRROR_DIR = Path(__file__).resolve().parent / "trl_mirror"
_METHOD = "_compute_loss"
#: mirrored TRL class -> (the file of trl/trainer/ that defines it, the adapter class that copies its _compute_loss)
TARGETS = {
    "GRPOTrainer": ("grpo_trainer.py", "CFPOTrainer"),
    "RLOOTrainer": ("rloo_trainer.py", "CFPORLOOTrainer"),
}
_ADAPTER_PY = Path(__file__).resolve().parent / "trl.py"
#: the adapter classes whose departures from TRL's text are stored as a patch beside the mirrored text
_PATCHED = ("RLOOTrainer",)


def mirror_path(cls: str = "GRPOTrainer") -> Path:
    return MIRROR_DIR / f"{cls}.{_METHOD}.txt"


MIRROR_PATH = mirror_path("GRPOTrainer")  # the first mirrored text (kept for callers of the one-method check)


def patch_path(cls: str) -> Path:
    return MIRROR_DIR / f"{cls}.{_METHOD}.patch"


class CheckResult(NamedTuple):
    matches: bool
    mirrored_sha256: str
    candidate_sha256: str
    candidate_label: str
    diff: str  # unified diff mirrored -> candidate ("" when they match)
    changed_lines: int  # lines removed + added
    cls: str = "GRPOTrainer"  # the mirrored TRL class


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mirrored_source(cls: str = "GRPOTrainer") -> str:
    """The stored text of trl==MIRRORED_TRL_VERSION's ``cls._compute_loss`` (what the adapter copies)."""
    return mirror_path(cls).read_text(encoding="utf-8")


def method_source(trainer_py: Optional[str] = None, cls: str = "GRPOTrainer", method: str = _METHOD) -> str:
    """``cls.method``'s text exactly as ``inspect.getsource`` gives it (the adapter hashes that).

    From the installed trl when ``trainer_py`` is None, else parsed out of that file's text.
    """
    if trainer_py is None:
        import inspect

        import trl

        return inspect.getsource(getattr(getattr(trl, cls), method))
    tree = ast.parse(trainer_py)
    lines = trainer_py.splitlines(keepends=True)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
                    start = min([item.lineno, *(d.lineno for d in item.decorator_list)]) - 1
                    return "".join(lines[start : item.end_lineno])
            raise ValueError(f"class {cls} has no method {method}")
    raise ValueError(f"no class {cls} in the given source")


def _classes_in(trainer_py: str) -> list[str]:
    """The mirrored classes a source file defines."""
    names = {node.name for node in ast.parse(trainer_py).body if isinstance(node, ast.ClassDef)}
    return [cls for cls in TARGETS if cls in names]


def _unified(a: str, b: str, fromfile: str, tofile: str) -> tuple[str, int]:
    lines = list(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), fromfile=fromfile,
                                      tofile=tofile))  # fmt: skip
    changed = sum(1 for ln in lines if ln[:1] in "+-" and not ln.startswith(("+++", "---")))
    return "".join(ln if ln.endswith("\n") else ln + "\n" for ln in lines), changed


def check(candidate: str, label: str = "installed", cls: str = "GRPOTrainer") -> CheckResult:
    """Compare ``candidate`` (a ``cls._compute_loss`` text) with the mirrored text."""
    mirrored = mirrored_source(cls)
    diff, changed = _unified(mirrored, candidate,
                             f"trl {MIRRORED_TRL_VERSION} {cls}.{_METHOD} (mirrored by {TARGETS[cls][1]})",
                             f"{label} {cls}.{_METHOD}")  # fmt: skip
    return CheckResult(
        matches=candidate == mirrored,
        mirrored_sha256=sha256(mirrored),
        candidate_sha256=sha256(candidate),
        candidate_label=label,
        diff=diff,
        changed_lines=changed,
        cls=cls,
    )


def departures_patch(cls: str = "RLOOTrainer", adapter_py: Optional[str] = None) -> str:
    """The unified diff from the mirrored TRL text of ``cls._compute_loss`` to the adapter's copy of it (read from
    ``adapters/trl.py``'s text, never imported): the hunks the adapter applies to TRL's method."""
    text = _ADAPTER_PY.read_text(encoding="utf-8") if adapter_py is None else adapter_py
    ours = TARGETS[cls][1]
    diff, _ = _unified(mirrored_source(cls), method_source(text, ours),
                       f"trl {MIRRORED_TRL_VERSION} {cls}.{_METHOD}", f"cfpo_loss {ours}.{_METHOD}")  # fmt: skip
    return diff


def report(result: CheckResult) -> str:
    ours = TARGETS[result.cls][1]
    head = f"{result.candidate_label} {result.cls}.{_METHOD}: sha256 {result.candidate_sha256}"
    if result.matches:
        return (
            f"MATCH: {head}\n"
            f"  is exactly the trl {MIRRORED_TRL_VERSION} text that {ours}.{_METHOD} mirrors; the objective swap still "
            "applies as written."
        )
    return (
        f"DIFFERS: {head}\n"
        f"  mirrored trl {MIRRORED_TRL_VERSION} text has sha256 {result.mirrored_sha256}; {result.changed_lines} "
        "line(s) removed or added.\n"
        f"  Review the diff below and apply it to {ours}.{_METHOD} in cfpo_loss/adapters/trl.py (its own departures "
        "are marked `# CFPO:`), then follow the bump procedure in that module's docstring.\n\n"
        + result.diff
    )


def _sources(paths: Sequence[str]) -> list[tuple[str, str, str]]:
    """(class, method text, label) for every mirrored class in the given files, or in a trl/ (or trl/trainer/)
    folder's grpo_trainer.py and rloo_trainer.py."""
    out = []
    for src in paths:
        path = Path(src)
        if path.is_dir():
            folder = path / "trainer" if (path / "trainer").is_dir() else path
            for cls, (name, _) in TARGETS.items():
                out.append((cls, method_source((folder / name).read_text(encoding="utf-8"), cls), str(folder / name)))
            continue
        text = path.read_text(encoding="utf-8")
        classes = _classes_in(text)
        if not classes:
            raise ValueError(f"no class {' or '.join(TARGETS)} in the given source {src}")
        out += [(cls, method_source(text, cls), src) for cls in classes]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfpo_loss.adapters.trl_check", description=__doc__.split("\n")[0])
    parser.add_argument("--source", metavar="PATH", action="append", help="check this trl/trainer/grpo_trainer.py or "
                        "rloo_trainer.py (a trl/ or trl/trainer/ folder: both) instead of the installed trl; "
                        "repeatable")
    parser.add_argument("--update", action="store_true", help="store the installed trl's texts as the mirrored texts "
                        "(after the reviewed diffs are applied to adapters/trl.py), rewrite the RLOO departures patch, "
                        "and print the sha256 values for adapters/trl.py")
    args = parser.parse_args(argv)
    if args.update and args.source:
        parser.error("--update stores the installed trl's texts; it does not take --source")
    try:
        if args.source:
            candidates = _sources(args.source)
        else:
            import trl

            candidates = [(cls, method_source(None, cls), f"installed trl {trl.__version__}") for cls in TARGETS]
    except (ImportError, AttributeError, OSError, TypeError, ValueError, SyntaxError) as exc:
        print(f"CANNOT CHECK: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.update:
        pins = {"GRPOTrainer": "_MIRRORED_SHA256", "RLOOTrainer": "_RLOO_MIRRORED_SHA256"}
        for cls, candidate, label in candidates:
            mirror_path(cls).write_text(candidate, encoding="utf-8")
            print(f"stored {label}'s {cls}.{_METHOD} in {mirror_path(cls)}\nsha256 {sha256(candidate)} "
                  f"(adapters/trl.py's {pins[cls]})")  # fmt: skip
        for cls in _PATCHED:
            patch_path(cls).write_text(departures_patch(cls), encoding="utf-8")
            print(f"stored {TARGETS[cls][1]}.{_METHOD}'s departures from it in {patch_path(cls)}")
        print("Now set those sha256 values in adapters/trl.py, MIRRORED_TRL_VERSION here, and the trl rows of "
              "adapters/_support.py (SUPPORTED, TESTED).")  # fmt: skip
        return 0
    status = 0
    for cls, candidate, label in candidates:
        result = check(candidate, label, cls)
        print(report(result), end="" if result.diff.endswith("\n") else "\n")
        status = max(status, 0 if result.matches else 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
