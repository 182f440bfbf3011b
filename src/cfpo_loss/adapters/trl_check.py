"""Does the installed TRL still have the loss methods the TRL adapter mirrors, text for text?

    python -m cfpo_loss.adapters.trl_check                    # the installed trl
    python -m cfpo_loss.adapters.trl_check --source FILE      # a grpo_trainer.py / rloo_trainer.py not installed, or
                                                              # the trl/ folder of a newer TRL wheel (repeatable)
    python -m cfpo_loss.adapters.trl_check --source F --apply # that TRL's text with our patch applied, per method
    python -m cfpo_loss.adapters.trl_check --update           # after a reviewed bump: store the installed texts

``CFPOTrainer._compute_loss`` and ``CFPORLOOTrainer._compute_loss`` (``adapters/trl/_grpo_mirror.py`` and
``_rloo_mirror.py``) are TRL's ``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss`` copied with only the
objective swapped (every departure marked ``# CFPO:``). The exact TRL texts they mirror are stored in
``adapters/trl/mirror/<Class>._compute_loss.txt`` (TRL ``MIRRORED_TRL_VERSION``), beside
``<Class>._compute_loss.patch``, the unified diff from that text to our method (a test holds text + patch to the
code); ``adapters/trl/_guard.py`` pins the texts' sha256 and refuses to import when the installed TRL's methods hash
differently. This check says precisely whether each still matches and, when one does not, prints the unified diff
from the mirrored text to the new TRL's; ``--apply`` re-applies our patch to the new text, so a TRL bump is a reviewed
diff and a re-applied patch, not a re-copy from scratch (the bump procedure is in ``adapters/trl/__init__.py``).

This module lives beside the ``trl`` package, not in it, and reads the adapter's files as text: it imports ``trl``
(or reads ``--source``) but never ``cfpo_loss.adapters.trl``, whose import guard would refuse on a mismatch.

Exit status: 0 every checked text matches (``--apply``: every patch applied); 1 one differs (the diff is printed;
``--apply``: a hunk does not apply); 2 it cannot be checked (no trl, no source, no mirrored class in the given file).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "MIRRORED_TRL_VERSION",
    "MIRROR_DIR",
    "MIRROR_PATH",
    "TARGETS",
    "CheckResult",
    "Target",
    "check",
    "mirror_path",
    "patch_path",
    "mirrored_source",
    "method_source",
    "adapter_source",
    "departures_patch",
    "apply_patch",
]

#: the TRL release whose methods are stored in MIRROR_DIR (and copied by the adapter)
MIRRORED_TRL_VERSION = "1.16.0"
_ADAPTER_DIR = Path(__file__).resolve().parent / "trl"
MIRROR_DIR = _ADAPTER_DIR / "mirror"
_METHOD = "_compute_loss"


class Target(NamedTuple):
    trl_file: str  # the file of trl/trainer/ that defines the mirrored class
    adapter: str  # the adapter class whose _compute_loss copies it
    module: str  # the file of adapters/trl/ that holds the copy
    mixin: str  # the class in that file that holds it (the adapter class's first base)


#: mirrored TRL class -> where TRL has it and where the adapter's copy is
TARGETS = {
    "GRPOTrainer": Target("grpo_trainer.py", "CFPOTrainer", "_grpo_mirror.py", "GRPOLossMirror"),
    "RLOOTrainer": Target("rloo_trainer.py", "CFPORLOOTrainer", "_rloo_mirror.py", "RLOOLossMirror"),
}


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


def method_source(trainer_py: str | None = None, cls: str = "GRPOTrainer", method: str = _METHOD) -> str:
    """``cls.method``'s text exactly as ``inspect.getsource`` gives it (the adapter's guard hashes that).

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


def adapter_source(cls: str = "GRPOTrainer", module_text: str | None = None) -> str:
    """The adapter's copy of ``cls._compute_loss``, read from its module's text (never imported)."""
    target = TARGETS[cls]
    text = (_ADAPTER_DIR / target.module).read_text(encoding="utf-8") if module_text is None else module_text
    return method_source(text, target.mixin)


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
                             f"trl {MIRRORED_TRL_VERSION} {cls}.{_METHOD} (mirrored by {TARGETS[cls].adapter})",
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


def departures_patch(cls: str = "RLOOTrainer", module_text: str | None = None) -> str:
    """The unified diff from the mirrored TRL text of ``cls._compute_loss`` to the adapter's copy of it (read from
    its module's text, or ``module_text``): the hunks the adapter applies to TRL's method."""
    ours = TARGETS[cls].adapter
    diff, _ = _unified(mirrored_source(cls), adapter_source(cls, module_text),
                       f"trl {MIRRORED_TRL_VERSION} {cls}.{_METHOD}", f"cfpo_loss {ours}.{_METHOD}")  # fmt: skip
    return diff


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@")


class _Hunk(NamedTuple):
    header: str
    start: int  # 0-based line of ``old`` in the text the patch was made from
    old: list  # context and removed lines, in order
    new: list  # context and added lines, in order


def _hunks(patch: str) -> list[_Hunk]:
    hunks: list[_Hunk] = []
    for line in patch.splitlines(keepends=True):
        if line.startswith(("--- ", "+++ ")) and not hunks:
            continue
        match = _HUNK.match(line)
        if match:
            length = 1 if match.group(2) is None else int(match.group(2))
            start = int(match.group(1)) - (1 if length else 0)  # "-N,0": insert after line N
            hunks.append(_Hunk(line.rstrip("\n"), start, [], []))
        elif hunks and line[:1] in (" ", "-", "+", "\n"):
            body = line[1:] if line != "\n" else "\n"  # an editor may strip a blank context line's space
            if line[:1] != "+":
                hunks[-1].old.append(body)
            if line[:1] != "-":
                hunks[-1].new.append(body)
        elif not line.startswith("\\"):  # "\ No newline at end of file"
            raise ValueError(f"not a unified diff line: {line!r}")
    return hunks


def apply_patch(text: str, patch: str) -> str:
    """``text`` with the unified diff ``patch`` applied. Each hunk's old lines (context and removals) must occur in
    ``text`` exactly, after the previous hunk: at the hunk's own line number, or where the text moved, at the
    occurrence nearest it (as ``patch`` does, without fuzz). Raises ValueError naming the first hunk that does not
    apply."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    done = 0  # lines[:done] are in out
    for number, hunk in enumerate(_hunks(patch), 1):
        n = len(hunk.old)
        places = [i for i in range(done, len(lines) - n + 1) if lines[i : i + n] == hunk.old]
        if not places:
            raise ValueError(f"hunk {number} ({hunk.header}) does not apply: its lines are not in the text")
        at = min(places, key=lambda i: abs(i - hunk.start))
        out += lines[done:at] + hunk.new
        done = at + n
    return "".join(out + lines[done:])


def report(result: CheckResult) -> str:
    target = TARGETS[result.cls]
    head = f"{result.candidate_label} {result.cls}.{_METHOD}: sha256 {result.candidate_sha256}"
    if result.matches:
        return (
            f"MATCH: {head}\n"
            f"  is exactly the trl {MIRRORED_TRL_VERSION} text that {target.adapter}.{_METHOD} mirrors; the objective "
            "swap still applies as written."
        )
    return (
        f"DIFFERS: {head}\n"
        f"  mirrored trl {MIRRORED_TRL_VERSION} text has sha256 {result.mirrored_sha256}; {result.changed_lines} "
        "line(s) removed or added.\n"
        f"  Review the diff below and apply it to {target.adapter}.{_METHOD} in cfpo_loss/adapters/trl/{target.module} "
        "(its own departures are marked `# CFPO:`; --apply re-applies them to the new text), then follow the bump "
        "procedure in cfpo_loss/adapters/trl/__init__.py.\n\n" + result.diff
    )


def _sources(paths: Sequence[str]) -> list[tuple[str, str, str]]:
    """(class, method text, label) for every mirrored class in the given files, or in a trl/ (or trl/trainer/)
    folder's grpo_trainer.py and rloo_trainer.py."""
    out = []
    for src in paths:
        path = Path(src)
        if path.is_dir():
            folder = path / "trainer" if (path / "trainer").is_dir() else path
            for cls, target in TARGETS.items():
                text = (folder / target.trl_file).read_text(encoding="utf-8")
                out.append((cls, method_source(text, cls), str(folder / target.trl_file)))
            continue
        text = path.read_text(encoding="utf-8")
        classes = _classes_in(text)
        if not classes:
            raise ValueError(f"no class {' or '.join(TARGETS)} in the given source {src}")
        out += [(cls, method_source(text, cls), src) for cls in classes]
    return out


def _apply(candidates) -> int:
    status = 0
    for cls, candidate, label in candidates:
        target = TARGETS[cls]
        try:
            ours = apply_patch(candidate, patch_path(cls).read_text(encoding="utf-8"))
        except ValueError as exc:
            print(f"DOES NOT APPLY: {label} {cls}.{_METHOD} with {patch_path(cls).name}: {exc}. Merge that hunk "
                  f"by hand into {target.adapter}.{_METHOD} (cfpo_loss/adapters/trl/{target.module}).")  # fmt: skip
            status = 1
            continue
        print(
            f"APPLIED: {label} {cls}.{_METHOD} + {patch_path(cls).name}, the new {target.adapter}.{_METHOD} "
            f"(for cfpo_loss/adapters/trl/{target.module}):\n{ours}",
            end="" if ours.endswith("\n") else "\n",
        )
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfpo_loss.adapters.trl_check", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        metavar="PATH",
        action="append",
        help="check this trl/trainer/grpo_trainer.py or "
        "rloo_trainer.py (a trl/ or trl/trainer/ folder: both) instead of the installed trl; "
        "repeatable",
    )
    parser.add_argument(
        "--apply",
        action="store_true",
        help="print each method of the checked TRL with our stored "
        "patch applied (the new adapter method), or the hunk that does not apply",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="store the installed trl's texts as the mirrored texts "
        "(after the reviewed diffs are applied to the adapter), re-derive both patches from the code, "
        "and print the sha256 values for adapters/trl/_guard.py",
    )
    args = parser.parse_args(argv)
    if args.update and (args.source or args.apply):
        parser.error("--update stores the installed trl's texts; it takes neither --source nor --apply")
    try:
        if args.source:
            candidates = _sources(args.source)
        else:
            import trl

            candidates = [(cls, method_source(None, cls), f"installed trl {trl.__version__}") for cls in TARGETS]
    except (ImportError, AttributeError, OSError, TypeError, ValueError, SyntaxError) as exc:
        print(f"CANNOT CHECK: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.apply:
        return _apply(candidates)
    if args.update:
        for cls, candidate, label in candidates:
            mirror_path(cls).write_text(candidate, encoding="utf-8")
            print(f"stored {label}'s {cls}.{_METHOD} in {mirror_path(cls)}\nsha256 {sha256(candidate)} "
                  f"(adapters/trl/_guard.py, MIRRORED_SHA256[{cls!r}])")  # fmt: skip
        for cls, target in TARGETS.items():
            patch_path(cls).write_text(departures_patch(cls), encoding="utf-8")
            print(f"stored {target.adapter}.{_METHOD}'s departures from it in {patch_path(cls)}")
        print("Now set those sha256 values in adapters/trl/_guard.py, MIRRORED_TRL_VERSION here, and the trl rows of "
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
