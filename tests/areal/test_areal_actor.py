"""The real AReaL actor on CPU: ``FSDPPPOActor`` (FSDP2 over gloo) on a tiny Qwen2 built from a config, run as AReaL's
asynchronous trainer runs it (compute_logp for the proximal policy, compute_advantages, ppo_update with the decoupled
loss and 2 mini-batches, twice), against ``CFPOFSDPPPOActor``.

Clip mode must give AReaL's updated parameters exactly. The core evaluates the token gradient as (1/N)·((−A)·r) where
AReaL's autograd takes ((1/N)·(−A))·r; the two are equal in floating point when 1/N is a power of two (multiplying by
one is exact), so every mini-batch here holds 32 loss tokens (areal_helpers.trajectories). With other counts they
differ in the last bit of some gradients (measured: 8.6e-6 max parameter difference after 4 Adam steps at lr 1e-2).
"""

from __future__ import annotations

import pytest
import torch
from areal.api.cli_args import PPOActorConfig, RejectionSamplingConfig
from areal.engine import FSDPPPOActor
from areal_helpers import actor_config, make_actor, train

from cfpo_loss.adapters._metric_names import framework_keys
from cfpo_loss.adapters.areal import CFPOActorConfig, CFPOFSDPPPOActor, _loss


@pytest.fixture
def core_calls(monkeypatch):
    """Every call the adapter's loss makes into the core (its options and the metrics it got back)."""
    calls = []
    original = _loss.compute_policy_loss

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(dict(kwargs, metrics=out.metric_floats()))
        return out

    monkeypatch.setattr(_loss, "compute_policy_loss", spy)
    return calls


@pytest.fixture(scope="module")
def areal_params(tiny_model_dir):
    """AReaL's own actor, trained from the saved initial weights, and those initial weights."""
    actor = make_actor(FSDPPPOActor, actor_config(PPOActorConfig, tiny_model_dir))
    initial = {n: p.full_tensor().detach().clone() for n, p in actor.model.named_parameters()}
    return initial, train(actor)


def test_clip_mode_updates_equal_areals_own_actor_exactly(tiny_model_dir, areal_params, core_calls):
    initial, expected = areal_params
    got = train(make_actor(CFPOFSDPPPOActor, actor_config(CFPOActorConfig, tiny_model_dir, objective="clip")))
    assert [c["objective"] for c in core_calls] == ["clip"] * 4  # 2 rounds x 2 mini-batches, all through the core
    assert all(float(c["batch_num_tokens"]) == 32.0 for c in core_calls)  # the power-of-two count (docstring)
    assert max(c["metrics"]["tr_exit_frac"] for c in core_calls) > 0.05  # ratios leave the region: clipping acts
    assert any(not torch.equal(initial[n], expected[n]) for n in expected)  # training moved the weights
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_cfpo_mode_trains_with_the_cfpo_objective(tiny_model_dir, areal_params, core_calls):
    from areal.utils import stats_tracker

    _, clip_params = areal_params
    stats_tracker.export(reset=True)
    got = train(make_actor(CFPOFSDPPPOActor, actor_config(CFPOActorConfig, tiny_model_dir)))
    logged = stats_tracker.export(reset=True)
    for key in framework_keys("areal").values():  # the metric table's AReaL keys are what AReaL logs
        assert f"ppo_actor/update/{key}" in logged, (key, sorted(logged))
    assert logged["ppo_actor/update/clip_ratio/avg"] > 0.0  # the trust-region exit, logged for cfpo too
    assert [c["objective"] for c in core_calls] == ["cfpo"] * 4
    assert all(c["ratio_level"] == "token" and c["weights"] is None for c in core_calls)
    assert "penalty" in core_calls[-1]["metrics"]  # the cfpo objective's own metric
    assert max((got[n] - clip_params[n]).abs().max().item() for n in got) > 1e-4


def test_sequence_level_with_rejection_sampling_reaches_the_core(tiny_model_dir, core_calls):
    """GSPO ratio and the behaviour weight survive AReaL's packing: the core gets sequence rows and weights."""
    rs = RejectionSamplingConfig(level="token", action="clamp", metric="ratio", upper=1.5)
    config = actor_config(CFPOActorConfig, tiny_model_dir, importance_sampling_level="sequence", rejection_sampling=rs)
    train(make_actor(CFPOFSDPPPOActor, config), rounds=1)
    assert len(core_calls) == 2
    for call in core_calls:
        assert call["ratio_level"] == "sequence" and call["weights"] is not None
        rows = call["metrics"]
        assert rows["ratio_min"] > 0.0


def test_engine_needs_the_config_that_carries_the_objective(tiny_model_dir):
    with pytest.raises(TypeError, match="CFPOActorConfig"):
        CFPOFSDPPPOActor(actor_config(PPOActorConfig, tiny_model_dir))
