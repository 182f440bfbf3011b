"""SkyRL's real ``PolicyWorkerBase.forward_backward`` reaches the CFPO loss from ``policy_loss_type`` alone.

As SkyRL's own CPU test of the worker loss (tests/backends/skyrl_train/workers/test_policy_worker_loss_scaling.py
in its repository), the model and the distributed strategy are stand-ins (the model returns fixed log-probs per
sample, the strategy's backward runs autograd); the worker, its micro-batching, the registry lookup, the loss call
and the metric reduction are SkyRL's.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from types import SimpleNamespace
from unittest.mock import MagicMock, patch

import pytest
import torch
from skyrl_helpers import CORRECTIONS, EPS_HIGH, EPS_LOW

from cfpo_loss.adapters.skyrl import compute_policy_loss_cfpo

B, T, MICRO = 4, 5, 2


def _config(policy_loss_type: str):
    from skyrl.train.config import SkyRLTrainConfig

    cfg = SkyRLTrainConfig()
    cfg.trainer.micro_train_batch_size_per_gpu = MICRO
    cfg.trainer.remove_microbatch_padding = False
    algorithm = cfg.trainer.algorithm
    algorithm.policy_loss_type = policy_loss_type
    algorithm.eps_clip_low, algorithm.eps_clip_high = EPS_LOW, EPS_HIGH
    algorithm.temperature = 1.0
    algorithm.use_kl_loss = False
    algorithm.use_entropy_loss = False
    for key, value in CORRECTIONS["tis_token"].items():
        setattr(algorithm.off_policy_correction, key, value)
    cfg.generator.sampling_params.temperature = 1.0
    return cfg


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(B, T, generator=g) - 0.1
    old = log_probs + 0.4 * torch.randn(B, T, generator=g)
    rollout = old + 0.4 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, 1, generator=g).expand(B, T) / 17.0  # as if scaled by token_mean
    mask = (torch.arange(T) < torch.tensor([5, 3, 4, 2])[:, None]).float()
    return log_probs, old, rollout, advantages.contiguous(), mask


def _batch(log_probs, old, rollout, advantages, mask):
    from skyrl.backends.skyrl_train.training_batch import TrainingInputBatch

    sequences = torch.zeros((B, T + 1), dtype=torch.long)
    sequences[:, 0] = torch.arange(B)  # the stand-in model's sample id
    batch = TrainingInputBatch(
        {
            "sequences": sequences,
            "attention_mask": torch.ones((B, T + 1), dtype=torch.long),
            "action_log_probs": old,
            "base_action_log_probs": torch.zeros((B, T)),
            "values": torch.zeros((B, T)),
            "returns": torch.zeros((B, T)),
            "advantages": advantages,
            "loss_mask": mask,
            "response_mask": mask,
            "rollout_logprobs": rollout,
        }
    )
    batch.metadata = {"response_length": T}
    return batch


def _run(cfg, data, **kwargs):
    """forward_backward on a real PolicyWorkerBase; returns (result, [(rows, loss, log-prob leaf)] per micro-batch)."""
    from skyrl.backends.skyrl_train.workers.worker import PolicyWorkerBase

    log_probs = data[0]
    calls, leaves = [], []

    def model(sequences, num_actions, **_):
        rows = sequences[:, 0].long()
        leaf = log_probs[rows].clone().requires_grad_()
        leaves.append((rows, leaf))
        return leaf, {"entropy": torch.zeros((len(rows), num_actions + 1))}

    def backward(loss, model, optimizer):
        loss.backward()
        calls.append(loss.detach())

    strategy = MagicMock()
    strategy.backward.side_effect = backward
    strategy.all_reduce.side_effect = lambda metrics, op, group=None: dict(metrics)
    worker = PolicyWorkerBase(cfg=cfg.trainer, world_size=1, rank=0, local_rank=0, master_addr="localhost",
                              master_port=12345, sequence_parallel_size=1)  # fmt: skip
    worker.strategy, worker.model, worker.optimizer = strategy, MagicMock(side_effect=model), None
    worker.device_mesh = SimpleNamespace(get_group=lambda name: None)
    worker.mesh_rank = SimpleNamespace(dp_size=1)
    worker.scheduler = MagicMock(get_last_lr=MagicMock(return_value=[0.0]))
    with ExitStack() as stack:  # CPU: SkyRL's worker moves to cuda.current_device() and autocasts on cuda
        stack.enter_context(patch("torch.cuda.current_device", return_value=torch.device("cpu")))
        stack.enter_context(patch("torch.autocast", side_effect=lambda *a, **k: nullcontext()))
        result = worker.forward_backward(_batch(*data), **kwargs)
    return worker, result, [(rows, loss, leaf) for (rows, leaf), loss in zip(leaves, calls)]


def test_forward_backward_reaches_cfpo_from_the_config_name():
    cfg = _config("cfpo")
    data = _data()
    worker, result, micro = _run(cfg, data)
    assert worker.policy_loss_fn is compute_policy_loss_cfpo  # the registry's entry for "cfpo", found in __init__
    assert len(micro) == B // MICRO
    log_probs, old, rollout, advantages, mask = data
    ratio_mins = []
    for rows, loss, leaf in micro:  # each micro-batch: the worker's backward loss and gradient are the loss's own
        lp = log_probs[rows].clone().requires_grad_()
        expected, metrics = compute_policy_loss_cfpo(lp, old[rows], advantages[rows], cfg.trainer.algorithm,
                                                     mask[rows], rollout[rows])  # fmt: skip
        expected.backward()
        assert torch.equal(loss, expected.detach())  # dp_size 1, no KL / entropy terms
        assert torch.equal(leaf.grad, lp.grad) and leaf.grad.abs().sum() > 0
        ratio_mins.append(metrics["cfpo/ratio_min"])
    metrics = result.metrics
    # SkyRL's names (its worker adds loss_metrics/), reduced by SkyRL over micro-batches: *_min by min
    assert metrics["loss_metrics/cfpo/ratio_min"] == min(ratio_mins)
    for key in ("clip_ratio", "cfpo/penalty", "cfpo/tr_exit_frac", "is_ratio_mean", "tis_token_clip_high_ratio"):
        assert f"loss_metrics/{key}" in metrics, key
    assert metrics["loss_metrics/clip_ratio"] == metrics["loss_metrics/cfpo/tr_exit_frac"]


def test_a_loss_named_per_request_with_overrides_reaches_cfpo():
    """SkyRL's Tinker-style path: forward_backward(loss_fn="cfpo", loss_fn_config={...}) looks the loss up by name
    and merges the overrides into trainer.algorithm; the config's own policy_loss_type is not used there."""
    cfg = _config("regular")
    data = _data(1)
    _, result, micro = _run(cfg, data, loss_fn="cfpo", loss_fn_config={"eps_clip_high": 0.5})
    algorithm = _config("cfpo").trainer.algorithm
    algorithm.eps_clip_high = 0.5
    log_probs, old, rollout, advantages, mask = data
    for rows, loss, _ in micro:
        expected, _ = compute_policy_loss_cfpo(log_probs[rows], old[rows], advantages[rows], algorithm, mask[rows],
                                               rollout[rows])  # fmt: skip
        assert torch.equal(loss, expected)
    assert "loss_metrics/cfpo/penalty" in result.metrics


def test_a_dual_clip_bound_is_refused_in_the_worker():
    cfg = _config("cfpo")
    cfg.trainer.algorithm.clip_ratio_c = 10.0
    with pytest.raises(ValueError, match=r"trainer\.algorithm\.clip_ratio_c=10\.0 has no meaning"):
        _run(cfg, _data())


def test_a_foreign_loss_under_our_name_is_kept_with_a_warning():
    """Another package's "cfpo" in SkyRL's real registry (no Ray: its local table) stays, with a warning naming it,
    until register(override=True); then the name maps to CFPO again."""
    from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry

    from cfpo_loss.adapters import skyrl as adapter

    def foreign(*args, **kwargs):  # somebody else's "cfpo"
        raise AssertionError

    PolicyLossRegistry.unregister("cfpo")
    PolicyLossRegistry.register("cfpo", foreign)
    try:
        with pytest.warns(RuntimeWarning, match="already registered") as caught:
            assert adapter.register() == ("cfpo_seq",)
        assert PolicyLossRegistry._functions["cfpo"] is foreign
        (warning,) = caught.list
        assert "foreign; leaving it in place (policy_loss_type=cfpo will NOT be CFPO)" in str(warning.message)
        assert warning.filename == __file__  # attributed to the caller of register()
        assert adapter.register(override=True) == adapter.LOSS_NAMES
    finally:
        if PolicyLossRegistry._functions.get("cfpo") is not compute_policy_loss_cfpo:
            PolicyLossRegistry.unregister("cfpo")
            PolicyLossRegistry.register("cfpo", compute_policy_loss_cfpo)
    assert PolicyLossRegistry._functions["cfpo"] is compute_policy_loss_cfpo
