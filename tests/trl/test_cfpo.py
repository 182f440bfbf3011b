"""CFPO mode: the loss CFPOTrainer computes inside TRL equals the core's compute_policy_loss on the same
per-token log-probs (TRL's loss_type mapped to the matching verl-style aggregation), the gradient w.r.t.
the log-probs is non-zero on tokens outside the clip range (where TRL's clipped loss gives exactly zero),
and the logged trust-region metrics equal the core's."""

from __future__ import annotations

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer
from trl_helpers import B, T, make_inputs, make_trainer

from cfpo_loss import aggregate_loss, compute_policy_loss, reference
from cfpo_loss.adapters.trl import CFPOConfig, CFPOTrainer

EPS_LOW, EPS_HIGH = 0.2, 0.28


def _core_agg(loss_type, inputs):
    """TRL loss_type -> the core's aggregation (with no gradient accumulation, one process)."""
    return {
        "bnpo": dict(agg="token-mean"),
        "dapo": dict(agg="token-mean", batch_num_tokens=inputs["num_items_in_batch"]),
        "grpo": dict(agg="seq-mean-token-mean", global_batch_size=B),
        "dr_grpo": dict(agg="seq-mean-token-sum-norm", global_batch_size=B, loss_scale_factor=T),
        "luspo": dict(agg="seq-mean-token-sum", global_batch_size=B),
    }[loss_type]


def _rounding_bound(inputs, log_prob, loss_type, level="token"):
    """reference.policy_loss_bound of one fp32 evaluation of cfpo on these inputs, each token weighted as the core's
    aggregation weighs it for this loss_type."""
    mask = inputs["completion_mask"].bool()
    agg = dict(_core_agg(loss_type, inputs))
    probe = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
    (coef,) = torch.autograd.grad(aggregate_loss(probe, mask, agg.pop("agg"), **agg), probe)
    return reference.policy_loss_bound(log_prob, inputs["old_per_token_logps"], inputs["advantages"], mask,
                                       eps_low=EPS_LOW, eps_high=EPS_HIGH, ratio_level=level, coef=coef)  # fmt: skip


def _capture_logps(trainer):
    """Wrap the trainer's own (real) log-prob method to keep the tensor it returns, with .retain_grad()."""
    captured = []
    original = trainer._get_per_token_logps_and_entropies

    def wrapped(*args, **kwargs):
        logps, entropies, aux = original(*args, **kwargs)
        if logps.requires_grad:
            logps.retain_grad()
            captured.append(logps)
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = wrapped
    return captured


def _run(trainer, inputs):
    captured = _capture_logps(trainer)
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    assert len(captured) == 1
    return loss.detach(), captured[0]


def _make(cls, cfg_cls, tiny_model_dir, tokenizer, tmp_path, **cfg):
    trainer = make_trainer(
        cls,
        cfg_cls,
        tiny_model_dir,
        tokenizer,
        tmp_path,
        gradient_accumulation_steps=1,
        epsilon=EPS_LOW,
        epsilon_high=EPS_HIGH,
        **cfg,
    )
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.rounding
@pytest.mark.parametrize(
    "loss_type,level",
    [
        ("bnpo", "token"),
        ("dapo", "token"),
        ("grpo", "token"),
        ("dr_grpo", "token"),
        ("luspo", "token"),
        ("grpo", "sequence"),
        ("luspo", "sequence"),
    ],
)
def test_cfpo_loss_equals_core(tiny_model_dir, tokenizer, tmp_path, loss_type, level):
    trainer = _make(
        CFPOTrainer,
        CFPOConfig,
        tiny_model_dir,
        tokenizer,
        tmp_path,
        loss_type=loss_type,
        importance_sampling_level=level,
    )
    assert trainer.policy_objective == "cfpo"
    inputs = make_inputs(trainer, seed=11)
    loss, logps = _run(trainer, inputs)

    mask = inputs["completion_mask"].bool()
    log_prob = logps.detach().clone().requires_grad_()  # the same per-token log-probs TRL computed
    core = compute_policy_loss(
        log_prob,
        inputs["old_per_token_logps"],
        inputs["advantages"],
        mask,
        objective="cfpo",
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        ratio_level=level,
        **_core_agg(loss_type, inputs),
    )
    # two fp32 evaluations of one loss (TRL's path, the core): within twice the derived rounding bound
    bound = _rounding_bound(inputs, log_prob, loss_type, level)
    reference.assert_within(loss, core.loss, 2 * bound.loss, "loss")
    # the gradient w.r.t. the per-token log-probs: through TRL's path and through the core
    core.loss.backward()
    grads = (torch.where(mask, x.grad, 0.0) for x in (logps, log_prob))
    reference.assert_within(*grads, 2 * bound.grad, "dloss/dlog pi")

    # TRL-named metrics equal the core's statistics (token level: TRL's per-token convention is the core's)
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert m["cfpo/penalty"] > 0
    if level == "token":
        metric_bound = reference.policy_metric_bounds(log_prob, inputs["old_per_token_logps"], inputs["advantages"],
                                                      mask, eps_low=EPS_LOW, eps_high=EPS_HIGH)  # fmt: skip
        for ours, core_key in [
            ("clip_ratio/region_mean", "tr_exit_frac"),
            ("clip_ratio/low_mean", "tr_exit_low"),
            ("clip_ratio/high_mean", "tr_exit_high"),
            ("cfpo/ratio_dev", "ratio_dev"),
            ("cfpo/ratio_max", "ratio_max"),
            ("cfpo/ratio_min", "ratio_min"),
            ("cfpo/penalty", "penalty"),
        ]:
            reference.assert_within(m[ours], core.metrics[core_key], 2 * metric_bound[core_key], ours)
        assert m["clip_ratio/region_mean"] > 0.05


def test_cfpo_gradient_nonzero_where_clip_is_flat(tiny_model_dir, tokenizer, tmp_path):
    """Tokens whose ratio left the trust region in the advantage's direction get exactly zero gradient from TRL's
    clipped loss, and a non-zero restoring gradient from CFPO (pointing back to r* = 1 ± eps)."""
    cfg = dict(loss_type="bnpo")
    cfpo = _make(CFPOTrainer, CFPOConfig, tiny_model_dir, tokenizer, tmp_path / "c", **cfg)
    grpo = _make(GRPOTrainer, GRPOConfig, tiny_model_dir, tokenizer, tmp_path / "g", **cfg)
    inputs = make_inputs(grpo, seed=12, noise=0.8)
    _, logps_cfpo = _run(cfpo, inputs)
    _, logps_grpo = _run(grpo, inputs)

    mask = inputs["completion_mask"].bool()
    adv = inputs["advantages"][:, None].expand(B, T)
    ratio = torch.exp(logps_cfpo.detach() - inputs["old_per_token_logps"])
    outside = mask & (((adv > 0) & (ratio > 1 + EPS_HIGH)) | ((adv < 0) & (ratio < 1 - EPS_LOW)))
    assert outside.sum() >= 3, "perturbation should push several tokens outside the trust region"

    assert torch.all(logps_grpo.grad[outside] == 0)  # TRL: clipped, no gradient
    g = logps_cfpo.grad[outside]
    assert torch.all(g != 0)
    # descent direction (-grad) moves log r back towards the trust region: down where r is too high, up where low
    high = (adv > 0)[outside]
    assert torch.all(g[high] > 0) and torch.all(g[~high] < 0)
    # and the whole model gets gradient from those tokens: the parameter gradient is non-zero
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in cfpo.model.parameters())


def test_cfpo_equals_clip_on_policy(tiny_model_dir, tokenizer, tmp_path):
    """At r = 1 (num_iterations=1, no stale mini-batches) CFPO's loss and gradient equal GRPO's."""
    cfpo = _make(CFPOTrainer, CFPOConfig, tiny_model_dir, tokenizer, tmp_path / "c", loss_type="dapo", beta=0.04)
    grpo = _make(GRPOTrainer, GRPOConfig, tiny_model_dir, tokenizer, tmp_path / "g", loss_type="dapo", beta=0.04)
    inputs = make_inputs(grpo, seed=13, old="none")
    loss_c, _ = _run(cfpo, inputs)
    loss_g, _ = _run(grpo, inputs)
    torch.testing.assert_close(loss_c, loss_g, atol=1e-6, rtol=1e-6)
    for (n, pc), (_, pg) in zip(cfpo.model.named_parameters(), grpo.model.named_parameters()):
        torch.testing.assert_close(pc.grad, pg.grad, atol=1e-6, rtol=1e-6, msg=n)
    assert cfpo._metrics["train"]["cfpo/penalty"][-1] == 0.0


@pytest.mark.rounding
def test_plain_grpo_config_means_cfpo(tiny_model_dir, tokenizer, tmp_path):
    trainer = _make(CFPOTrainer, GRPOConfig, tiny_model_dir, tokenizer, tmp_path)
    assert trainer.policy_objective == "cfpo"
    inputs = make_inputs(trainer, seed=14)
    loss, logps = _run(trainer, inputs)
    core = compute_policy_loss(
        logps.detach(),
        inputs["old_per_token_logps"],
        inputs["advantages"],
        inputs["completion_mask"],
        objective="cfpo",
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        **_core_agg("dapo", inputs),
    )
    bound = _rounding_bound(inputs, logps.detach(), "dapo")
    reference.assert_within(loss, core.loss, 2 * bound.loss, "plain GRPOConfig loss")  # two fp32 evaluations
