"""Subprocess probe for the Ray worker test (run as a script; not a test module).

    python ray_probe.py launcher|plain OUT.json

Connects to the Ray cluster in RAY_ADDRESS (started by the test: "an existing cluster") and starts
two Ray actors whose code - defined here, shipped to the workers by value - imports only OpenRLHF and
builds ``PolicyLoss(policy_loss_type="cfpo")`` as OpenRLHF's PPO actor does. It never imports cfpo_loss.

- launcher: runs the real OpenRLHF CLI through ``cfpo_loss.adapters.openrlhf.train_ppo_ray.main``;
  OpenRLHF's own ``ray.init`` call starts the job (through the launcher); the actors are started at
  the CLI's next step, ``get_strategy(args)``, which this probe replaces (no GPU here).
- plain: a plain ``ray.init()`` with no launcher (negative control: the workers lack the loss).
"""

import json
import os
import sys

import ray

# tensors every actor gets (fixed numbers, so the test can recompute the expected loss)
BATCH = {
    "log_probs": [[-0.5, -1.0, -0.2, -2.0], [-0.3, -0.7, -1.5, -0.9]],
    "old_log_probs": [[-0.9, -0.6, -0.2, -1.0], [-0.1, -1.2, -1.0, -0.9]],
    "advantages": [[1.0, 1.0, 1.0, 1.0], [-0.5, -0.5, -0.5, -0.5]],
    "action_mask": [[1, 1, 1, 0], [1, 1, 1, 1]],
}


@ray.remote(num_cpus=0)
class OpenRLHFLikeActor:
    """Does what openrlhf.trainer.ray.ppo_actor does with the loss; imports no cfpo_loss."""

    def modules_at_start(self):
        return {name: name in sys.modules for name in ("cfpo_loss", "openrlhf", "deepspeed")}

    def run(self, batch, loss_type):
        import torch
        from openrlhf.models import PolicyLoss

        had_cfpo = "cfpo_loss" in sys.modules
        log_probs = torch.tensor(batch["log_probs"], requires_grad=True)
        loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, policy_loss_type=loss_type)
        loss, clip_ratio, _ppo_kl, _vllm_kl = loss_fn(  # 5 values on OpenRLHF 0.11.2, 4 before
            log_probs,
            torch.tensor(batch["old_log_probs"]),
            torch.tensor(batch["advantages"]),
            action_mask=torch.tensor(batch["action_mask"], dtype=torch.bool),
        )[:4]
        loss.backward()
        return {
            "pid": os.getpid(),
            "cfpo_loss_imported_by_setup_hook": had_cfpo,
            "loss": loss.item(),
            "clip_ratio": clip_ratio.item(),
            "grad": log_probs.grad.tolist(),
        }


def check_workers(out_path):
    actors = [OpenRLHFLikeActor.remote() for _ in range(2)]
    record = {"job_runtime_env": ray.get_runtime_context().runtime_env, "results": [], "errors": []}
    for actor in actors:
        try:
            record.setdefault("modules_at_start", []).append(ray.get(actor.modules_at_start.remote(), timeout=240))
            record["results"].append(ray.get(actor.run.remote(BATCH, "cfpo"), timeout=240))
        except Exception as e:  # noqa: BLE001 - the negative control expects OpenRLHF's error
            record["errors"].append(f"{type(e).__name__}: {e}")
    record["gcs_address"] = ray.get_runtime_context().gcs_address
    with open(out_path, "w") as f:
        json.dump(record, f, indent=1, default=repr)


def main():
    mode, out_path = sys.argv[1:]
    if mode == "plain":
        ray.init()
        check_workers(out_path)
        return
    import openrlhf.utils

    def get_strategy(args):  # the CLI's first step after its ray.init: check the workers, then stop
        assert ray.is_initialized()
        check_workers(out_path)
        raise SystemExit(0)

    openrlhf.utils.get_strategy = get_strategy
    from cfpo_loss.adapters.openrlhf.train_ppo_ray import main as launcher_main

    launcher_main(
        [
            "--actor.policy_loss_type",
            "cfpo",
            "--algo.advantage.estimator",
            "rloo",
            "--rollout.n_samples_per_prompt",
            "2",
            "--actor.model_name_or_path",
            "unused",
        ]
    )


if __name__ == "__main__":
    main()
