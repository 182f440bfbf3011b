"""tests/ has no packages: pytest's default import mode puts each test folder on sys.path and imports each test and
helper module by its file name, so two files of one name in different folders stop a plain `pytest tests` at
collection ("import file mismatch") in an environment where both folders collect (conftest.py excepted: pytest
imports those by path)."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique_across_folders():
    modules = [p for p in TESTS.rglob("*.py") if p.name != "conftest.py" and "standins" not in p.parts]
    names = Counter(p.name for p in modules)
    assert len(modules) > 20  # the folder was found
    assert [n for n, k in names.items() if k > 1] == []
