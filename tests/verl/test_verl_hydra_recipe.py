"""The README's GRPO recipe overrides compose with verl's own Hydra config (ppo_trainer.yaml) into the
FSDPActorConfig verl's workers build, and that config selects and runs our loss on CPU tensors."""

from __future__ import annotations

import os

import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass
from verl_helpers import make_batch

# the overrides of the README recipe (README: "verl" section), minus data / model paths
RECIPE = [
    "algorithm.adv_estimator=grpo",
    "data.train_batch_size=1024",
    "actor_rollout_ref.rollout.n=5",
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
    "actor_rollout_ref.actor.loss_agg_mode=token-mean",
    "actor_rollout_ref.actor.ppo_mini_batch_size=256",
    "actor_rollout_ref.actor.ppo_epochs=1",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.actor.use_kl_loss=False",
]


@pytest.mark.parametrize("loss_mode", ["cfpo", "cfpo_seq"])
def test_recipe_overrides_select_cfpo_through_verls_config(loss_mode):
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[*RECIPE, f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"],
        )
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # what verl's workers do
    assert type(actor).__name__ == "FSDPActorConfig"
    assert actor.policy_loss.loss_mode == loss_mode
    assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.28)

    fn = get_policy_loss_fn(actor.policy_loss.loss_mode)
    assert fn.__module__ == "cfpo_loss.adapters.verl"
    old, new, adv, mask, _ = make_batch(seed=8)
    loss, metrics = fn(old, new, adv, mask, actor.loss_agg_mode, actor, None)
    loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad.abs().sum() > 0
    assert metrics["actor/cfpo/penalty"] > 0
