"""docs/troubleshooting.md names every error and warning the package raises.

The messages are read from the source with ``ast`` (nothing is imported, so the adapters are covered in the core
session, where their frameworks are absent): every ``raise SomeError(<message>)`` and ``warnings.warn(<message>)``
in ``src/cfpo_loss``. A message is a string, an f-string, a ``+`` concatenation of them, or a local name assigned
one of those earlier in the same function. Its key is its longest literal fragment (at most 60 characters), or,
where every literal fragment is short (a message made mostly of placeholders), the message's template with each
placeholder written ``{…}``, cut at 60 characters. The page must contain each key, with whitespace collapsed; a
``{…}`` in a key matches either a ``{placeholder}`` on the page or a value written out (``'cfpo', 'clip'``). A new
raise without an entry on the page fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "cfpo_loss"
PAGE = ROOT / "docs" / "troubleshooting.md"
PLACEHOLDER = "{…}"
KEY_LENGTH = 60
#: below this many characters the longest literal fragment is not distinctive: use the template instead
MIN_FRAGMENT = 20


def _parts(node: ast.expr, assigned: dict[str, list[ast.Assign]], line: int) -> list[str | None]:
    """The message's literal fragments in order, None for each placeholder (a formatted or unknown value)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else None for v in node.values]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _parts(node.left, assigned, line) + _parts(node.right, assigned, line)
    if isinstance(node, ast.Name):
        earlier = [a for a in assigned.get(node.id, []) if a.lineno < line]
        if earlier:
            return _parts(earlier[-1].value, assigned, line)
    return [None]


def _message_calls(tree: ast.AST):
    """(call, enclosing function or module) for every raise of a call and every warnings.warn call."""
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]
    for scope in scopes:
        inner = {id(n) for s in ast.iter_child_nodes(scope) for n in _nested_functions(s)}
        for node in ast.walk(scope):
            if id(node) in inner:
                continue
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                yield node.exc, scope
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "warn"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "warnings"
            ):
                yield node, scope


def _nested_functions(node: ast.AST):
    """Every node inside a function defined within ``node`` (those belong to that function's own scope)."""
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from (m for m in ast.walk(n) if m is not n)


def _key(parts: list[str | None]) -> str:
    fragments = [" ".join(p.split()) for p in parts if p]
    longest = max(fragments, key=len, default="")
    if len(longest) >= MIN_FRAGMENT:
        return longest[:KEY_LENGTH]
    template = "".join(PLACEHOLDER if p is None else p for p in parts)
    return " ".join(template.split())[:KEY_LENGTH].strip()


def messages() -> list[tuple[str, str]]:
    """(``path:line``, key) for every message in the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call, scope in _message_calls(tree):
            assigned: dict[str, list[ast.Assign]] = {}
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    assigned.setdefault(node.targets[0].id, []).append(node)
            for nodes in assigned.values():
                nodes.sort(key=lambda a: a.lineno)
            where = f"{path.relative_to(SRC)}:{call.lineno}"
            if not call.args:  # a bare exception class call: nothing to document but its type
                continue
            found.append((where, _key(_parts(call.args[0], assigned, call.lineno))))
    return found


def page_text() -> str:
    return " ".join(PAGE.read_text(encoding="utf-8").split())


def on_page(key: str, text: str) -> bool:
    """Whether ``key`` occurs in ``text``, each ``{…}`` standing for a short run of any characters."""
    pattern = r".{1,80}?".join(re.escape(piece) for piece in key.split(PLACEHOLDER))
    return re.search(pattern, text) is not None


MESSAGES = messages()


def test_the_source_has_messages():
    # the extraction itself works: the core's argument checks and the adapters' refusals are all seen
    files = {where.split(":")[0] for where, _ in MESSAGES}
    assert {"_checks.py", "loss.py", "fused.py", "advantages.py", "aggregation.py"} <= files
    assert {"adapters/verl/_bypass.py", "adapters/trl/_fused.py", "adapters/openrlhf/__init__.py"} <= files
    assert len(MESSAGES) > 80
    assert all(key and key != PLACEHOLDER for _, key in MESSAGES)


def test_placeholders_match_written_values_and_nothing_else():
    assert on_page("unknown objective {…}; valid: {…}", "raises unknown objective {name!r}; valid: 'cfpo', 'clip'")
    assert not on_page("unknown objective {…}; valid: {…}", "unknown objective; the valid ones")
    assert not on_page("eps_low must lie in (0, 1)", "eps_low must lie in [0, 1)")


@pytest.mark.parametrize(("where", "key"), MESSAGES, ids=[where for where, _ in MESSAGES])
def test_every_message_is_on_the_troubleshooting_page(where, key):
    assert on_page(key, page_text()), (
        f"{where} raises or warns with a message that docs/troubleshooting.md does not name; add an entry "
        f"(cause and fix) containing: {key!r}"
    )
