"""Every Python block of the docs is a test: Sybil collects README.md, the files the site includes and docs/**.md.

`pytest README.md README.pypi.md CHANGELOG.md CONTRIBUTING.md benchmarks/README.md docs` (the `docs` nox session,
and the trl / verl / openrlhf sessions after their own tests) runs each page's ```python blocks in order, in one
namespace per page. That namespace starts with five booleans, so a block that needs more than the core says so in
the HTML comment before it, and is skipped, with its reason shown by `pytest -rs`, where that is missing:

    <!-- skip: next if(not has_trl, reason="needs trl: runs in nox -s trl") -->
    <!-- skip: next if(not has_verl, reason="needs verl: runs in nox -s verl") -->
    <!-- skip: next if(not has_openrlhf, reason="needs openrlhf: runs in nox -s openrlhf") -->
    <!-- skip: next if(not has_skyrl, reason="needs skyrl: runs in nox -s skyrl") -->
    <!-- skip: next if(not has_areal, reason="needs areal: runs in nox -s areal") -->
    <!-- skip: next "needs a GPU" -->

Sessions without sybil (core, package) never collect Markdown, so the import is optional.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parent
#: the Markdown outside docs/ whose text is on the site or on PyPI (docs/*.md include the last three)
DOC_FILES = {"README.md", "README.pypi.md", "CHANGELOG.md", "CONTRIBUTING.md", "benchmarks/README.md"}

try:
    from sybil import Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
except ImportError:  # the core / package sessions: no Markdown to collect
    Sybil = None


def _namespace(namespace: dict) -> None:
    import torch

    namespace.update(
        has_trl=importlib.util.find_spec("trl") is not None,
        has_verl=importlib.util.find_spec("verl") is not None,
        has_openrlhf=importlib.util.find_spec("openrlhf") is not None,
        has_skyrl=importlib.util.find_spec("skyrl") is not None,
        has_areal=importlib.util.find_spec("areal") is not None,
        has_cuda=torch.cuda.is_available(),
    )


def pytest_terminal_summary(terminalreporter):
    """The largest error-to-bound ratio of every fp32-vs-oracle comparison made with cfpo_loss.reference's
    assert_within in this run: how close the suite's derived rounding bounds came to failing (CI's log shows it)."""
    import sys

    reference = sys.modules.get("cfpo_loss.reference")
    ratios = getattr(reference, "_RATIOS", None)
    if ratios:
        worst, what = max(ratios)
        terminalreporter.write_line(
            f"rounding bounds: {len(ratios)} comparisons, largest error/bound {worst:.3g} ({what})"
        )


if Sybil is not None:
    import pytest

    _collect = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()], patterns=["*.md"], setup=_namespace).pytest()

    def pytest_collect_file(file_path: Path, parent):
        try:
            relative = file_path.resolve().relative_to(ROOT.resolve())
        except ValueError:
            return None
        if relative.as_posix() in DOC_FILES or relative.parts[0] == "docs":
            return _collect(file_path, parent)
        return None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        """A skipped block is reported at its own file and line (`pytest -rs`), not where Sybil raised the skip."""
        outcome = yield
        report = outcome.get_result()
        example = getattr(item, "example", None)
        if example is not None and report.skipped and isinstance(report.longrepr, tuple):
            report.longrepr = (str(item.path), example.line, report.longrepr[2])
