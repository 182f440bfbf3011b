"""Advantage estimators against their definitions, computed group by group in plain Python."""

import statistics

import numpy as np
import pytest
import torch

from cfpo_loss import group_advantages, rloo_advantages


def grpo_ref(rewards, groups, scale="group", eps=1e-6):
    out = [0.0] * len(rewards)
    batch_std = statistics.stdev(rewards)
    for members in groups.values():
        vals = [rewards[i] for i in members]
        mean = sum(vals) / len(vals)
        std = {"group": statistics.stdev(vals), "batch": batch_std, "none": None}[scale]
        for i in members:
            out[i] = rewards[i] - mean if std is None else (rewards[i] - mean) / (std + eps)
    return out


def rloo_ref(rewards, groups):
    out = [0.0] * len(rewards)
    for members in groups.values():
        for i in members:
            others = [rewards[j] for j in members if j != i]
            out[i] = rewards[i] - sum(others) / len(others)
    return out


REWARDS = [1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.9, 0.1, 0.0, 1.0, 1.0, 0.3]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_contiguous(scale):
    groups = {g: list(range(4 * g, 4 * g + 4)) for g in range(3)}
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 4, scale=scale)
    assert got.tolist() == pytest.approx(grpo_ref(REWARDS, groups, scale), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_by_ids_in_any_order(scale):
    ids = np.array(["p1", "p2", "p1", "p3", "p2", "p3", "p1", "p2", "p3", "p1", "p2", "p3"], dtype=object)
    groups = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), group_ids=ids, scale=scale)
    assert got.tolist() == pytest.approx(grpo_ref(REWARDS, groups, scale), rel=1e-9, abs=1e-12)
    # a tensor of integer ids gives the same
    int_ids = torch.tensor([int(g[1]) for g in ids])
    assert torch.allclose(
        group_advantages(torch.tensor(REWARDS, dtype=torch.float64), group_ids=int_ids, scale=scale), got
    )


def test_rloo_contiguous_and_by_ids():
    got = rloo_advantages(torch.tensor(REWARDS, dtype=torch.float64), 3)
    groups = {g: list(range(3 * g, 3 * g + 3)) for g in range(4)}
    assert got.tolist() == pytest.approx(rloo_ref(REWARDS, groups), abs=1e-12)
    ids = [i % 3 for i in range(12)]
    groups = {g: [i for i in range(12) if i % 3 == g] for g in range(3)}
    got = rloo_advantages(torch.tensor(REWARDS, dtype=torch.float64), group_ids=ids)
    assert got.tolist() == pytest.approx(rloo_ref(REWARDS, groups), abs=1e-12)


def test_rloo_is_k_over_k_minus_1_times_centred_reward():
    r = torch.tensor(REWARDS, dtype=torch.float64)
    centred = group_advantages(r, 4, scale="none")
    assert torch.allclose(rloo_advantages(r, 4), centred * 4 / 3)


def test_zero_variance_group_gives_zero_advantages():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    a = group_advantages(r, 3)
    assert torch.equal(a[:3], torch.zeros(3))
    assert torch.equal(rloo_advantages(r, 3)[:3], torch.zeros(3))


def test_group_of_one_is_an_error_by_default():
    with pytest.raises(ValueError, match="single response"):
        group_advantages(torch.tensor([1.0, 0.0, 0.5]), group_ids=["a", "a", "b"])
    with pytest.raises(ValueError, match="single response"):
        rloo_advantages(torch.tensor([1.0, 0.5]), 1)


def test_group_of_one_passthrough_is_verls_convention():
    r = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    ids = ["a", "a", "b"]
    a = group_advantages(r, group_ids=ids, singleton="passthrough")
    assert a[2].item() == pytest.approx(0.5 / (1 + 1e-6))  # verl: mean 0, std 1
    assert group_advantages(r, group_ids=ids, scale="none", singleton="passthrough")[2].item() == 0.5
    assert rloo_advantages(r, group_ids=ids, singleton="passthrough")[2].item() == 0.5


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages])
def test_bad_grouping_is_an_error(fn):
    r = torch.ones(6)
    with pytest.raises(ValueError, match="does not divide"):
        fn(r, 4)
    with pytest.raises(ValueError, match="exactly one"):
        fn(r)
    with pytest.raises(ValueError, match="exactly one"):
        fn(r, 3, group_ids=[0] * 6)
    with pytest.raises(ValueError, match="one id per reward"):
        fn(r, group_ids=[0] * 5)
    with pytest.raises(ValueError, match="group_size"):
        fn(r, 0)
    with pytest.raises(ValueError, match="non-finite"):
        fn(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        fn(torch.ones(2, 3), 2)
    with pytest.raises(TypeError, match="rewards"):
        fn([1.0, 2.0], 2)
