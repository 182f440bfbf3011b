"""Bad configurations fail at construction with an error naming the argument; the TRL version guard refuses a
TRL whose loss method is not the one CFPOTrainer mirrors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import trl
from trl import GRPOConfig
from trl_helpers import prompt_dataset, reward_digits

import cfpo_loss.adapters.trl as adapter
from cfpo_loss.adapters.trl import CFPOConfig, CFPOTrainer, _guard

BASE = dict(per_device_train_batch_size=4, num_generations=4, report_to="none", use_cpu=True)


def cfg(tmp_path, cls=CFPOConfig, **kw):
    return cls(output_dir=str(tmp_path), **BASE, **kw)


def test_defaults(tmp_path):
    c = cfg(tmp_path)
    assert c.policy_objective == "cfpo" and c.use_fused_loss is False and c.loss_type == "dapo"
    assert isinstance(c, GRPOConfig)


@pytest.mark.parametrize("objective", ["ppo", "CFPO", "", None, 1])
def test_bad_policy_objective(tmp_path, objective):
    with pytest.raises(ValueError, match="policy_objective"):
        cfg(tmp_path, policy_objective=objective)


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_objective_loss_types_rejected(tmp_path, loss_type, objective):
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}' is a different policy objective"):
        cfg(tmp_path, loss_type=loss_type, policy_objective=objective)


def test_unknown_loss_type(tmp_path):
    with pytest.raises(ValueError, match="loss_type='token-mean' is unknown"):
        cfg(tmp_path, loss_type="token-mean")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=1.0), "epsilon"),
        (dict(epsilon=-0.2), "epsilon"),
        (dict(epsilon_high=0.0), "epsilon_high"),
        (dict(epsilon_high=float("inf")), "epsilon_high"),
        (dict(delta=2.0), "delta"),  # cfpo has nothing to clip
        (dict(delta=1.1, policy_objective="clip", epsilon_high=0.28), "delta must be a float > 1 \\+ epsilon_high"),
    ],
)
def test_bad_hyperparameters(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **kw)


def test_delta_ok_for_clip(tmp_path):
    assert cfg(tmp_path, policy_objective="clip", delta=1.5).delta == 1.5


def test_use_fused_loss(tmp_path):
    assert cfg(tmp_path, use_fused_loss=True).use_fused_loss is True  # unsupported combinations: test_trl_fused.py
    with pytest.raises(TypeError, match="use_fused_loss"):
        cfg(tmp_path, use_fused_loss="yes")


def test_trainer_validates_plain_grpo_config_before_loading(tmp_path):
    # model path does not exist: the config error must come first
    with pytest.raises(ValueError, match="loss_type='sapo' is a different policy objective"):
        CFPOTrainer(
            model=str(tmp_path / "missing"),
            reward_funcs=reward_digits,
            args=cfg(tmp_path, cls=GRPOConfig, loss_type="sapo"),
            train_dataset=prompt_dataset(),
        )
    with pytest.raises(TypeError, match="args must be a CFPOConfig or GRPOConfig"):
        CFPOTrainer(model=str(tmp_path / "missing"), reward_funcs=reward_digits, args={"loss_type": "dapo"})


def test_trainer_rejects_config_mutated_after_construction(tmp_path):
    c = cfg(tmp_path)
    c.policy_objective = "ppo"
    with pytest.raises(ValueError, match="policy_objective"):
        CFPOTrainer(model=str(tmp_path / "missing"), reward_funcs=reward_digits, args=c)


# ---- TRL version guard --------------------------------------------------------------------------------------


def test_guard_accepts_installed_trl():
    assert trl.__version__ == "1.16.0"
    _guard.check_trl_version()  # no error


@pytest.mark.parametrize("version", ["1.17.0", "1.15.2", "2.0.0"])
def test_guard_rejects_other_versions(monkeypatch, version):
    monkeypatch.setattr(adapter.trl, "__version__", version)
    monkeypatch.delenv("CFPO_LOSS_ALLOW_UNSUPPORTED_TRL", raising=False)
    with pytest.raises(ImportError, match=f"trl=={version} is outside the supported range"):
        _guard.check_trl_version()
    monkeypatch.setenv("CFPO_LOSS_ALLOW_UNSUPPORTED_TRL", "1")
    with pytest.warns(RuntimeWarning, match="outside the supported range"):
        _guard.check_trl_version()


def test_guard_rejects_changed_loss_method(monkeypatch):
    monkeypatch.setitem(_guard.MIRRORED_SHA256, "GRPOTrainer", "0" * 64)
    monkeypatch.delenv("CFPO_LOSS_ALLOW_UNSUPPORTED_TRL", raising=False)
    with pytest.raises(ImportError, match="_compute_loss differs"):
        _guard.check_trl_version()


def test_import_fails_on_unsupported_trl():
    """The real import path: a TRL that reports another version cannot import the adapter."""
    code = textwrap.dedent("""
        import trl
        trl.__version__ = "1.17.0"
        try:
            import cfpo_loss.adapters.trl
        except ImportError as e:
            print("IMPORT-ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "CFPO_LOSS_ALLOW_UNSUPPORTED_TRL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "IMPORT-ERROR:" in out.stdout and "trl==1.17.0 is outside the supported range" in out.stdout, out
