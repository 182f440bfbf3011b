"""The distributed path, for real: a local Ray cluster on the CPU, and a Ray actor whose code only
imports verl. The plugin must reach the worker process through verl's entry-point loading."""

from __future__ import annotations

import os

import pytest
import torch

ray = pytest.importorskip("ray")

from verl.trainer.ppo.core_algos import agg_loss  # noqa: E402
from verl_helpers import actor_config, global_info, make_batch  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_actor_gets_cfpo_from_a_bare_import_verl(ray_cluster):
    # Defined inside the test so Ray pickles it by value: the worker never imports this test module
    # (which imports cfpo_loss); the actor's own code imports only verl and torch.
    @ray.remote(num_cpus=1)
    class VerlWorker:
        def run(self, old, new, adv, mask, weights, mode, gbi):
            import os
            import sys

            before = sorted(m for m in sys.modules if m.startswith("cfpo_loss"))
            import torch
            import verl  # noqa: F401  - the only thing a verl worker does
            from verl.trainer.ppo.core_algos import get_policy_loss_fn
            from verl.workers.config.actor import ActorConfig, PolicyLossConfig

            cfg = ActorConfig(
                strategy="fsdp", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=mode,
                policy_loss=PolicyLossConfig(loss_mode="cfpo"), global_batch_info=gbi,
            )  # fmt: skip
            fn = get_policy_loss_fn(cfg.policy_loss.loss_mode)
            leaf = torch.tensor(new, requires_grad=True)
            loss, metrics = fn(
                torch.tensor(old), leaf, torch.tensor(adv), torch.tensor(mask), mode, cfg, torch.tensor(weights)
            )
            loss.backward()
            return {
                "pid": os.getpid(),
                "cfpo_modules_before_import_verl": before,
                "loss_fn": f"{fn.__module__}.{fn.__name__}",
                "loss": loss.item(),
                "grad": leaf.grad.tolist(),
                "metrics": metrics,
            }

    old, new, adv, mask, w = make_batch(seed=7)
    mode = "seq-mean-token-mean"
    gbi = global_info(mask, "global")
    worker = VerlWorker.remote()
    out = ray.get(
        worker.run.remote(old.tolist(), new.tolist(), adv.tolist(), mask.tolist(), w.tolist(), mode, gbi), timeout=600
    )

    assert out["pid"] != os.getpid()
    assert out["cfpo_modules_before_import_verl"] == []
    assert out["loss_fn"] == "cfpo_loss.adapters.verl.compute_policy_loss_cfpo"

    # expected, in the driver, from the paper's equation and verl's agg_loss
    leaf = new.detach().clone().requires_grad_(True)
    ratio = torch.exp(leaf - old)
    eps = torch.where(adv > 0, 0.28, 0.2)
    per_token = -(ratio * adv - adv.abs() / (2 * eps) * (ratio - 1) ** 2) * w
    expected = agg_loss(per_token, mask, mode, **actor_config(global_batch_info=gbi).global_batch_info)
    expected.backward()
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.tensor(out["grad"]), leaf.grad, rtol=1e-5, atol=1e-6)
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(out["metrics"])
