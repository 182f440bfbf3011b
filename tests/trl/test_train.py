"""A real `trainer.train()`: TRL's generation, reward, advantage, buffering and optimizer loop, with the CFPO
objective. With num_iterations=4 (or steps_per_generation > gradient_accumulation_steps) the ratios leave 1, the
losses stay finite, and the trust-region metrics appear in the trainer's log history under TRL's names."""

from __future__ import annotations

import math

import pytest
from trl_helpers import prompt_dataset, reward_digits

from cfpo_loss.adapters.trl import CFPOConfig, CFPOTrainer

METRICS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "cfpo/ratio_dev",
    "cfpo/ratio_max",
    "cfpo/ratio_min",
    "cfpo/penalty",
)


def _train(tiny_model_dir, tokenizer, tmp_path, **cfg):
    kwargs = dict(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        max_steps=6,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        temperature=1.0,
    )
    kwargs.update(cfg)
    trainer = CFPOTrainer(
        model=tiny_model_dir,
        reward_funcs=reward_digits,
        args=CFPOConfig(**kwargs),
        train_dataset=prompt_dataset(32),
        processing_class=tokenizer,
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(num_iterations=4, beta=0.0),
        dict(num_iterations=1, gradient_accumulation_steps=1, steps_per_generation=4, beta=0.04, loss_type="grpo"),
    ],
    ids=["num_iterations=4", "steps_per_generation=4"],
)
def test_train_cfpo_ratios_leave_one(tiny_model_dir, tokenizer, tmp_path, cfg):
    logs = _train(tiny_model_dir, tokenizer, tmp_path, **cfg)
    assert len(logs) == 6
    for h in logs:
        assert math.isfinite(h["loss"]), h
        for key in METRICS:
            assert key in h, (key, sorted(h))
            assert math.isfinite(h[key]), (key, h)
        assert 0.0 <= h["clip_ratio/region_mean"] <= 1.0
        assert h["cfpo/ratio_dev"] >= 0.0 and h["cfpo/penalty"] >= 0.0
    # the first step of each generation is on-policy (r = 1); later ones are not
    assert max(h["cfpo/ratio_dev"] for h in logs) > 1e-3
    assert max(h["cfpo/ratio_max"] for h in logs) > 1.0 + 1e-3
    assert max(h["cfpo/penalty"] for h in logs) > 0.0
    if cfg.get("beta"):
        assert all("kl" in h for h in logs)


def test_train_clip_logs_same_metrics(tiny_model_dir, tokenizer, tmp_path):
    logs = _train(tiny_model_dir, tokenizer, tmp_path, num_iterations=4, policy_objective="clip", max_steps=4)
    assert len(logs) == 4
    for h in logs:
        assert math.isfinite(h["loss"])
        for key in METRICS:
            assert (key in h) == (key != "cfpo/penalty"), key
    assert max(h["cfpo/ratio_dev"] for h in logs) > 1e-3
