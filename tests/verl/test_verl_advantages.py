"""group_advantages / rloo_advantages == verl's compute_grpo_outcome_advantage /
compute_rloo_outcome_advantage on the same rewards and the same ``uid`` index arrays, including
groups of one and zero-variance groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_rloo_outcome_advantage

from cfpo_loss import group_advantages, rloo_advantages
from cfpo_loss.reference import SAFETY, UNIT_ROUNDOFF, assert_within, sum_bound

# derived rounding bounds: CI runs these again with scalar kernels (noxfile SECOND_ROUNDING)
pytestmark = pytest.mark.rounding


def _bounds(scores, index, estimator, *, norm_by_std=True, epsilon=1e-6):
    """Bound on the fp32 error of ONE evaluation of each response's group advantage (ours and verl's are two,
    written differently: they lie within twice it of each other), first order times SAFETY (u = SAFETY·u_fp32).
    Per group of n rewards R with mean m and unbiased std s (float64 here):
      δm <= sum_bound(R) / n                                           the sum (and the division)
      δs <= (Σ 2·|R − m|·(u·|R − m| + δm) / (n − 1) + (n + 2)·u·s²) / (2s) + u·s     (R − m)², their sum, ÷, sqrt
      GRPO  A = (R − m) / (s + ε): δA <= (u·|R − m| + δm) / (s + ε) + |A|·(δs / (s + ε) + 3u)
            A = R − m (no std):    δA <= u·|A| + δm
      RLOO  A = n/(n − 1)·(R − m): δA <= n/(n − 1)·(3u·(|R| + |m|) + δm) + u·|A|
    A group of one (verl: m = 0, s = 1) carries u·|A| + u·|R|; a group of equal rewards is exact (their sum is
    exact, so m = R and R − m = 0 on both sides)."""
    u = SAFETY * UNIT_ROUNDOFF[torch.float32]
    r = scores.double()
    bound = torch.zeros_like(r)
    for uid in set(index.tolist()):
        rows = torch.from_numpy(index == uid)
        g, n = r[rows], int(rows.sum())
        if n == 1:
            bound[rows] = 2 * u * g.abs()
            continue
        if bool((g == g[0]).all()):
            continue  # exact: see above
        m, s = g.mean(), g.std()
        dm = sum_bound(g) / n
        if estimator == "rloo":
            a = n / (n - 1) * (g - m)
            bound[rows] = n / (n - 1) * (3 * u * (g.abs() + m.abs()) + dm) + u * a.abs()
        elif norm_by_std:
            ds = (float((2 * (g - m).abs() * (u * (g - m).abs() + dm)).sum()) / (n - 1) + (n + 2) * u * s**2) / (2 * s)
            ds = ds + u * s
            a = (g - m) / (s + epsilon)
            bound[rows] = (u * (g - m).abs() + dm) / (s + epsilon) + a.abs() * (ds / (s + epsilon) + 3 * u)
        else:
            bound[rows] = u * (g - m).abs() + dm
    return bound


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
    # two fp32 evaluations written differently: within twice the derived bound (x mask: exact, 0 or 1)
    assert_within(adv[:, None] * mask, ref, 2 * _bounds(scores, index, "grpo", norm_by_std=norm_by_std,
                                                        epsilon=epsilon)[:, None] * mask, "GRPO advantage")  # fmt: skip
    flat = index == "uid-flat"
    assert torch.all(adv[torch.from_numpy(flat)] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_advantages_equal_verl_rloo(seed):
    tlr, mask, index, scores = _layout(seed)
    ref, _ = compute_rloo_outcome_advantage(tlr, mask, index)
    adv = rloo_advantages(scores, group_ids=index, singleton="passthrough")
    assert_within(adv[:, None] * mask, ref, 2 * _bounds(scores, index, "rloo")[:, None] * mask, "RLOO advantage")


def test_without_singletons_the_default_matches_verl():
    tlr, mask, index, scores = _layout(3, with_singleton=False)
    ref, _ = compute_grpo_outcome_advantage(tlr, mask, index)
    bound = 2 * _bounds(scores, index, "grpo")[:, None] * mask  # two fp32 evaluations: twice the derived bound
    assert_within(group_advantages(scores, group_ids=index)[:, None] * mask, ref, bound, "GRPO advantage, default")
    ref, _ = compute_rloo_outcome_advantage(tlr, mask, index)
    bound = 2 * _bounds(scores, index, "rloo")[:, None] * mask
    assert_within(rloo_advantages(scores, group_ids=index)[:, None] * mask, ref, bound, "RLOO advantage, default")


def test_group_of_one_is_an_error_by_default():
    """verl silently gives a lone response A = R (no baseline); the core refuses unless asked."""
    _, _, index, scores = _layout(4)
    with pytest.raises(ValueError):
        group_advantages(scores, group_ids=index)
    with pytest.raises(ValueError):
        rloo_advantages(scores, group_ids=index)
