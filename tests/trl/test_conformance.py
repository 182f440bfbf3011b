"""Clip mode conforms to TRL: CFPOTrainer(policy_objective="clip")._compute_loss gives the same loss,
parameter gradients and TRL metrics as trl==1.16.0's own GRPOTrainer._compute_loss, on the same model
weights and inputs, for every aggregation loss_type, beta = 0 and beta > 0, token- and sequence-level
ratios, inside and outside the trust region. The expected values come from TRL's code, run unmodified
on a separately constructed real GRPOTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer
from trl_helpers import loss_and_grads, make_inputs, make_trainer

from cfpo_loss.adapters.trl import AGGREGATION_LOSS_TYPES, CFPOConfig, CFPOTrainer

TRL_METRIC_PREFIXES = ("clip_ratio/", "entropy", "kl", "policy_loss", "entropy_coef")


def _pair(tiny_model_dir, tokenizer, tmp_path, **cfg):
    grpo = make_trainer(GRPOTrainer, GRPOConfig, tiny_model_dir, tokenizer, tmp_path / "grpo", **cfg)
    cfpo = make_trainer(
        CFPOTrainer, CFPOConfig, tiny_model_dir, tokenizer, tmp_path / "cfpo", policy_objective="clip", **cfg
    )
    # same weights: both loaded from the same folder
    for (n1, p1), (n2, p2) in zip(grpo.model.named_parameters(), cfpo.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    return grpo, cfpo


def _assert_same(grpo, cfpo, inputs, modes=("train",)):
    for mode in modes:
        grpo.model.train(mode == "train")
        cfpo.model.train(mode == "train")
        loss_ref, grads_ref = loss_and_grads(grpo, inputs)
        loss, grads = loss_and_grads(cfpo, inputs)
        assert torch.isfinite(loss_ref)
        torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
        assert grads.keys() == grads_ref.keys() and len(grads) > 0
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-6, msg=name)
        assert any(g.abs().sum() > 0 for g in grads_ref.values())
        # every metric TRL logs, with TRL's value
        ref_metrics, metrics = grpo._metrics[mode], cfpo._metrics[mode]
        assert ref_metrics, "TRL logged no metric"
        for key, values in ref_metrics.items():
            assert key in metrics, key
            for a, b in zip(metrics[key], values, strict=True):
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6), key
    return loss_ref


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", AGGREGATION_LOSS_TYPES)
def test_clip_matches_trl_outside_trust_region(tiny_model_dir, tokenizer, tmp_path, loss_type, beta, level):
    grpo, cfpo = _pair(
        tiny_model_dir, tokenizer, tmp_path, loss_type=loss_type, beta=beta, importance_sampling_level=level
    )
    assert (grpo.ref_model is not None) == (beta > 0)
    inputs = make_inputs(grpo, seed=1)
    _assert_same(grpo, cfpo, inputs, modes=("train", "eval"))
    # the perturbation really puts tokens outside the trust region, so clipping is exercised
    assert grpo._metrics["train"]["clip_ratio/region_mean"][-1] > 0.05
    if beta > 0:
        assert grpo._metrics["train"]["kl"][-1] > 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_clip_matches_trl_on_policy(tiny_model_dir, tokenizer, tmp_path, loss_type):
    """No old_per_token_logps (num_iterations=1): ratio == 1, TRL uses the detached log-probs."""
    grpo, cfpo = _pair(tiny_model_dir, tokenizer, tmp_path, loss_type=loss_type, beta=0.04)
    inputs = make_inputs(grpo, seed=2, old="none")
    _assert_same(grpo, cfpo, inputs)
    assert grpo._metrics["train"]["clip_ratio/region_mean"][-1] == 0.0
    assert cfpo._metrics["train"]["cfpo/ratio_dev"][-1] == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_clip_matches_trl_with_every_loss_feature(tiny_model_dir, tokenizer, tmp_path, level):
    """Two-sided clipping (delta), top-entropy mask, off-policy sequence mask, entropy bonus, bias-corrected KL,
    per-token advantages: the parts of TRL's loss that CFPOTrainer keeps verbatim."""
    cfg = dict(
        loss_type="grpo",
        beta=0.04,
        importance_sampling_level=level,
        delta=1.5,
        epsilon=0.2,
        epsilon_high=0.28,
        top_entropy_quantile=0.5,
        off_policy_mask_threshold=0.05,
        entropy_coef=0.01,
    )
    grpo, cfpo = _pair(tiny_model_dir, tokenizer, tmp_path, **cfg)
    for per_token_adv in (False, True):
        inputs = make_inputs(grpo, seed=3, per_token_adv=per_token_adv)
        _assert_same(grpo, cfpo, inputs, modes=("train", "eval"))


def test_clip_matches_trl_adaptive_entropy(tiny_model_dir, tokenizer, tmp_path):
    grpo, cfpo = _pair(
        tiny_model_dir, tokenizer, tmp_path, loss_type="dapo", use_adaptive_entropy=True, entropy_target=100.0
    )
    for seed in (4, 5):  # the controller's state carries from one call to the next
        _assert_same(grpo, cfpo, make_inputs(grpo, seed=seed))
    assert cfpo.entropy_coef == grpo.entropy_coef
