"""The one-flag launch on SkyRL's own entry point, and the fully-async trainer with cfpo.

The launch tests run SkyRL's ``main_base.main`` in a fresh process, as ``python -m skyrl.train.entrypoints.main_base
...`` would, and stop it where Ray would start (``ray.init`` raises there): everything before (the override
dispatch, the import of the adapter, SkyRL's parse and ``validate_cfg``) is SkyRL's real code.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from cfpo_loss.adapters.skyrl import OVERRIDE_FLAG, check_config, training_args

LAUNCH = """
import sys
import ray
import skyrl.train.entrypoints.main_base as main_base

assert "cfpo_loss" not in sys.modules, "the adapter must come in through the flag alone"
sys.argv = ["main_base", *sys.argv[1:]]


class RayStarts(Exception):
    pass


def stop(*args, **kwargs):
    raise RayStarts


ray.init = stop  # validate_cfg has run when initialize_ray starts Ray
try:
    main_base.main()
except RayStarts:
    print("CFPO_LAUNCH: validated, Ray starting; cfpo_loss imported:", "cfpo_loss.adapters.skyrl" in sys.modules)
"""
BASE = ["trainer.logger=console", "trainer.algorithm.policy_loss_type=cfpo"]
#: a fully-async run as SkyRL's fully-async example configures one (its trainer asserts these)
FULLY_ASYNC = [
    "trainer.fully_async.enabled=true",
    "trainer.train_batch_size=4",
    "trainer.policy_mini_batch_size=4",
    "trainer.fully_async.num_parallel_generation_workers=4",
    "trainer.placement.colocate_all=false",
    "generator.batched=false",
    "trainer.algorithm.off_policy_correction.tis_ratio_type=token",
]


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["synchronous", "fully_async"])
def test_validate_cfg_accepts_cfpo_through_the_one_flag_launch(mode):
    proc = _launch(OVERRIDE_FLAG, *BASE, *(FULLY_ASYNC if mode == "fully_async" else []))
    assert "CFPO_LAUNCH: validated, Ray starting; cfpo_loss imported: True" in proc.stdout, proc.stderr[-3000:]


def test_without_the_flag_skyrl_refuses_cfpo():
    """The control: the same launch without the flag fails in SkyRL's validate_cfg (the registry lacks cfpo)."""
    proc = _launch(*BASE)
    assert proc.returncode != 0 and "invalid policy_loss_type: cfpo" in proc.stderr, proc.stderr[-3000:]


def test_the_override_flag_is_not_passed_to_skyrls_config():
    assert training_args([OVERRIDE_FLAG, *BASE]) == BASE


class _Prompts(torch.utils.data.Dataset):
    """Enough of a prompt dataset for the trainer's dataloader (no prompt is generated from)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"prompt": [{"role": "user", "content": str(i)}], "env_class": None, "env_extras": {}, "uid": str(i)}

    def collate_fn(self, items):
        return items


def _fully_async_config(loss: str):
    from skyrl.train.config import SkyRLTrainConfig

    return SkyRLTrainConfig.from_cli_overrides(
        [*BASE[:1], f"trainer.algorithm.policy_loss_type={loss}", *FULLY_ASYNC,
         "generator.inference_engine.enable_ray_prometheus_stats=false", "data.dataloader.num_workers=0"]
    )  # fmt: skip


@pytest.mark.parametrize("loss", ["cfpo", "cfpo_seq", "regular"])
def test_skyrls_fully_async_trainer_takes_cfpo(loss):
    """SkyRL's real FullyAsyncRayPPOTrainer refuses the losses it lists as needing π_old ≈ π_rollout (regular, ...)
    and takes cfpo / cfpo_seq: docs/off-policy.md says which ratio the loss then sees (test_skyrl_loss.py,
    test_fully_async_ratio_at_the_loss)."""
    from skyrl.train.fully_async_trainer import FullyAsyncRayPPOTrainer
    from skyrl.train.utils import validate_cfg

    cfg = _fully_async_config(loss)
    validate_cfg(cfg)
    check_config(cfg)

    def build():
        return FullyAsyncRayPPOTrainer(cfg=cfg, tracker=None, tokenizer=None, train_dataset=_Prompts(),
                                       inference_engine_client=None, generator=None)  # fmt: skip

    if loss == "regular":
        with pytest.raises(AssertionError, match="Fully async training should use rollout logprobs"):
            build()
        return
    trainer = build()
    assert trainer.max_staleness_steps == cfg.trainer.fully_async.max_staleness_steps
    # the ratio's π_old: SkyRL skips its old-log-prob forward pass only for losses that read the rollout log-probs
    # instead (rollout_is, dppo); for cfpo it recomputes them, even with no correction on and rollout log-probs present
    cfg.trainer.algorithm.off_policy_correction.tis_ratio_type = None
    assert trainer._skip_policy_forward({"rollout_logprobs": torch.zeros(1, 1)}) is False
    cfg.trainer.algorithm.policy_loss_type = "rollout_is"  # the control: SkyRL does skip it for such a loss
    assert trainer._skip_policy_forward({"rollout_logprobs": torch.zeros(1, 1)}) is True


def test_check_config_refuses_by_name_and_warns_on_uncorrected_fully_async():
    cfg = _fully_async_config("cfpo")
    cfg.trainer.algorithm.clip_ratio_c = 4.0
    with pytest.raises(ValueError, match=r"policy_loss_type=cfpo: trainer\.algorithm\.clip_ratio_c=4\.0 has no"):
        check_config(cfg)
    cfg = _fully_async_config("cfpo")
    cfg.trainer.algorithm.off_policy_correction.tis_ratio_type = None
    with pytest.warns(RuntimeWarning, match="staleness is not corrected"):
        check_config(cfg)
    cfg.trainer.fully_async.enabled = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config(cfg)  # synchronous: nothing to say
