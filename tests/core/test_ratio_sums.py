"""metrics.ratio_sums: the reducible pieces (count, sums, extremes) the ratio statistics are built from, which an
adapter that reduces across ranks itself (TRL's) adds up over its ranks. Expected values by hand, in plain Python."""

from __future__ import annotations

import pytest
import torch

from cfpo_loss import compute_policy_loss, get_objective
from cfpo_loss.metrics import RatioSums, ratio_sums
from cfpo_loss.reference import SAFETY, UNIT_ROUNDOFF


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    log_prob = torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.4
    old = torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return log_prob, old, adv, mask


def _by_hand(ratio, adv, mask, eps=0.2):
    valid = [(r, a) for r, a, m in zip(ratio.flatten().tolist(), adv.expand_as(ratio).flatten().tolist(),
                                       mask.flatten().tolist()) if m]  # fmt: skip
    return dict(count=len(valid), deviation=sum(r - 1 for r, _ in valid),
                abs_deviation=sum(abs(r - 1) for r, _ in valid), ratio_min=min(r for r, _ in valid),
                ratio_max=max(r for r, _ in valid),
                penalty=sum(abs(a) / (2 * eps) * (r - 1) ** 2 for r, a in valid))  # fmt: skip


def test_sums_and_extremes_over_the_valid_entries_only():
    log_prob, old, adv, mask = _batch(0)
    ratio = torch.where(mask, (log_prob - old).exp(), 1.0)  # neutral at masked positions, as the contract says
    penalty = torch.where(mask, get_objective("cfpo").terms(ratio, adv, 0.2, 0.2, None).penalty, 0.0)
    sums = ratio_sums(ratio, mask, penalty=penalty)
    assert isinstance(sums, RatioSums)
    for name, value in _by_hand(ratio, adv, mask).items():
        assert getattr(sums, name).item() == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert ratio_sums(ratio, mask).penalty is None
    # no valid entry: count 0, sums 0, extremes +inf / -inf (so a max / min across ranks ignores this one)
    empty = ratio_sums(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert empty.count.item() == 0 and empty.deviation.item() == 0 and empty.abs_deviation.item() == 0
    assert empty.ratio_min.item() == float("inf") and empty.ratio_max.item() == float("-inf")


def test_sums_of_parts_give_the_core_metrics_of_the_whole():
    """What a cross-rank reduction does: the sums of two shards, added (extremes: min / max), divided by the total
    count, equal the masked means compute_policy_loss reports for the whole batch."""
    log_prob, old, adv, mask = _batch(1)
    whole = compute_policy_loss(log_prob, old, adv, mask, objective="cfpo", eps_low=0.2, eps_high=0.28)
    ratio = torch.where(mask, (log_prob - old).exp(), 1.0)
    penalty = torch.where(mask, get_objective("cfpo").terms(ratio, adv.expand_as(ratio), 0.2, 0.28, None).penalty, 0.0)
    parts = [ratio_sums(ratio[rows], mask[rows], penalty=penalty[rows]) for rows in (slice(0, 1), slice(1, 3))]
    count = sum(p.count for p in parts).item()
    m = whole.metric_floats()  # an fp32 buffer
    # float64 sums on both sides (15 terms: error ~1e-15); the metrics then stored as fp32, one rounding of u_fp32
    rel = SAFETY * UNIT_ROUNDOFF[torch.float32]
    assert count == mask.sum().item()
    assert sum(p.deviation for p in parts).item() / count + 1 == pytest.approx(m["ratio_mean"], rel=rel)
    assert sum(p.abs_deviation for p in parts).item() / count == pytest.approx(m["ratio_dev"], rel=rel)
    assert sum(p.penalty for p in parts).item() / count == pytest.approx(m["penalty"], rel=rel)
    assert min(p.ratio_min for p in parts).item() == pytest.approx(m["ratio_min"], rel=rel)
    assert max(p.ratio_max for p in parts).item() == pytest.approx(m["ratio_max"], rel=rel)
