"""Subprocess probe for the async-mode test (run as a script; not a test module).

    python async_probe.py OUT.json ARGS...

Runs OpenRLHF's real ``train_ppo_ray`` CLI through our launcher (``train_ppo_ray.main(ARGS)``) against the Ray
cluster in RAY_ADDRESS, and lets OpenRLHF's ``train(args)`` run, unmodified, until it fails on this CPU machine.
Nothing of OpenRLHF is replaced. One spy is added in this (driver) process: ``ray.actor.ActorClass._remote`` also
records each actor handle the CLI creates (class and handle; the call itself is Ray's own), so that afterwards the
probe can look into those real actors with Ray's built-in ``__ray_call__``:

- every actor ``train(args)`` created, and the actors the async trainer created in turn (its sample generator and
  training actor): which class, whether the worker setup hook ran (``cfpo_loss`` imported, ``PolicyLoss`` patched);
- the ``PolicyModelActor`` (the actor that builds ``PolicyLoss``): the strategy and args that ``train(args)`` sent
  it, and then OpenRLHF's own ``ActorPPOTrainer.__init__`` - the code that builds ``self.actor_loss_fn =
  PolicyLoss(...)`` from those args, in sync and async mode alike - run in that worker on the real strategy,
  until its first CUDA call; that ``actor_loss_fn`` is then called on fixed tensors (BATCH).

The driver's error (where ``train(args)`` stops) is recorded as text. The probe never imports cfpo_loss's loss
code itself: only the launcher.
"""

import json
import sys
import traceback

import ray

# tensors the PolicyLoss built by OpenRLHF's ActorPPOTrainer gets (the test recomputes the expected loss)
BATCH = {
    "log_probs": [[-0.5, -1.0, -0.2, -2.0], [-0.3, -0.7, -1.5, -0.9]],
    "old_log_probs": [[-0.9, -0.6, -0.2, -1.0], [-0.1, -1.2, -1.0, -0.9]],
    "advantages": [[1.0, 1.0, 1.0, 1.0], [-0.5, -0.5, -0.5, -0.5]],
    "action_mask": [[1, 1, 1, 0], [1, 1, 1, 1]],
    # vLLM's log-probs of the sampled tokens (read by PolicyLoss only with the IS correction on)
    "rollout_log_probs": [[-0.8, -0.6, -0.5, -1.0], [-0.1, -1.0, -1.1, -0.2]],
}


def _error(e):
    return {"type": type(e).__name__, "text": "".join(traceback.format_exception(e))}


def _worker_state(actor_self):
    """Run in a real actor (``__ray_call__``): its class and whether the setup hook reached it."""
    import sys

    loss = sys.modules.get("openrlhf.models.loss")
    return {
        "class": _class_name(type(actor_self).__ray_actor_class__),
        "cfpo_loss_imported": "cfpo_loss" in sys.modules,
        "openrlhf_loss_imported": loss is not None,
        "policy_loss_patched": loss is not None and "__cfpo_loss_patch__" in vars(loss.PolicyLoss),
        "partial_rollout": getattr(actor_self, "_partial_rollout", None),
    }


def _async_children(trainer_self):
    """Run in the PPOTrainerAsync actor: the two actors it created."""
    return [trainer_self.generator_actor, trainer_self.trainer_actor]


def _policy_loss_in_policy_actor(actor_self, batch):
    """Run in the real PolicyModelActor after its init_model_from_pretrained failed.

    ``actor_self.strategy`` is the DeepspeedStrategy that train(args) sent (stored by BaseModelActor._setup_distributed
    right before the CUDA call). OpenRLHF's ActorPPOTrainer.__init__ runs on it as init_model_from_pretrained would
    run it (model, optimizer and scheduler are None: the model was never loaded); __init__ builds actor_loss_fn and
    stops at its first CUDA call (its replay buffer's torch.cuda.current_device()). The object is kept.
    """
    import torch
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    strategy = actor_self.strategy
    args = strategy.args
    out = {
        "args": {
            "async_enable": args.train.async_enable,
            "partial_rollout_enable": args.train.partial_rollout_enable,
            "policy_loss_type": args.actor.policy_loss_type,
            "eps_clip_low_high": list(args.actor.eps_clip_low_high),
        }
    }
    trainer = ActorPPOTrainer.__new__(ActorPPOTrainer)
    try:
        ActorPPOTrainer.__init__(
            trainer,
            strategy,
            None,
            None,
            None,
            None,
            micro_train_batch_size=args.train.micro_batch_size,
            vllm_engines=actor_self.vllm_engines,
        )
        out["init_error"] = None
    except Exception as e:  # noqa: BLE001 - recorded: where OpenRLHF's __init__ stops on a CPU
        out["init_error"] = _error(e)
    loss_fn = trainer.actor_loss_fn
    out["loss_fn"] = {
        "class": f"{type(loss_fn).__module__}.{type(loss_fn).__qualname__}",
        "policy_loss_type": loss_fn.policy_loss_type,
        "clip_eps_low": loss_fn.clip_eps_low,
        "clip_eps_high": loss_fn.clip_eps_high,
        "token_level_loss": loss_fn.token_level_loss,
    }
    log_probs = torch.tensor(batch["log_probs"], requires_grad=True)
    # as ActorPPOTrainer.training_step calls it (one data-parallel rank, no global normalisers)
    loss, clip_ratio, _ppo_kl, vllm_kl = loss_fn(
        log_probs,
        torch.tensor(batch["old_log_probs"]),
        torch.tensor(batch["advantages"]),
        action_mask=torch.tensor(batch["action_mask"], dtype=torch.bool),
        rollout_log_probs=torch.tensor(batch["rollout_log_probs"]),
    )[:4]  # 5 values on OpenRLHF 0.11.2, 4 before
    loss.backward()
    out.update(
        loss=loss.item(),
        clip_ratio=clip_ratio.item(),
        grad=log_probs.grad.tolist(),
        vllm_kl=None if vllm_kl is None else vllm_kl.item(),
        cfpo_metrics=sorted(getattr(loss_fn, "cfpo_metrics", {})),
    )
    return out


def _class_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def main():
    out_path, *argv = sys.argv[1:]
    created = []
    native_remote = ray.actor.ActorClass._remote

    def recording_remote(self, *args, **kwargs):
        handle = native_remote(self, *args, **kwargs)
        created.append((_class_name(self.__ray_metadata__.modified_class.__ray_actor_class__), handle))
        return handle

    ray.actor.ActorClass._remote = recording_remote
    record = {}
    from cfpo_loss.adapters.openrlhf.train_ppo_ray import main as launcher_main

    try:
        launcher_main(argv)
        record["driver_error"] = None
    except BaseException as e:  # noqa: BLE001 - train(args) is expected to stop on this CPU machine
        record["driver_error"] = _error(e)
    ray.actor.ActorClass._remote = native_remote
    record["job_runtime_env"] = ray.get_runtime_context().runtime_env
    record["driver_created"] = [name for name, _ in created]

    def call(handle, fn, *args):
        try:
            return {"result": ray.get(handle.__ray_call__.remote(fn, *args), timeout=240)}
        except Exception as e:  # noqa: BLE001 - an actor whose __init__ failed (a vLLM engine here) is recorded
            return {"error": _error(e)}

    workers = [handle for _, handle in created]
    for name, handle in created:
        if name.endswith(".PPOTrainerAsync"):
            workers += call(handle, _async_children).get("result", [])
        if name.endswith(".PolicyModelActor"):
            record["policy_actor"] = call(handle, _policy_loss_in_policy_actor, BATCH)
    record["workers"] = [call(handle, _worker_state) for handle in workers]
    with open(out_path, "w") as f:
        json.dump(record, f, indent=1, default=repr)


if __name__ == "__main__":
    main()
