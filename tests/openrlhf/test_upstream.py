"""OpenRLHF's own tests (shipped in the openrlhf wheel as a top-level ``tests`` package: 221 of them in
0.11.2, 17 in 0.10.4) still pass with the cfpo patch installed, their PolicyLoss copies patched too
(cfpo_openrlhf_upstream_plugin). All of them run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orl_compat import API

HERE = Path(__file__).resolve().parent


def test_openrlhf_test_suite_passes_with_the_patch(openrlhf_root, tmp_path):
    suite = openrlhf_root / "tests"
    assert (suite / "test_loss_aggregation.py").exists(), "the openrlhf wheel's tests/ package is missing"
    report = tmp_path / "report.json"
    env = dict(
        os.environ,
        CFPO_UPSTREAM_REPORT=str(report),
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "cfpo_openrlhf_upstream_plugin",
        "--rootdir",
        str(suite),
        str(suite),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= (150 if API == "is_correction" else 15), summary
    data = json.loads(report.read_text())
    # the loss tests' private copy of models/loss.py was patched and its patched forward really ran
    assert any(name.startswith("_openrlhf_loss_test.loss.PolicyLoss") for name in data["patched_classes"]), data
    assert data["patched_forward_calls"] >= (10 if API == "is_correction" else 5), data
