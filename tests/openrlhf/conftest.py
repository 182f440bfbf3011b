"""OpenRLHF adapter tests: run in the `openrlhf` nox session (real openrlhf==0.11.2, CPU).

flash_attn and vllm are import-only stand-ins from ./standins (put on sys.path by a .pth file that the
nox session writes into its venv); every name in them raises if called. The code under test never
goes through them: the policy loss, the CLI parser and Ray's worker setup hook do not call them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

if importlib.util.find_spec("openrlhf") is None:  # e.g. `pytest tests` in the core env
    collect_ignore_glob = ["test_*.py"]
else:
    collect_ignore_glob = []


def _site_root() -> Path:
    """The directory that holds the installed ``openrlhf`` package (and the wheel's ``tests`` package)."""
    return Path(importlib.util.find_spec("openrlhf").origin).resolve().parents[1]


# A Ray cluster in its own process, as `ray start` would run it. num_gpus declares logical GPU resources only:
# OpenRLHF's PolicyModelActor (and a vLLM engine) asks Ray for one GPU each (test_async.py runs three OpenRLHF jobs
# at once); there is no GPU, and the actor's first CUDA call fails, which test_async.py records.
RAY_CLUSTER = """
import sys, ray
ray.init(num_cpus=8, num_gpus=6, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()   # hold the cluster until the test closes stdin; then ray.shutdown() at exit
"""


@pytest.fixture(scope="session")
def cluster_address():
    """The address of a running Ray cluster (pass it as RAY_ADDRESS), shared by the Ray tests."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    holder = subprocess.Popen(
        [sys.executable, "-c", RAY_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        address = holder.stdout.readline().strip()
        assert address, "the Ray cluster did not start"
        yield address
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


@pytest.fixture(scope="session")
def openrlhf_root() -> Path:
    return _site_root()


@pytest.fixture(scope="session")
def native_loss_module():
    """A fresh, never-patched copy of OpenRLHF's own ``openrlhf/models/loss.py`` (and its ``utils.py``),
    loaded from the installed source files the way OpenRLHF's own tests load it: the reference."""
    models = _site_root() / "openrlhf" / "models"
    pkg_name = "_cfpo_native_openrlhf_models"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(models)]
    sys.modules[pkg_name] = pkg
    for name in ("utils", "loss"):
        spec = importlib.util.spec_from_file_location(f"{pkg_name}.{name}", models / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    loss = sys.modules[f"{pkg_name}.loss"]
    assert not hasattr(loss.PolicyLoss, "__cfpo_loss_patch__")
    return loss


@pytest.fixture(scope="session")
def patched_policy_loss():
    """openrlhf.models.loss.PolicyLoss after install()."""
    from cfpo_loss.adapters.openrlhf import install

    install()
    from openrlhf.models.loss import PolicyLoss

    return PolicyLoss


def pytest_report_header(config):
    lines = []
    for name in ("flash_attn", "vllm"):
        spec = importlib.util.find_spec(name)
        where = "absent" if spec is None else spec.origin
        standin = spec is not None and str(HERE / "standins") in str(spec.origin)
        lines.append(f"{name}: {'TEST STAND-IN' if standin else 'real'} ({where})")
    return lines
