"""group_advantages / rloo_advantages == verl's compute_grpo_outcome_advantage /
compute_rloo_outcome_advantage on the same rewards and the same ``uid`` index arrays, including
groups of one and zero-variance groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_rloo_outcome_advantage

from cfpo_loss import group_advantages, rloo_advantages


def _layout(seed=0, with_singleton=True, with_flat_group=True):
    """Shuffled verl-style batch: uid strings in any order, outcome reward on the last valid token."""
    g = torch.Generator().manual_seed(seed)
    uids, rewards = [], []
    for k, size in enumerate([4, 3, 5, 2]):
        uids += [f"uid-{k}"] * size
        rewards += torch.randint(0, 3, (size,), generator=g).float().tolist()
    rewards[0:4] = [1.0, 0.0, 2.0, 0.5]  # distinct: never accidentally flat
    if with_flat_group:
        uids += ["uid-flat"] * 4
        rewards += [1.0] * 4  # zero variance: advantage 0, not NaN
    if with_singleton:
        uids += ["uid-alone"]
        rewards += [0.7]
    perm = torch.randperm(len(uids), generator=g).tolist()
    index = np.array([uids[i] for i in perm], dtype=object)
    scores = torch.tensor([rewards[i] for i in perm])
    B, T = len(perm), 6
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    token_level_rewards = torch.zeros(B, T)
    token_level_rewards[torch.arange(B), lengths - 1] = scores
    return token_level_rewards, mask, index, scores


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("epsilon", [1e-6, 0.1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_equal_verl_grpo(norm_by_std, epsilon, seed):
    tlr, mask, index, scores = _layout(seed)
    ref, _ = compute_grpo_outcome_advantage(tlr, mask, index, epsilon=epsilon, norm_adv_by_std_in_grpo=norm_by_std)
    adv = group_advantages(
        scores, group_ids=index, scale="group" if norm_by_std else "none", eps=epsilon, singleton="passthrough"
    )
    torch.testing.assert_close(adv[:, None] * mask, ref, rtol=1e-6, atol=1e-6)
    flat = index == "uid-flat"
    assert torch.all(adv[torch.from_numpy(flat)] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_advantages_equal_verl_rloo(seed):
    tlr, mask, index, scores = _layout(seed)
    ref, _ = compute_rloo_outcome_advantage(tlr, mask, index)
    adv = rloo_advantages(scores, group_ids=index, singleton="passthrough")
    torch.testing.assert_close(adv[:, None] * mask, ref, rtol=1e-5, atol=1e-6)


def test_without_singletons_the_default_matches_verl():
    tlr, mask, index, scores = _layout(3, with_singleton=False)
    ref, _ = compute_grpo_outcome_advantage(tlr, mask, index)
    torch.testing.assert_close(group_advantages(scores, group_ids=index)[:, None] * mask, ref, rtol=1e-6, atol=1e-6)
    ref, _ = compute_rloo_outcome_advantage(tlr, mask, index)
    torch.testing.assert_close(rloo_advantages(scores, group_ids=index)[:, None] * mask, ref, rtol=1e-5, atol=1e-6)


def test_group_of_one_is_an_error_by_default():
    """verl silently gives a lone response A = R (no baseline); the core refuses unless asked."""
    _, _, index, scores = _layout(4)
    with pytest.raises(ValueError):
        group_advantages(scores, group_ids=index)
    with pytest.raises(ValueError):
        rloo_advantages(scores, group_ids=index)
