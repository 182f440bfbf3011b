"""The docs cannot drift from the code: the metric table, the nav, the README's size and test command, the PyPI text.

(The docs' code blocks are tests too: conftest.py at the repository root, run by `nox -s docs`.)
"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

from cfpo_loss.adapters._metric_names import markdown_table

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _mkdocs_block(key: str) -> list[str]:
    """The lines of a top-level mkdocs.yml key (without PyYAML, which the core session does not install)."""
    lines = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"{key}:")))
    block = [lines[start].partition(":")[2]]
    for line in lines[start + 1 :]:
        if line and not line[0].isspace() and not line.startswith("#"):
            break
        block.append(line)
    return block


def test_metrics_page_holds_the_adapters_table():
    page = (DOCS / "metrics.md").read_text(encoding="utf-8")
    assert markdown_table() in page, "docs/metrics.md: paste cfpo_loss.adapters._metric_names.markdown_table() again"


def test_every_page_is_in_the_nav():
    nav = {m[1] for line in _mkdocs_block("nav") if (m := re.search(r":\s*(\S+\.md)\s*$", line))}
    not_in_nav = [line.strip().lstrip("/") for line in _mkdocs_block("not_in_nav")[1:] if line.strip()]
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    unlisted = {p for p in pages - nav if not any(fnmatch(p, pattern) for pattern in not_in_nav)}
    assert not unlisted, f"pages missing from mkdocs.yml's nav: {sorted(unlisted)}"
    assert nav <= pages, f"nav entries without a page: {sorted(nav - pages)}"


def test_readme_is_a_landing_page_with_ci_s_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150, "README.md is the landing page: at most 150 lines, the rest goes to docs/"
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in run.splitlines() if "nox" in line and "pip install" in line)
    command = command.split("&&", 1)[0].split("pip install", 1)[1].replace("-q", "").split()  # the pinned nox
    assert f"python3 -m pip install {' '.join(command)} && python3 -m nox" in readme, (
        "README.md must show the command .ci/run runs"
    )


def test_long_description_stands_alone():
    """PyPI resolves no relative link or image: the package's long description must have none."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.M)[1]
    text = (ROOT / readme).read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)", text)
    relative = [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I)]
    assert not relative, f"{readme} is the PyPI description: relative links there break: {relative}"


def test_the_sessions_run_the_markdown_conftest_collects():
    """noxfile.DOC_TESTS (what the sessions pass to pytest) and conftest.DOC_FILES (what Sybil collects) name the same
    files: a page added to one list only would be collected but never run, or passed to pytest and not collected."""
    import ast

    def assigned(path: Path, name: str):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return next(
            ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            and name
            in [getattr(t, "id", None) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
        )

    assert set(assigned(ROOT / "noxfile.py", "DOC_TESTS")) == assigned(ROOT / "conftest.py", "DOC_FILES") | {"docs"}


def test_the_clip_is_flat_on_one_side_only_as_the_docs_say():
    """The clipped objective's gradient is 0 only past the bound the advantage pushes r towards; beyond the other
    bound it is A. The pages that summarise the objective say exactly that, and none says "0 outside"."""
    import torch

    from cfpo_loss import clipped_surrogate

    def gradient(r: float, a: float) -> float:
        ratio = torch.tensor([r], requires_grad=True)
        (grad,) = torch.autograd.grad(clipped_surrogate(ratio, torch.tensor([a]), 0.2, 0.28).sum(), ratio)
        return grad.item()

    assert gradient(1.5, 1.0) == 0.0 and gradient(0.5, -1.0) == 0.0  # A > 0, r > 1 + ε; A < 0, r < 1 − ε: flat
    assert gradient(0.5, 1.0) == 1.0 and gradient(1.5, -1.0) == -1.0  # the other side: A
    assert gradient(1.1, 1.0) == 1.0 and gradient(0.9, -1.0) == -1.0  # inside: A
    for page in ("README.md", "README.pypi.md", "docs/objective.md"):
        text = " ".join((ROOT / page).read_text(encoding="utf-8").split())
        assert "(r > 1 + ε with A > 0, r < 1 − ε with A < 0)" in text, f"{page}: the one-sided flatness, stated"
        assert "on the other side the gradient is still A" in text, page
        for wrong in ("0 outside", "outside that interval", "flat beyond 1 ± ε"):
            assert wrong not in text, f"{page} says {wrong!r}: the clip is flat on one side only"


def test_the_install_commands_work_today():
    """cfpo-loss is not on the package index: page one says so and gives the commands that work (a clone, the wheel
    `nox -s package` builds, named with the current version), and a torch line that really gives a CPU build."""
    from cfpo_loss import __version__

    cpu_torch = "--index-url https://download.pytorch.org/whl/cpu"
    for page in ("README.md", "docs/getting-started.md"):
        text = " ".join((ROOT / page).read_text(encoding="utf-8").split())
        assert "not on the package index yet" in text, f"{page}: say that `pip install cfpo-loss` fails today"
        assert 'pip install "./cfpo_loss[trl]"' in text, f"{page}: the install from a clone"
        assert f"cfpo_loss-{__version__}-py3-none-any.whl" in text, f"{page}: the wheel, named as it is built"
        assert cpu_torch in text, f"{page}: a CPU torch comes from PyTorch's CPU index, not from PyPI"
        assert "pip install torch==2.13.0`" not in text, f"{page}: a bare pin gives PyPI's CUDA build"


def test_every_args_entry_names_one_parameter_of_its_function():
    """The API page renders a docstring's `Args:` entry as a parameter with its type and default only when the entry
    names exactly one parameter of the signature; "eps_low, eps_high: ..." renders as an untyped "required" one."""
    import ast

    entry = re.compile(r"^(?P<indent> *)(?P<name>\*{0,2}[A-Za-z_][\w, *]*?)(?: \([^)]*\))?: ")
    wrong = []
    for path in sorted((ROOT / "src" / "cfpo_loss").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not ast.get_docstring(node):
                continue
            lines = ast.get_docstring(node).splitlines()
            if "Args:" not in [line.strip() for line in lines]:
                continue
            params = {a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)}
            params |= {f"*{a.arg}" for a in [node.args.vararg] if a} | {f"**{a.arg}" for a in [node.args.kwarg] if a}
            start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
            indent = len(lines[start]) - len(lines[start].lstrip()) + 4
            for line in lines[start + 1 :]:
                if line.strip() and len(line) - len(line.lstrip()) < indent:
                    break  # the next section
                m = entry.match(line)
                if m and len(m["indent"]) == indent and m["name"].lstrip("*") not in {p.lstrip("*") for p in params}:
                    wrong.append(f"{path.relative_to(ROOT)}: {node.name}: {m['name']!r}")
    assert not wrong, "Args: entries that are not one parameter of the signature:\n" + "\n".join(wrong)


#: what a reader of the repository, the package or the site does not have: the maintainers' design notes, their
#: issue tracker's numbers, the work sessions and the lent machines the text was written in (a nox session is fine)
INTERNAL = {
    "a design file": re.compile(r"\bDESIGN\b|(?<![\w.-])shared/"),
    "an issue number": re.compile(r"\bissues? \d+", re.I),
    "a work session": re.compile(
        r"\bnext session\b|\bsession (lent|of \d{4})|\bthis session's changes|"
        r"\b(a|the) session with (a GPU|less)",
        re.I,
    ),
    "a lent machine": re.compile(r"\blent\b|\bdevice call\b|\bcarr(y|ied)\b[^.\n]{0,30}\.whl", re.I),
}
#: the files a reader gets: the package, the site's sources, the repository's docs, tests, benchmarks and tooling
PUBLIC = ["README.md", "README.pypi.md", "CHANGELOG.md", "CONTRIBUTING.md", "noxfile.py", "pyproject.toml",
          "mkdocs.yml", "conftest.py", "src", "docs", "tests", "benchmarks", "examples", ".ci"]  # fmt: skip
#: third-party text kept byte for byte (the adapters' fingerprints guard it) and raw benchmark logs
NOT_OURS = ("src/cfpo_loss/adapters/trl/mirror/", "src/cfpo_loss/adapters/areal/fingerprinted/", "benchmarks/results/")


def test_no_reference_to_notes_issues_or_sessions_a_reader_does_not_have():
    found = []
    for top in PUBLIC:
        paths = [ROOT / top] if (ROOT / top).is_file() else sorted((ROOT / top).rglob("*"))
        for path in paths:
            relative = path.relative_to(ROOT).as_posix()
            if path.suffix not in {".md", ".py", ".sh", ".toml", ".yml", ".yaml", ".txt", ".css", ""} or any(
                relative.startswith(p) for p in NOT_OURS
            ):
                continue
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                found += [
                    f"{relative}:{n}: {what}: {line.strip()[:100]}" for what, p in INTERNAL.items() if p.search(line)
                ]
    # this file names the patterns themselves
    found = [f for f in found if not f.startswith("tests/core/test_docs.py:")]
    assert not found, "references a reader cannot follow:\n" + "\n".join(found)


#: the longest code line the site shows without a scroll bar at 1280 px is ~118 characters (tests/docs measures it in
#: a browser); this leaves a few for another monospace font, and runs without a browser
CODE_WIDTH = 116


def test_code_lines_fit_the_site_without_a_scroll_bar():
    fence = re.compile(r"^\s*(`{3,}|~{3,})[\w+-]*\s*$")
    pages = [ROOT / p for p in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md", "benchmarks/README.md")]
    too_long = []
    for page in [*pages, *sorted(DOCS.rglob("*.md"))]:
        in_code = False
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if fence.match(line):
                in_code = not in_code
            elif in_code and len(line) > CODE_WIDTH:
                too_long.append(f"{page.relative_to(ROOT)}:{n}: {len(line)} characters")
    assert not too_long, f"code lines over {CODE_WIDTH} characters (a scroll bar on the site):\n" + "\n".join(too_long)
