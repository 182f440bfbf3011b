"""verl's rollout-correction modes with ``loss_mode=cfpo`` / ``cfpo_seq``, on the real verl of the session.

What runs where in verl 0.8.0 - 0.9.1 (read from the wheels; the Ray test below shows it):

* Bypass mode (``algorithm.rollout_correction.bypass_mode=True``, the default of the fully-async and one-step-off
  recipes): the trainer process sets old_log_probs = rollout_log_probs. The legacy ``RayPPOTrainer`` and the
  recipes' ``SeparateRayPPOTrainer`` do it through ``rollout_corr_helper.apply_bypass_mode``, which also rewrites
  ``policy_loss.loss_mode`` to "bypass_mode" - in the trainer's own config only. Each worker builds its loss from
  its own copy of the config, made when the workers start (``engine_workers.ActorRolloutRefWorker.init_model``:
  ``partial(ppo_loss, config=omega_conf_to_dataclass(config.actor))``), so the rewrite never reaches a worker
  (verl issues #4912, #4272); the v1 trainer (0.9.x default) does not even call it. The workers therefore run the
  loss_mode the user configured - CFPO on pi_theta / pi_rollout - but without verl's rejection mask (the settings
  live in ``algorithm.rollout_correction``, which workers never see).
* The plugin closes that gap at config time: its wrapper of ``verl.utils.device.auto_set_device`` (called by every
  PPO entry point on the composed config, before Ray) copies ``algorithm.rollout_correction`` into
  ``actor_rollout_ref.actor.policy_loss.rollout_correction`` for cfpo configs only; the CFPO loss then applies
  verl's ``compute_rollout_correction_and_rejection_mask`` as verl's ppo_clip bypass loss does, and logs its
  ``rollout_corr/*`` metrics. ``loss_type="reinforce"`` with cfpo is refused by name.
* Decoupled mode (bypass_mode=False): the trainer computes IS weights and the rejection mask and puts them in the
  batch; verl's ``ppo_loss`` hands ``rollout_is_weights`` to the registered loss.

Expected values come from verl's own functions (rejection mask, bypass loss, vanilla loss, agg_loss) and the paper's
equation written here, never from cfpo_loss.
"""

from __future__ import annotations

import copy
import importlib
import json
import os

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl import DataProto
from verl.trainer.config import RolloutCorrectionConfig
from verl.trainer.ppo import rollout_corr_helper
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, get_policy_loss_fn
from verl.trainer.ppo.rollout_corr_helper import (
    compute_rollout_correction_and_add_to_batch,
    compute_rollout_correction_and_rejection_mask,
)
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config.actor import PolicyLossConfig
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding
from verl_helpers import (
    RECIPES,
    actor_config,
    bigram_log_prob_cond,
    bigram_table_grad_bound,
    compose_recipe,
    make_batch,
    rounding_bounds,
    torch_attention_fallback,
)

from cfpo_loss.adapters.verl import WORKER_CORRECTION_KEY, make_policy_loss
from cfpo_loss.reference import assert_within

#: token-level rejection sampling (verl's "token_k1": keep tokens with pi/pi_rollout in [0.7, 1.4])
RS = {"rollout_rs": "token_k1", "rollout_rs_threshold": "0.7_1.4"}
RS_OVERRIDES = [f"algorithm.rollout_correction.{k}={v}" for k, v in RS.items()]
ACTOR = [
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
]


def _mode(loss_mode):
    return [f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"]


def _bypass_actor(loss_mode, loss_agg_mode="token-mean", **correction):
    """The worker's actor config after the plugin's config step (a real RolloutCorrectionConfig here; through Hydra
    the workers get a plain dict, covered by the recipe tests)."""
    rc = RolloutCorrectionConfig(bypass_mode=True, **{"rollout_is": None, **correction})
    policy_loss = PolicyLossConfig(loss_mode=loss_mode, rollout_correction=rc)
    return actor_config(loss_mode, loss_agg_mode, policy_loss=policy_loss)


def _paper_cfpo(ratio, adv, eps_low=0.2, eps_high=0.28):
    eps = torch.where(adv > 0, torch.full_like(adv, eps_high), torch.full_like(adv, eps_low))
    return ratio * adv - adv.abs() / (2 * eps) * (ratio - 1) ** 2


def _rejection(new, rollout, mask, **correction):
    """verl's bypass-mode rejection mask and metrics (current policy against the rollout policy)."""
    _, kept, metrics = compute_rollout_correction_and_rejection_mask(
        old_log_prob=new.detach(), rollout_log_prob=rollout, response_mask=mask, **{**RS, **correction}
    )
    return kept, metrics


def _bypass_batch(seed=11):
    old, new, adv, mask, w = make_batch(seed=seed, B=6, T=9)
    return old, new, adv, mask, w  # old plays pi_rollout: in bypass mode old_log_probs = rollout_log_probs


# ------------------------------------------------------------------------------------------- bypass: the loss
@pytest.mark.parametrize("loss_mode", ["cfpo", "cfpo_seq"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_bypass_cfpo_is_cfpo_on_pi_rollout_with_verls_rejection_mask(loss_mode, agg):
    rollout, new, adv, mask, w = _bypass_batch()
    cfg = _bypass_actor(loss_mode, agg, rollout_is="token", **RS)  # rollout_is: metrics only, as in verl's bypass
    leaf = new.detach().clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn(loss_mode)(rollout, leaf, adv, mask, agg, cfg, w)  # w must be ignored
    loss.backward()

    kept, rollout_metrics = _rejection(new, rollout, mask, rollout_is="token")
    assert 0 < kept.sum() < mask.sum(), "the rejection mask must drop some valid tokens for this test to mean anything"
    ref = new.detach().clone().requires_grad_(True)
    log_ratio = torch.where(kept.bool(), ref - rollout, 0.0)
    if loss_mode == "cfpo_seq":
        n = kept.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = (log_ratio.sum(-1, keepdim=True) / n).expand_as(ref)
    expected = agg_loss(-_paper_cfpo(torch.exp(log_ratio), adv), kept, agg)  # no IS weight: the ratio is pi/pi_rollout
    expected.backward()

    # two fp32 evaluations written differently (ours, the paper's equation here): within twice the derived bound
    level = "sequence" if loss_mode == "cfpo_seq" else "token"
    bound, _ = rounding_bounds(rollout, new, adv, kept, agg, ratio_level=level)
    assert_within(loss.detach(), expected.detach(), 2 * bound.loss, f"bypass {loss_mode} {agg} loss")
    assert_within(leaf.grad, ref.grad, 2 * bound.grad, f"bypass {loss_mode} {agg} d loss / d log_prob")
    # exact: our loss calls verl's compute_rollout_correction_and_rejection_mask on the same tensors
    assert {k: v for k, v in metrics.items() if k.startswith("rollout_corr/")} == rollout_metrics
    assert rollout_metrics["rollout_corr/rollout_rs_masked_fraction"] > 0  # verl logs what it rejected
    assert metrics["actor/cfpo/penalty"] > 0


def test_bypass_clip_objective_equals_verls_own_bypass_ppo_clip():
    """The same bypass translation with the clip objective reproduces verl's ``bypass_mode`` loss (loss_type
    ppo_clip): loss, gradient and every metric verl logs."""
    rollout, new, adv, mask, w = _bypass_batch(seed=12)
    cfg = _bypass_actor("vanilla", "token-mean", rollout_is="token", **RS)
    runs = []
    for fn in (get_policy_loss_fn("bypass_mode"), make_policy_loss("clip")):
        leaf = new.detach().clone().requires_grad_(True)
        loss, metrics = fn(rollout, leaf, adv, mask, "token-mean", cfg, w)
        loss.backward()
        runs.append((loss.detach(), leaf.grad, metrics))
    (ref_loss, ref_grad, ref_m), (loss, grad, m) = runs
    # two fp32 evaluations written differently (ours, verl's vanilla on the rejection mask): within twice the bound
    kept, _ = _rejection(new, rollout, mask, rollout_is="token")
    bound, metric_bound = rounding_bounds(rollout, new, adv, kept, objective="clip")
    assert_within(loss, ref_loss, 2 * bound.loss, "bypass clip loss")
    assert_within(grad, ref_grad, 2 * bound.grad, "bypass clip d loss / d log_prob")
    for key in ref_m:
        if key.startswith("rollout_corr/"):  # exact: both call verl's rejection-mask function on the same tensors
            assert m[key] == ref_m[key], key
        else:
            assert_within(m[key], ref_m[key], 2 * metric_bound[key], f"bypass clip {key}")


# --------------------------------------------------------------------------- bypass: verl's recipes, config time
@pytest.mark.parametrize("recipe", ["fully_async", "one_step_off"])
@pytest.mark.parametrize("loss_mode", ["cfpo", "cfpo_seq"])
def test_recipe_config_reaches_the_workers_as_cfpo_with_the_rejection_settings(recipe, loss_mode):
    cfg = compose_recipe(recipe, [*ACTOR, *_mode(loss_mode), *RS_OVERRIDES])
    assert cfg.algorithm.rollout_correction.bypass_mode is True  # the recipe's default
    entry = importlib.import_module(RECIPES[recipe][2])
    entry.auto_set_device(cfg)  # what the recipe's main() does first with the composed config

    policy_loss = cfg.actor_rollout_ref.actor.policy_loss
    assert policy_loss.loss_mode == loss_mode
    assert OmegaConf.to_container(policy_loss.rollout_correction) == OmegaConf.to_container(
        cfg.algorithm.rollout_correction
    )
    worker_actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # what each worker builds from its copy
    rollout, new, adv, mask, _ = _bypass_batch()
    loss, metrics = get_policy_loss_fn(worker_actor.policy_loss.loss_mode)(
        rollout, new, adv, mask, worker_actor.loss_agg_mode, worker_actor, None
    )
    kept, rollout_metrics = _rejection(new, rollout, mask)
    expected = agg_loss(-_paper_cfpo(torch.exp(torch.where(kept.bool(), new - rollout, 0.0)), adv), kept, "token-mean")
    if loss_mode == "cfpo":  # two fp32 evaluations written differently: within twice the derived bound
        bound, _ = rounding_bounds(rollout, new, adv, kept, "token-mean")
        assert_within(loss.detach(), expected.detach(), 2 * bound.loss, f"{recipe} worker loss")
    assert set(rollout_metrics) <= set(metrics)


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_other_loss_modes_keep_verls_bypass_behaviour(loss_mode):
    """For every other loss_mode the plugin changes nothing: the config step leaves the config as composed, and
    apply_bypass_mode does exactly what verl's own function does (loss_mode rewritten to "bypass_mode", old log-probs
    replaced), after which verl's bypass loss gives verl's numbers (vanilla on the rejection mask)."""
    cfg = compose_recipe("fully_async", [*ACTOR, *_mode(loss_mode), *RS_OVERRIDES])
    composed = OmegaConf.to_container(cfg)
    importlib.import_module(RECIPES["fully_async"][2]).auto_set_device(cfg)
    assert OmegaConf.to_container(cfg) == composed

    rollout, new, adv, mask, _ = _bypass_batch()
    outs = []
    for fn in (rollout_corr_helper.apply_bypass_mode, rollout_corr_helper.apply_bypass_mode.__wrapped__):
        config = copy.deepcopy(cfg)
        batch = DataProto.from_dict(tensors={"rollout_log_probs": rollout.clone(), "response_mask": mask.clone()})
        fn(batch=batch, rollout_corr_config=config.algorithm.rollout_correction,
           policy_loss_config=config.actor_rollout_ref.actor.policy_loss)  # fmt: skip
        outs.append((OmegaConf.to_container(config), batch.batch["old_log_probs"]))
    (wrapped_cfg, wrapped_old), (verl_cfg, verl_old) = outs
    assert wrapped_cfg == verl_cfg
    assert wrapped_cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] == "bypass_mode"
    assert torch.equal(wrapped_old, rollout) and torch.equal(verl_old, rollout)

    bypass = get_policy_loss_fn("bypass_mode")
    assert bypass.__module__ == "verl.trainer.ppo.core_algos"
    actor = actor_config(
        "bypass_mode",
        policy_loss=PolicyLossConfig(
            loss_mode="bypass_mode", rollout_correction=RolloutCorrectionConfig(bypass_mode=True, rollout_is=None, **RS)
        ),
    )
    loss, _ = bypass(rollout, new, adv, mask, "token-mean", actor, None)
    kept, _ = _rejection(new, rollout, mask)
    ref, _ = compute_policy_loss_vanilla(rollout, new, adv, kept, "token-mean", actor, None)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)  # exact: verl's bypass loss is this very call


def test_trainer_side_config_keeps_saying_cfpo_after_apply_bypass_mode():
    cfg = compose_recipe("one_step_off", [*ACTOR, *_mode("cfpo"), *RS_OVERRIDES])
    importlib.import_module(RECIPES["one_step_off"][2]).auto_set_device(cfg)
    rollout, _, _, mask, _ = _bypass_batch()
    batch = DataProto.from_dict(tensors={"rollout_log_probs": rollout.clone(), "response_mask": mask})
    # as verl's trainers call it (they import it from rollout_corr_helper when they reach this line)
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

    apply_bypass_mode(batch=batch, rollout_corr_config=cfg.algorithm.rollout_correction,
                      policy_loss_config=cfg.actor_rollout_ref.actor.policy_loss)  # fmt: skip
    assert torch.equal(batch.batch["old_log_probs"], rollout)  # verl's substitution happened
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "cfpo"  # what the workers run
    assert cfg.actor_rollout_ref.actor.policy_loss.rollout_correction.rollout_rs == RS["rollout_rs"]


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("loss_mode", ["cfpo", "cfpo_seq"])
def test_reinforce_with_cfpo_is_refused_by_name(loss_mode):
    match = rf"loss_mode={loss_mode} .*loss_type='reinforce'"
    reinforce = ["algorithm.rollout_correction.loss_type=reinforce"]
    cfg = compose_recipe("fully_async", [*ACTOR, *_mode(loss_mode), *reinforce])
    with pytest.raises(ValueError, match=match):  # when the config is built (the entry point's first step)
        importlib.import_module(RECIPES["fully_async"][2]).auto_set_device(cfg)

    rollout, new, adv, mask, _ = _bypass_batch()
    cfg = compose_recipe("fully_async", [*ACTOR, *_mode(loss_mode), *reinforce])  # a launcher that skipped it
    batch = DataProto.from_dict(tensors={"rollout_log_probs": rollout, "response_mask": mask})
    with pytest.raises(ValueError, match=match):
        rollout_corr_helper.apply_bypass_mode(batch=batch, rollout_corr_config=cfg.algorithm.rollout_correction,
                                              policy_loss_config=cfg.actor_rollout_ref.actor.policy_loss)  # fmt: skip
    with pytest.raises(ValueError, match=match):  # a worker config that carries it anyway
        get_policy_loss_fn(loss_mode)(rollout, new, adv, mask, "token-mean",
                                      _bypass_actor(loss_mode, loss_type="reinforce"), None)  # fmt: skip

    vanilla = compose_recipe("fully_async", [*ACTOR, *_mode("vanilla"), *reinforce])
    importlib.import_module(RECIPES["fully_async"][2]).auto_set_device(vanilla)  # verl's own REINFORCE: not ours


def test_unprepared_cfpo_bypass_with_rejection_sampling_is_refused_before_training():
    """A launcher that never called verl's auto_set_device (a custom entry point): the workers' copy has no
    rejection settings, so the first apply_bypass_mode refuses, before any actor update; without rollout_rs it warns
    (CFPO still runs, only verl's rollout_corr/* metrics are missing)."""
    rollout, _, _, mask, _ = _bypass_batch()
    cfg = compose_recipe("fully_async", [*ACTOR, *_mode("cfpo"), *RS_OVERRIDES])
    batch = DataProto.from_dict(tensors={"rollout_log_probs": rollout, "response_mask": mask})
    with pytest.raises(ValueError, match=rf"loss_mode=cfpo .*rollout_rs='token_k1'.*{WORKER_CORRECTION_KEY}"):
        rollout_corr_helper.apply_bypass_mode(batch=batch, rollout_corr_config=cfg.algorithm.rollout_correction,
                                              policy_loss_config=cfg.actor_rollout_ref.actor.policy_loss)  # fmt: skip

    from cfpo_loss.adapters import verl as adapter

    adapter._state.pop("warned_unprepared", None)
    cfg = compose_recipe("fully_async", [*ACTOR, *_mode("cfpo")])
    with pytest.warns(RuntimeWarning, match="rollout_corr/\\* metrics are not logged"):
        rollout_corr_helper.apply_bypass_mode(batch=batch, rollout_corr_config=cfg.algorithm.rollout_correction,
                                              policy_loss_config=cfg.actor_rollout_ref.actor.policy_loss)  # fmt: skip
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "cfpo"


def test_a_different_worker_correction_is_refused_not_overwritten():
    cfg = compose_recipe(
        "fully_async",
        [
            *ACTOR,
            *_mode("cfpo"),
            *RS_OVERRIDES,
            "+actor_rollout_ref.actor.policy_loss.rollout_correction.rollout_rs=null",
        ],
    )
    with pytest.raises(ValueError, match=rf"loss_mode=cfpo .*{WORKER_CORRECTION_KEY}=.*differs"):
        importlib.import_module(RECIPES["fully_async"][2]).auto_set_device(cfg)


# ---------------------------------------------------------------------------------------------- decoupled mode
def test_decoupled_mode_cfpo_receives_verls_rollout_is_weights(monkeypatch):
    """bypass_mode=False: the trainer's compute_rollout_correction_and_add_to_batch (IS weights + rejection mask on
    the batch), then verl's ppo_loss with loss_mode=cfpo: the weights multiply CFPO's per-token loss."""
    from test_verl_actor_loss import B, P, _batch, _token_log_probs

    torch_attention_fallback(monkeypatch)
    prompts, responses, attention_mask, response_mask, position_ids, adv, _, g = _batch(seed=5)
    input_ids = torch.cat([prompts, responses], dim=1)
    table0 = torch.randn(13, 13, generator=g)
    with torch.no_grad():
        old = _token_log_probs(table0 + 0.3 * torch.randn(13, 13, generator=g), input_ids, attention_mask)
    old = old.masked_fill(~response_mask, 0.0)
    rollout = (old + 0.4 * torch.randn(old.shape, generator=g)).masked_fill(~response_mask, 0.0)

    correction = RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=2.0, bypass_mode=False, **RS)
    batch = DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout,
                                         "response_mask": response_mask.long()})  # fmt: skip
    batch, _ = compute_rollout_correction_and_add_to_batch(batch, correction)
    kept, weights = batch.batch["response_mask"].bool(), batch.batch["rollout_is_weights"]
    assert 0 < kept.sum() < response_mask.sum() and not torch.allclose(weights[kept], torch.ones(()))

    cfg = actor_config("cfpo", "token-mean")
    data = TensorDict({"prompts": prompts, "responses": responses, "input_ids": input_ids,
                       "attention_mask": attention_mask, "response_mask": kept.long(), "position_ids": position_ids,
                       "old_log_probs": old, "advantages": adv, "rollout_is_weights": weights},
                      batch_size=[B])  # fmt: skip
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(kept.sum()), global_batch_size=B)
    table = table0.clone().requires_grad_(True)
    ids = data["input_ids"]
    flat = ids.values()
    logp = torch.log_softmax(table[flat], -1).gather(-1, torch.roll(flat, -1, 0)[:, None]).squeeze(-1)
    loss, metrics = ppo_loss(cfg, {"log_probs": torch.nested.nested_tensor_from_jagged(logp, ids.offsets())}, data)
    loss.backward()
    assert "actor/cfpo/penalty" in metrics  # ppo_loss dispatched to our loss

    ref_table = table0.clone().requires_grad_(True)
    ratio = torch.exp(torch.where(kept, _token_log_probs(ref_table, input_ids, attention_mask) - old, 0.0))
    per_token = -_paper_cfpo(ratio, adv)
    info = dict(dp_size=1, batch_num_tokens=int(kept.sum()))
    expected = agg_loss(per_token * weights, kept, "token-mean", **info)
    expected.backward()
    # two fp32 evaluations written differently (jagged vs padded): within twice the derived bound (as in
    # test_verl_actor_loss.py: log_softmax's error in the log-ratio, the bigram LM's backward for the table)
    new64 = _token_log_probs(table0.double(), input_ids, attention_mask).requires_grad_(True)
    exact = agg_loss(-_paper_cfpo(torch.exp(torch.where(kept, new64 - old.double(), 0.0)), adv.double())
                     * weights.double(), kept, "token-mean", **info)  # fmt: skip
    (logp_grad,) = torch.autograd.grad(exact, new64)
    bound, _ = rounding_bounds(old, new64, adv, kept, "token-mean", info, weights,
                               log_prob_cond=bigram_log_prob_cond(table0, input_ids, P))  # fmt: skip
    assert_within(loss.detach(), expected.detach(), 2 * bound.loss, "decoupled loss")
    table_bound = bigram_table_grad_bound(table0, input_ids, P, logp_grad, bound.grad)
    assert_within(table.grad, ref_table.grad, 2 * table_bound, "decoupled d loss / d table")
    unweighted = agg_loss(per_token, kept, "token-mean", dp_size=1, batch_num_tokens=int(kept.sum()))
    assert not torch.allclose(loss, unweighted)


# ------------------------------------------------------------------------ fresh processes: what a launch loads
def test_every_entry_point_of_a_bare_verl_launch_goes_through_the_config_step():
    """A fresh process that only imports verl (plus its switch on 0.8.0): main_ppo (as `python -m` runs it),
    one-step-off and fully-async bind the wrapped auto_set_device, and apply_bypass_mode is wrapped."""
    from test_verl_plugin import bare_user_result

    assert bare_user_result()["hooks"] == {
        "main_ppo": "auto_set_device",
        "one_step_off": "auto_set_device",
        "fully_async": "auto_set_device",
        "apply_bypass_mode": "apply_bypass_mode",
    }


# --------------------------------------------------------- the distributed path: verl's run_ppo, trainer, Ray workers
def _run_bypass_in_verl_ray_workers(config, batch, out_path):
    """verl's run_ppo(config, TaskRunner): the TaskRunner (the trainer process) starts a 2-worker RayWorkerGroup of
    verl's real ``ActorRolloutRefWorker`` from ``config.actor_rollout_ref`` (as ``init_workers`` does), then calls
    verl's ``apply_bypass_mode`` on its own config and a batch (as ``SeparateRayPPOTrainer._fit_compute_log_prob``
    does each step), then has every worker compute the actor's policy loss from the config copy it was started with.
    """
    from test_verl_ray import ray, run_ppo
    from verl.single_controller.base.decorator import Dispatch, register
    from verl.workers.engine_workers import ActorRolloutRefWorker

    # defined here so that Ray pickles them by value: no worker imports this test module (nor cfpo_loss)
    class ActorWorker(ActorRolloutRefWorker):
        """verl's actor worker; its model engine cannot start on a CPU (test_verl_actor_loss.py says why), so this
        method builds the loss from the worker's config copy as ``init_model`` does and calls it as ``ppo_loss``
        (workers/utils/losses.py) does."""

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def policy_loss(self, old, new, adv, mask):
            import os

            import torch
            from verl.trainer.ppo.core_algos import get_policy_loss_fn
            from verl.utils.config import omega_conf_to_dataclass

            actor = omega_conf_to_dataclass(self.config.actor)  # init_model: partial(ppo_loss, config=actor_config)
            loss_mode = actor.policy_loss.get("loss_mode", "vanilla")  # ppo_loss
            leaf = torch.tensor(new, requires_grad=True)
            loss, metrics = get_policy_loss_fn(loss_mode)(
                old_log_prob=torch.tensor(old), log_prob=leaf, advantages=torch.tensor(adv),
                response_mask=torch.tensor(mask), loss_agg_mode=actor.loss_agg_mode, config=actor,
                rollout_is_weights=None,
            )  # fmt: skip
            loss.backward()
            correction = actor.policy_loss.get("rollout_correction") or {}
            return {"pid": os.getpid(), "loss_mode": loss_mode, "rollout_rs": correction.get("rollout_rs"),
                    "loss": loss.item(), "grad": leaf.grad.tolist(), "metrics": metrics}  # fmt: skip

    class TaskRunner:
        def run(self, config):
            import json

            import ray
            import torch
            from verl import DataProto
            from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

            rollout, new, adv, mask = batch
            pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
            worker = RayClassWithInitArgs(cls=ray.remote(ActorWorker), config=config.actor_rollout_ref, role="actor")
            group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=worker)  # the workers copy the config now
            data = DataProto.from_dict(tensors={"rollout_log_probs": torch.tensor(rollout),
                                                "response_mask": torch.tensor(mask)})  # fmt: skip
            from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode  # where and how verl's trainers get it

            apply_bypass_mode(batch=data, rollout_corr_config=config.algorithm.rollout_correction,
                              policy_loss_config=config.actor_rollout_ref.actor.policy_loss)  # fmt: skip
            workers = group.policy_loss(data.batch["old_log_probs"].tolist(), new, adv, mask)
            with open(out_path, "w") as f:
                json.dump({"trainer_loss_mode": config.actor_rollout_ref.actor.policy_loss.loss_mode,
                           "workers": workers}, f)  # fmt: skip

    run_ppo(config, ray.remote(num_cpus=0)(TaskRunner))
    with open(out_path) as f:
        return json.load(f)


@pytest.fixture
def clean_ray_driver(monkeypatch):
    from test_verl_ray import ray

    monkeypatch.delenv("VERL_USE_EXTERNAL_MODULES", raising=False)
    assert not ray.is_initialized()
    yield
    ray.shutdown()


def test_fully_async_bypass_runs_cfpo_with_the_rejection_mask_in_verls_ray_workers(clean_ray_driver, tmp_path):
    from test_verl_ray import RAY_OVERRIDES, SWITCH

    config = compose_recipe("fully_async", [*RAY_OVERRIDES, *SWITCH, *ACTOR, *_mode("cfpo"), *RS_OVERRIDES])
    importlib.import_module(RECIPES["fully_async"][2]).auto_set_device(config)  # fully_async_main.main's first step
    rollout, new, adv, mask, _ = _bypass_batch(seed=13)
    batch = (rollout.tolist(), new.tolist(), adv.tolist(), mask.tolist())
    out = _run_bypass_in_verl_ray_workers(config, batch, tmp_path / "out.json")

    kept, rollout_metrics = _rejection(new, rollout, mask)
    assert 0 < kept.sum() < mask.sum()
    ref = new.detach().clone().requires_grad_(True)
    expected = agg_loss(-_paper_cfpo(torch.exp(torch.where(kept, ref - rollout, 0.0)), adv), kept, "token-mean")
    expected.backward()
    without_mask = agg_loss(-_paper_cfpo(torch.exp(torch.where(mask, new - rollout, 0.0)), adv), mask, "token-mean")
    bound, _ = rounding_bounds(rollout, new, adv, kept, "token-mean")

    assert out["trainer_loss_mode"] == "cfpo"  # the trainer's config says what the workers run
    assert len(out["workers"]) == 2 and len({w["pid"] for w in out["workers"]}) == 2
    for w in out["workers"]:
        assert w["pid"] != os.getpid()
        assert (w["loss_mode"], w["rollout_rs"]) == ("cfpo", RS["rollout_rs"])
        # the worker's fp32 loss and the paper's equation here in fp32: within twice the derived bound
        assert_within(w["loss"], expected.item(), 2 * bound.loss, "Ray worker loss")
        assert w["loss"] != pytest.approx(without_mask.item(), rel=1e-3)
        assert_within(torch.tensor(w["grad"]), ref.grad, 2 * bound.grad, "Ray worker d loss / d log_prob")
        # exact: the worker calls verl's rejection-mask function on the same numbers (sent as Python floats, which
        # hold fp32 values exactly)
        assert {k: w["metrics"][k] for k in rollout_metrics} == rollout_metrics
