"""A Ray actor started under the launcher's Ray init has the cfpo loss without importing cfpo_loss.

The cluster is an existing one (conftest.py starts it in a separate process, as `ray start` would), reached
through RAY_ADDRESS - the way a user points OpenRLHF at a cluster. The launcher does not start Ray
itself: OpenRLHF's own ray.init call, made through the launcher, connects to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from orl_bounds import rounding_bounds

import cfpo_loss
from cfpo_loss.reference import assert_within

HERE = Path(__file__).resolve().parent


def _probe(mode, address, tmp_path):
    out = tmp_path / f"ray-{mode}.json"
    env = dict(os.environ, RAY_ADDRESS=address)
    proc = subprocess.run(
        [sys.executable, str(HERE / "ray_probe.py"), mode, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=480,
    )
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _expected():
    sys.path.insert(0, str(HERE))
    try:
        from ray_probe import BATCH
    finally:
        sys.path.remove(str(HERE))
    log_probs = torch.tensor(BATCH["log_probs"], requires_grad=True)
    out = cfpo_loss.compute_policy_loss(
        log_probs,
        torch.tensor(BATCH["old_log_probs"]),
        torch.tensor(BATCH["advantages"]),
        torch.tensor(BATCH["action_mask"]).bool(),
        objective="cfpo",
        eps_low=0.2,
        eps_high=0.28,
    )
    out.loss.backward()
    batch = {k: torch.tensor(v) for k, v in BATCH.items()}
    return out, log_probs.grad, rounding_bounds(batch, eps=(0.2, 0.28))[0]


def test_ray_actors_under_the_launcher_compute_the_cfpo_loss(cluster_address, tmp_path):
    record = _probe("launcher", cluster_address, tmp_path)
    assert record["errors"] == []
    assert record["gcs_address"] == cluster_address  # the user's cluster, not a new one
    assert record["job_runtime_env"]["worker_process_setup_hook"] == "cfpo_loss.adapters.openrlhf.install_on_import"
    assert record["job_runtime_env"]["env_vars"]["NCCL_DEBUG"] == "WARN"  # OpenRLHF's own runtime_env kept
    expected, expected_grad, bound = _expected()
    # the hook itself loads no OpenRLHF / DeepSpeed into a worker (OpenRLHF's vLLM engines stay clean)
    assert record["modules_at_start"] == [{"cfpo_loss": True, "openrlhf": False, "deepspeed": False}] * 2
    results = record["results"]
    assert len(results) == 2 and len({r["pid"] for r in results}) == 2
    for r in results:
        assert r["cfpo_loss_imported_by_setup_hook"] is True
        # the worker aggregates the core's per-token loss with OpenRLHF's aggregate_loss, the driver with the core's:
        # two fp32 evaluations written differently, within twice the derived bound
        assert_within(r["loss"], expected.loss.item(), 2 * bound.loss, "Ray actor loss")
        assert_within(torch.tensor(r["grad"]), expected_grad, 2 * bound.grad, "Ray actor d loss / d log_probs")
        # exact: the core's exit count over the valid-token count (integers, one correctly rounded division)
        assert r["clip_ratio"] == expected.metrics["tr_exit_frac"].item()


def test_without_the_launcher_ray_workers_do_not_have_it(cluster_address, tmp_path):
    record = _probe("plain", cluster_address, tmp_path)
    assert record["results"] == []
    assert len(record["errors"]) == 2 and all("Invalid policy loss type: cfpo" in e for e in record["errors"])
