"""The distributed path, for real: verl's own ``main_ppo.run_ppo`` starts a local Ray cluster from verl's
Hydra config (with the user's overrides, nothing else), runs a TaskRunner, and that TaskRunner starts a
verl ``RayWorkerGroup`` (verl's worker actors, each with the per-worker ``env_vars`` verl adds) whose
code only imports verl and computes ``loss_mode=cfpo``.

* verl >= 0.9.0: no override; the ``verl.plugins`` entry point reaches every worker.
* verl 0.8.0: the adapter's one switch, ``HYDRA_OVERRIDE`` (VERL_USE_EXTERNAL_MODULES in Ray's job
  runtime_env), reaches every worker; the driver's own environment does not have the variable, so
  inheritance cannot be what delivers it. Negative control: without the override the workers get verl's
  "Unsupported loss mode: cfpo".
"""

from __future__ import annotations

import json
import os

import pytest
import torch

ray = pytest.importorskip("ray")

import verl  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from verl.trainer.main_ppo import run_ppo  # noqa: E402
from verl.trainer.ppo.core_algos import agg_loss  # noqa: E402
from verl_helpers import (  # noqa: E402
    HAS_ENTRY_POINTS,
    VERL_VERSION,
    actor_config,
    global_info,
    make_batch,
    rounding_bounds,
)

from cfpo_loss.adapters.verl import HYDRA_OVERRIDE  # noqa: E402
from cfpo_loss.reference import assert_within  # noqa: E402

RAY_OVERRIDES = ["ray_kwargs.ray_init.num_cpus=2", "+ray_kwargs.ray_init.include_dashboard=False",
                 "+ray_kwargs.ray_init.log_to_driver=False"]  # fmt: skip
SWITCH = [] if HAS_ENTRY_POINTS else [HYDRA_OVERRIDE]


def _config(overrides):
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=[*RAY_OVERRIDES, *overrides])


def _run_ppo_with_loss_workers(overrides, batch, mode, gbi, out_path):
    """verl's run_ppo(config, TaskRunner) where the TaskRunner builds a 2-worker verl RayWorkerGroup on CPU."""

    # Classes defined here so that Ray pickles them by value: no worker imports this test module (which
    # imports cfpo_loss); the workers' own code imports only verl and torch.
    from verl.single_controller.base import Worker
    from verl.single_controller.base.decorator import Dispatch, register

    class LossWorker(Worker):
        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def compute(self, old, new, adv, mask, weights, mode, gbi):
            import os
            import sys

            # verl is imported already (this class is a verl Worker): whatever loaded cfpo_loss ran then
            loaded = "cfpo_loss.adapters.verl" in sys.modules
            import torch
            import verl  # noqa: F401  - the only thing a verl worker does
            from verl.trainer.ppo.core_algos import get_policy_loss_fn
            from verl.workers.config.actor import ActorConfig, PolicyLossConfig

            out = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "plugin_loaded_by_verl": loaded,
                   "env": os.environ.get("VERL_USE_EXTERNAL_MODULES")}  # fmt: skip
            cfg = ActorConfig(
                strategy="fsdp", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=mode,
                policy_loss=PolicyLossConfig(loss_mode="cfpo"), global_batch_info=gbi,
            )  # fmt: skip
            try:
                fn = get_policy_loss_fn(cfg.policy_loss.loss_mode)
            except ValueError as exc:
                out["error"] = str(exc)
                return out
            leaf = torch.tensor(new, requires_grad=True)
            loss, metrics = fn(
                torch.tensor(old), leaf, torch.tensor(adv), torch.tensor(mask), mode, cfg, torch.tensor(weights)
            )
            loss.backward()
            out.update(loss_fn=f"{fn.__module__}.{fn.__name__}", loss=loss.item(), grad=leaf.grad.tolist(),
                       metrics=metrics)  # fmt: skip
            return out

    class TaskRunner:
        def run(self, config):
            import ray
            from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

            pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
            worker_cls = RayClassWithInitArgs(cls=ray.remote(LossWorker))
            group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=worker_cls)
            results = group.compute(*batch, mode, gbi)
            with open(out_path, "w") as f:
                json.dump(results, f)

    run_ppo(_config(overrides), ray.remote(num_cpus=0)(TaskRunner))
    with open(out_path) as f:
        return json.load(f)


@pytest.fixture
def clean_driver(monkeypatch):
    """The driver has no VERL_USE_EXTERNAL_MODULES (a local cluster's workers would inherit it) and no Ray."""
    monkeypatch.delenv("VERL_USE_EXTERNAL_MODULES", raising=False)
    assert not ray.is_initialized()
    yield
    ray.shutdown()


def test_the_switch_composes_into_verls_ray_init():
    cfg = _config([HYDRA_OVERRIDE])
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == "cfpo_loss.adapters.verl"


def test_verl_ray_workers_compute_cfpo(clean_driver, tmp_path):
    old, new, adv, mask, w = make_batch(seed=7)
    mode = "seq-mean-token-mean"
    gbi = global_info(mask, "global")
    batch = (old.tolist(), new.tolist(), adv.tolist(), mask.tolist(), w.tolist())
    results = _run_ppo_with_loss_workers(SWITCH, batch, mode, gbi, tmp_path / "out.json")

    # expected, in the driver, from the paper's equation and verl's agg_loss
    leaf = new.detach().clone().requires_grad_(True)
    ratio = torch.exp(leaf - old)
    eps = torch.where(adv > 0, 0.28, 0.2)
    per_token = -(ratio * adv - adv.abs() / (2 * eps) * (ratio - 1) ** 2) * w
    expected = agg_loss(per_token, mask, mode, **actor_config(global_batch_info=gbi).global_batch_info)
    expected.backward()
    # the worker's fp32 loss and the paper's equation here in fp32: each within the derived bound of the exact value
    bound, _ = rounding_bounds(old, new, adv, mask, mode, gbi, w)

    assert sorted(r["rank"] for r in results) == ["0", "1"] and len({r["pid"] for r in results}) == 2
    for out in results:
        assert out["pid"] != os.getpid()
        assert "error" not in out, out.get("error")
        assert out["plugin_loaded_by_verl"]
        assert out["loss_fn"] == "cfpo_loss.adapters.verl.compute_policy_loss_cfpo"
        assert_within(out["loss"], expected.item(), 2 * bound.loss, "verl Ray worker loss")
        assert_within(torch.tensor(out["grad"]), leaf.grad, 2 * bound.grad, "verl Ray worker d loss / d log_prob")
        assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(out["metrics"])
        if not HAS_ENTRY_POINTS:
            assert out["env"] == "cfpo_loss.adapters.verl"  # delivered by Ray's runtime_env, not inherited


@pytest.mark.skipif(HAS_ENTRY_POINTS, reason=f"verl {VERL_VERSION} loads the plugin by entry point")
def test_without_the_switch_verl_0_8_workers_do_not_have_cfpo(clean_driver, tmp_path):
    old, new, adv, mask, w = make_batch(seed=7)
    batch = (old.tolist(), new.tolist(), adv.tolist(), mask.tolist(), w.tolist())
    results = _run_ppo_with_loss_workers([], batch, "token-mean", {}, tmp_path / "out.json")
    assert len(results) == 2
    for out in results:
        assert out["env"] is None and not out["plugin_loaded_by_verl"]
        assert "Unsupported loss mode: cfpo" in out["error"]
