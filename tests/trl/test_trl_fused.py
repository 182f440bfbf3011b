"""use_fused_loss=True (cfpo_loss.fused in place of TRL's log-prob kernel + objective): the same loss, parameter
gradients and metrics as the unfused path on the same tiny model and inputs, for every aggregation loss_type,
both objectives, token- and sequence-level ratios, beta = 0 and beta > 0 (use_bias_correction_kl=False); in clip
mode that is also TRL's own GRPOTrainer. A real train() runs. Unsupported options are refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer
from trl_helpers import loss_and_grads, make_inputs, make_trainer, prompt_dataset, reward_digits

from cfpo_loss.adapters.trl import AGGREGATION_LOSS_TYPES, CFPOConfig, CFPOTrainer

# fp32 (bf16=False): the two paths differ only in summation order (the LM-head gradient is summed block by block)
TOL = dict(atol=1e-5, rtol=1e-5)
# TrainingArguments' default on this CPU is bf16=True (accelerate then runs TRL's forward under CPU bf16 autocast).
# TRL's kernel and the fused pass both compute each logits tile in bf16 and the rest in fp32, but their tiles have
# other shapes and their gradient products are rounded and summed in another order, so bf16 rounding falls
# differently. Measured here over 3 batches: loss within 3.2e-5 relative, parameter gradients within 1.3e-2 of
# each tensor's largest entry (2.6e-3 with cast_lm_head_to_fp32=True). Checked at 2e-4 / 3e-2.
BF16_LOSS_RTOL, BF16_GRAD_REL = 2e-4, 3e-2


def _check_same(ref, fused, inputs, modes=("train", "eval")):
    for mode in modes:
        ref.model.train(mode == "train")
        fused.model.train(mode == "train")
        loss_ref, grads_ref = loss_and_grads(ref, inputs)
        loss, grads = loss_and_grads(fused, inputs)
        assert grads.keys() == grads_ref.keys() and len(grads) > 0
        if ref.args.bf16:
            assert float(loss) == pytest.approx(float(loss_ref), rel=BF16_LOSS_RTOL)
            for name in grads_ref:
                scale = grads_ref[name].abs().max().clamp(min=1e-12)
                assert (grads[name] - grads_ref[name]).abs().max() / scale < BF16_GRAD_REL, name
            continue
        torch.testing.assert_close(loss, loss_ref, **TOL)
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], **TOL, msg=name)
        for key, values in ref._metrics[mode].items():
            assert key in fused._metrics[mode], key
            for a, b in zip(fused._metrics[mode][key], values, strict=True):
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", AGGREGATION_LOSS_TYPES)
def test_fused_equals_unfused_cfpo(tiny_model_dir, tokenizer, tmp_path, loss_type, level):
    cfg = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04,
        use_bias_correction_kl=False,
        epsilon_high=0.28,
        temperature=0.7,
        bf16=False,
    )
    ref = make_trainer(CFPOTrainer, CFPOConfig, tiny_model_dir, tokenizer, tmp_path / "r", **cfg)
    fused = make_trainer(CFPOTrainer, CFPOConfig, tiny_model_dir, tokenizer, tmp_path / "f", use_fused_loss=True, **cfg)
    _check_same(ref, fused, make_inputs(ref, seed=21))
    assert ref._metrics["train"]["cfpo/penalty"][-1] > 0


@pytest.mark.parametrize("old", ["perturbed", "none"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_clip_equals_trl(tiny_model_dir, tokenizer, tmp_path, level, old):
    cfg = dict(loss_type="grpo", importance_sampling_level=level, delta=1.6, bf16=False)
    ref = make_trainer(GRPOTrainer, GRPOConfig, tiny_model_dir, tokenizer, tmp_path / "r", **cfg)
    fused = make_trainer(
        CFPOTrainer,
        CFPOConfig,
        tiny_model_dir,
        tokenizer,
        tmp_path / "f",
        policy_objective="clip",
        use_fused_loss=True,
        **cfg,
    )
    _check_same(ref, fused, make_inputs(ref, seed=22, per_token_adv=(level == "token"), old=old))


@pytest.mark.parametrize("cast_lm_head_to_fp32", [False, True])
def test_fused_bf16_autocast_close_to_trl(tiny_model_dir, tokenizer, tmp_path, cast_lm_head_to_fp32):
    """With TrainingArguments' CPU default bf16=True, the fused pass follows TRL's precision choices."""
    cfg = dict(loss_type="dapo", bf16=True, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
    ref = make_trainer(CFPOTrainer, CFPOConfig, tiny_model_dir, tokenizer, tmp_path / "r", **cfg)
    fused = make_trainer(CFPOTrainer, CFPOConfig, tiny_model_dir, tokenizer, tmp_path / "f", use_fused_loss=True, **cfg)
    assert ref.accelerator.mixed_precision == "bf16"
    _check_same(ref, fused, make_inputs(ref, seed=23), modes=("train",))


def test_fused_train(tiny_model_dir, tokenizer, tmp_path):
    args = CFPOConfig(
        output_dir=str(tmp_path),
        use_fused_loss=True,
        num_iterations=4,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = CFPOTrainer(
        model=tiny_model_dir,
        reward_funcs=reward_digits,
        args=args,
        train_dataset=prompt_dataset(32),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
    assert all("cfpo/penalty" in h and "clip_ratio/region_mean" in h and "entropy" in h for h in logs)
    assert max(h["cfpo/ratio_dev"] for h in logs) > 1e-3


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(beta=0.04), "use_bias_correction_kl"),
        (dict(entropy_coef=0.01), "entropy bonus"),
        (dict(use_adaptive_entropy=True), "entropy bonus"),
        (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
        (dict(off_policy_mask_threshold=0.1), "off_policy_mask_threshold"),
        # FSDP1 (DDP and FSDP2 are supported: tests/trl/test_distributed.py); FSDP2 is accepted below
        (dict(fsdp=True, fsdp_config={"version": 1}), r"FSDP version 1 \(FSDP1 flattens"),
        (dict(parallelism_config="tp2"), "parallelism_config with tensor"),
    ],
)
def test_fused_refuses_unsupported_options(tmp_path, kw, match):
    if kw.get("parallelism_config") == "tp2":
        from accelerate.parallelism_config import ParallelismConfig

        kw = dict(parallelism_config=ParallelismConfig(tp_size=2))
    with pytest.raises(ValueError, match=f"use_fused_loss=True does not support .*{match}"):
        CFPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            num_generations=4,
            report_to="none",
            use_cpu=True,
            use_fused_loss=True,
            **kw,
        )


def test_fused_accepts_fsdp2(tmp_path):
    args = CFPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        report_to="none",
        use_cpu=True,
        use_fused_loss=True,
        fsdp=True,
        fsdp_config={"version": 2},
    )
    assert args.use_fused_loss and args.fsdp


def test_fused_refuses_deepspeed(tmp_path):
    """DeepSpeed is not installed here (a TrainingArguments with deepspeed= would not construct), so the config is
    changed after construction: CFPOTrainer validates again before loading the model."""
    args = CFPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        report_to="none",
        use_cpu=True,
        use_fused_loss=True,
    )
    args.deepspeed = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match=r"does not support DeepSpeed \(ZeRO-3 partitions the LM head"):
        CFPOTrainer(model=str(tmp_path / "missing"), reward_funcs=reward_digits, args=args)


def test_fused_refuses_logit_transform(tmp_path, tokenizer):
    from trl_helpers import build_model

    model = build_model(tokenizer)
    model.config.final_logit_softcapping = 30.0
    args = CFPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        report_to="none",
        use_cpu=True,
        use_fused_loss=True,
    )
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        CFPOTrainer(
            model=model,
            reward_funcs=reward_digits,
            args=args,
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )
