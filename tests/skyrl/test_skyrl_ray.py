"""A real Ray worker finds ``cfpo`` in SkyRL's registry after SkyRL's own ``sync_registries``, without importing
cfpo_loss itself: the registration reaches it through SkyRL's registry actor (one local Ray, one CPU)."""

from __future__ import annotations

import pytest
import torch

from cfpo_loss.adapters.skyrl import compute_policy_loss_cfpo


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_ray_worker_finds_cfpo_after_skyrls_sync(local_ray):
    from skyrl.backends.skyrl_train.utils.ppo_utils import sync_registries

    sync_registries()  # what SkyRL's initialize_ray does right after ray.init

    @local_ray.remote
    def worker(log_probs, old, advantages, mask):  # a nested function: sent by value, no test module needed
        import sys

        before = sorted(m for m in sys.modules if m.startswith("cfpo_loss"))
        from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry
        from skyrl.train.config import AlgorithmConfig

        fn = PolicyLossRegistry.get("cfpo")
        loss, metrics = fn(log_probs, old, advantages, AlgorithmConfig(), mask, None)
        return before, f"{fn.__module__}.{fn.__qualname__}", loss.item(), metrics, PolicyLossRegistry.list_available()

    g = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(3, 4, generator=g)
    old = log_probs + 0.3 * torch.randn(3, 4, generator=g)
    advantages, mask = torch.randn(3, 4, generator=g), torch.ones(3, 4)
    before, name, loss, metrics, available = local_ray.get(worker.remote(log_probs, old, advantages, mask))
    assert before == []  # the worker had not imported cfpo_loss: the function came from SkyRL's registry actor
    assert name == "cfpo_loss.adapters.skyrl._loss.compute_policy_loss_cfpo"
    assert {"cfpo", "cfpo_seq"} <= set(available)
    from skyrl.train.config import AlgorithmConfig

    expected, expected_metrics = compute_policy_loss_cfpo(log_probs, old, advantages, AlgorithmConfig(), mask, None)
    assert loss == expected.item() and metrics == expected_metrics
