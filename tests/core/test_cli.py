import subprocess
import sys

import torch

import cfpo_loss


def test_python_m_cfpo_loss_reports_versions():
    out = subprocess.run([sys.executable, "-m", "cfpo_loss"], capture_output=True, text=True, check=True).stdout
    assert f"cfpo_loss {cfpo_loss.__version__}" in out
    assert f"torch {torch.__version__}" in out
    for name in ("trl", "verl", "openrlhf"):
        assert any(line.startswith(f"{name}: ") for line in out.splitlines()), out


def test_core_import_pulls_in_no_framework():
    code = "import sys, cfpo_loss; print(sorted({'trl','verl','openrlhf','transformers','ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
