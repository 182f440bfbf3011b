"""The trust-region metrics where a wrong mask, a rounding or a clamp would show, on all three loss paths.

Padding is neutral inside the core (ratio 1, log-ratio 0, advantage 0, every per-token term 0), so a metric
taken over padding hides whenever the valid values straddle the neutral point: a min over padding is still
the min if some valid ratio lies below 1. Here every metric is held, with padding present, on batches whose
valid log-ratios lie all above 0, all below 0, and on both sides; and on log-ratios beyond the core's ±20
clamp (the metrics see the clamped log-ratio, as verl's do); and k3 where fp32 rounding would make it
negative. Expected values come from plain-Python float64 loops or hand derivations written here.

Paths: eager (``compute_policy_loss``), compiled (``compile=True``) and fused (``fused_linear_policy_loss``, whose
log-probs come from an LM head here); token and sequence ratio level; cfpo, clip and clip with dual_clip.
The (6, 9) float64 batches and the eps of ``test_loss.test_every_metric_by_hand_with_padding`` are reused on
purpose: the compiled path then compiles nothing new for them.
"""

from __future__ import annotations

import math

import pytest
import torch

from cfpo_loss import compute_policy_loss, fused_linear_policy_loss
from cfpo_loss.reference import SAFETY, UNIT_ROUNDOFF, assert_within, sum_bound

pytestmark = pytest.mark.rounding

B, T, H, V = 6, 9, 8, 11
EPS_LOW, EPS_HIGH = 0.2, 0.28
CLAMP = 20.0  # verl: log_ratio.clamp(-20, 20) before exp, and ppo_kl from the clamped log-ratio
PATHS = ("eager", "fast", "fused")
OBJECTIVES = [("cfpo", None), ("clip", 1.5), ("clip", None)]


def lm_head(seed=0, dtype=torch.float64):
    """hidden (B, T, H), weight (V, H), targets (B, T) and the targets' log-probs computed here in float64."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B, T), generator=g)
    logits = hidden @ weight.T
    log_prob = logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), target=target, log_prob=log_prob, logits=logits)


def run(path, log_prob, old_log_prob, advantages, mask, head=None, **kw):
    """One loss call on ``path``; for "fused" the log-probs are the LM head's (``head``), not ``log_prob``."""
    if path == "fused":
        target = head["target"].masked_fill(~mask, -100)  # padding holds garbage ids too
        return fused_linear_policy_loss(
            head["hidden"], head["weight"], target, old_log_prob, advantages, mask, chunk_size=7, **kw
        )
    return compute_policy_loss(log_prob, old_log_prob, advantages, mask, compile=path == "fast", **kw)


def clamp(x):
    return max(-CLAMP, min(CLAMP, x))


def reference_metrics(log_prob, old_log_prob, advantages, mask, *, objective, dual_clip, ratio_level):
    """Every metric from loops over the valid tokens in float64; the log-ratio clamped to ±20 first."""
    tokens = []  # (ratio as the objective uses it, clamped token log-ratio, advantage)
    for b in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[b, t]]
        if not valid:
            continue
        logr = [clamp(float(log_prob[b, t]) - float(old_log_prob[b, t])) for t in valid]
        seq_ratio = math.exp(sum(logr) / len(logr))
        for lr, t in zip(logr, valid):
            tokens.append((math.exp(lr) if ratio_level == "token" else seq_ratio, lr, float(advantages[b, t])))
    n = len(tokens)
    ratios = [r for r, _, _ in tokens]
    high = sum(1 for r, _, a in tokens if a > 0 and r > 1 + EPS_HIGH) / n
    low = sum(1 for r, _, a in tokens if a < 0 and r < 1 - EPS_LOW) / n
    expected = {
        "ratio_mean": sum(ratios) / n,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_dev": sum(abs(r - 1) for r in ratios) / n,
        "tr_exit_high": high,
        "tr_exit_low": low,
        "tr_exit_frac": high + low,
        "approx_kl_k1": sum(-lr for _, lr, _ in tokens) / n,
        "approx_kl_k3": sum(math.exp(lr) - 1 - lr for _, lr, _ in tokens) / n,
    }
    if objective == "cfpo":
        expected["penalty"] = (
            sum(abs(a) / (2 * (EPS_HIGH if a > 0 else EPS_LOW)) * (r - 1) ** 2 for r, _, a in tokens) / n
        )
    if dual_clip is not None:
        expected["dual_clip_frac"] = sum(1 for r, _, a in tokens if a < 0 and r > dual_clip) / n
    return expected


#: The inputs here are float64, and so is the metrics' arithmetic; each metric is then stored as fp32, one rounding:
#: |error| <= u_fp32·|m|, plus the float64 sums' (n + 1)·u_fp64·Σ|term| / n <= 55·1.1e-16·max|term| (n <= 54 tokens,
#: terms up to e^20 ~ 4.9e8 in the clamp tests: < 3e-6), times SAFETY. A wrong metric is off by far more.
REL = SAFETY * UNIT_ROUNDOFF[torch.float32]
ABS = SAFETY * (B * T + 1) * UNIT_ROUNDOFF[torch.float64] * math.exp(CLAMP)


def assert_metrics(floats, expected, rel=REL, abs_=ABS):
    assert set(floats) == set(expected)
    for k, v in expected.items():
        assert_within(floats[k], v, rel * abs(v) + abs_, k)


# ---- valid values all above, all below, and on both sides of the neutral point, padding present ----------


def side_batch(side, head):
    """Valid log-ratios in [0.05, 0.7] in size: all > 0 ("above"), all < 0 ("below"), or of both signs, per token
    and per row ("straddle"). Padding in every row, one row fully masked; NaN / inf garbage at padding."""
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, :2] = True
    mask[:, -1] = False
    mask[2] = False
    size = 0.05 + 0.65 * torch.rand(B, T, generator=g, dtype=torch.float64)
    if side == "straddle":  # rows 0, 3 lean up, the others down; one token against its row's lean
        row = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:, None]
        sign = row * torch.where(torch.arange(T) == 1, -0.3, 1.0)
    else:
        sign = torch.full((B, T), 1.0 if side == "above" else -1.0, dtype=torch.float64)
    log_prob = head["log_prob"]
    old = log_prob - sign * size
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = advantages + 0.1 * advantages.sign()  # |A| >= 0.1, both signs
    old_dirty = torch.where(mask, old, torch.tensor(float("nan"), dtype=old.dtype))
    adv_dirty = torch.where(mask, advantages, torch.tensor(float("inf"), dtype=old.dtype))
    return old, old_dirty, advantages, adv_dirty, mask


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("objective,dual_clip", OBJECTIVES)
@pytest.mark.parametrize("side", ["above", "below", "straddle"])
def test_every_metric_with_valid_values_on_one_side_of_the_padding(side, objective, dual_clip, ratio_level, path):
    """ratio_min over padding would be 1 when every valid ratio is above 1, ratio_max 1 when every one is below;
    a count or sum over padding shows on every side. Also fused's kl (TRL's k3 against ref_log_prob) and
    entropy, whose per-token values are >= 0, like padding's 0."""
    head = lm_head()
    old, old_dirty, adv, adv_dirty, mask = side_batch(side, head)
    lp = head["log_prob"].clone().requires_grad_()
    kw = dict(objective=objective, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=dual_clip, ratio_level=ratio_level)
    ref_lp = None
    if path == "fused":
        ref_lp = head["log_prob"] - 0.4 * torch.linspace(-1, 1, B * T, dtype=torch.float64).reshape(B, T)
        kw.update(beta=0.05, ref_log_prob=ref_lp.masked_fill(~mask, float("inf")), compute_entropy=True)
    out = run(path, lp, old_dirty, adv_dirty, mask, head, **kw)
    expected = reference_metrics(
        head["log_prob"], old, adv, mask, objective=objective, dual_clip=dual_clip, ratio_level=ratio_level
    )
    if path == "fused":
        valid = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
        deltas = [float(ref_lp[b, t] - head["log_prob"][b, t]) for b, t in valid]
        expected["kl"] = sum(math.exp(d) - d - 1 for d in deltas) / len(valid)
        p = head["logits"].softmax(-1)
        expected["entropy"] = sum(float(-(p[b, t] * p[b, t].log()).sum()) for b, t in valid) / len(valid)
    assert_metrics(out.metric_floats(), expected)
    # the fixture is what its name says (checked on the expected values, not on the code under test)
    if side == "above":
        assert expected["ratio_min"] > 1 and expected["approx_kl_k1"] < 0
    elif side == "below":
        assert expected["ratio_max"] < 1 and expected["approx_kl_k1"] > 0
    else:
        assert expected["ratio_min"] < 1 < expected["ratio_max"]
    if side != "below":
        assert expected["tr_exit_high"] > 0 and (dual_clip is None or expected["dual_clip_frac"] > 0)
    if side != "above":
        assert expected["tr_exit_low"] > 0


# ---- log-ratios beyond the ±20 clamp: the metrics see the clamped log-ratio ---------------------------------


def test_metrics_of_log_ratios_beyond_the_clamp_by_hand():
    """Valid tokens with log-ratios 30, -25 (row 0), 21, -21 (row 1), 40, -0.5 (row 3); A = +1, -1, +0.5 per row.
    Clamped: 20, -20, 20, -20, 20, -0.5 (as verl: ratio = exp(clamp(log r, -20, 20)), ppo_kl = mean of
    -clamp(log r)). Raw log-ratios would give k1 = -44.5/6 instead of -19.5/6, and a sequence ratio e^2.5
    instead of 1 for row 0."""
    lr = {(0, 0): 30.0, (0, 1): -25.0, (1, 0): 21.0, (1, 1): -21.0, (3, 0): 40.0, (3, 1): -0.5}
    row_adv = {0: 1.0, 1: -1.0, 3: 0.5}
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, t in lr:
        mask[b, t] = True
    e = math.exp
    n = 6
    by_hand = {  # token level
        "ratio_min": e(-20),
        "ratio_max": e(20),
        "ratio_mean": (3 * e(20) + 2 * e(-20) + e(-0.5)) / n,
        "approx_kl_k1": -19.5 / n,
        "approx_kl_k3": (3 * (e(20) - 21) + 2 * (e(-20) + 19) + e(-0.5) - 0.5) / n,
        "tr_exit_high": 2 / n,
        "tr_exit_low": 1 / n,  # rows 0 and 3 at e^20 with A > 0; row 1 at e^-20 with A < 0
    }
    seq_by_hand = {  # rows' ratios: exp(mean clamped log r) = 1, 1, e^9.75
        "ratio_min": 1.0,
        "ratio_max": e(9.75),
        "ratio_mean": (4 + 2 * e(9.75)) / n,
        "approx_kl_k1": -19.5 / n,
        "approx_kl_k3": by_hand["approx_kl_k3"],
        "tr_exit_high": 2 / n,
        "tr_exit_low": 0.0,
    }
    head = lm_head(seed=2)
    old = head["log_prob"].clone()
    adv = torch.zeros(B, T, dtype=torch.float64)
    for (b, t), x in lr.items():
        old[b, t] = head["log_prob"][b, t] - x
        adv[b] = row_adv[b]
    old_dirty = torch.where(mask, old, torch.tensor(float("-inf"), dtype=old.dtype))
    for path in PATHS:
        for ratio_level, hand in (("token", by_hand), ("sequence", seq_by_hand)):
            for objective, dual_clip in OBJECTIVES:
                out = run(
                    path,
                    head["log_prob"].clone().requires_grad_(),
                    old_dirty,
                    adv,
                    mask,
                    head,
                    objective=objective,
                    eps_low=EPS_LOW,
                    eps_high=EPS_HIGH,
                    dual_clip=dual_clip,
                    ratio_level=ratio_level,
                )
                floats = out.metric_floats()
                for k, v in hand.items():
                    assert_within(floats[k], v, REL * abs(v) + ABS, f"{path} {ratio_level} {objective} {k}")
                assert_metrics(
                    floats,
                    reference_metrics(
                        head["log_prob"],
                        old,
                        adv,
                        mask,
                        objective=objective,
                        dual_clip=dual_clip,
                        ratio_level=ratio_level,
                    ),
                )


# ---- k3 is never negative, also where fp32 rounds (r - 1) - log r below zero -------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_k3_is_never_negative_where_fp32_rounds_r_to_1(ratio_level, path):
    """fp32, log r = x in [1e-8, 5e-8] at every valid token: exp(x) rounds to exactly 1 (x < 2**-24), so
    (r - 1) - log r computed naively is -x < 0, while k3 = e^x - 1 - x = x²/2 + O(x³) <= 1.25e-15.
    The fused path gets log π = 0 exactly: target logit 30, all others 0 (log(1 + 10·e^-30) rounds to 0)."""
    b, t = 6, 11  # test_per_token's fp32 shape
    g = torch.Generator().manual_seed(3)
    x = 1e-8 + 4e-8 * torch.rand(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    mask[2] = False
    old = torch.where(mask, -x, torch.tensor(float("nan")))
    adv = torch.randn(b, generator=g)
    hidden = torch.zeros(b, t, H)
    hidden[..., 0] = 30.0
    weight = torch.zeros(V, H)
    weight[4, 0] = 1.0
    head = dict(hidden=hidden, weight=weight, target=torch.full((b, t), 4))
    xs = x[mask].double()
    for objective in ("cfpo", "clip"):
        out = run(
            path,
            torch.zeros(b, t, requires_grad=True),
            old,
            adv,
            mask,
            head,
            objective=objective,
            eps_low=EPS_LOW,
            eps_high=EPS_HIGH,
            ratio_level=ratio_level,
        )
        floats = out.metric_floats()
        assert floats["approx_kl_k3"] >= 0.0, (objective, floats["approx_kl_k3"])
        assert floats["approx_kl_k3"] == pytest.approx(float((xs**2 / 2).mean()), abs=1e-14)
        # fp32: log r = 0 - (-x) is exact, the mean sums n positive fp32 terms (reference.sum_bound)
        assert_within(floats["approx_kl_k1"], float(-xs.mean()), sum_bound(xs) / xs.numel(), "k1")


# ---- metric_floats() reads the metrics dict as it is when called ------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_metric_floats_reflect_the_dict_when_called(path):
    """The loss's one sync already brought the metrics to the host; metric_floats() serves that copy only while
    ``metrics`` still holds those tensors, unmodified. An entry added, replaced, removed, or written in place
    appears in the next call."""
    head = lm_head(seed=4)
    _, old_dirty, _, adv_dirty, mask = side_batch("straddle", head)
    out = run(
        path,
        head["log_prob"].clone().requires_grad_(),
        old_dirty,
        adv_dirty,
        mask,
        head,
        objective="cfpo",
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
    )
    before = out.metric_floats()
    assert before == {k: v.item() for k, v in out.metrics.items()}
    out.metrics["ratio_mean"] = torch.tensor(42.0)  # replaced: same keys as the loss returned
    assert out.metric_floats() == {**before, "ratio_mean": 42.0}
    out.metrics["extra"] = torch.tensor(2.5)  # added
    assert out.metric_floats() == {**before, "ratio_mean": 42.0, "extra": 2.5}
    del out.metrics["extra"], out.metrics["penalty"]  # removed
    assert out.metric_floats() == {k: v for k, v in {**before, "ratio_mean": 42.0}.items() if k != "penalty"}

    fresh = run(
        path,
        head["log_prob"].clone().requires_grad_(),
        old_dirty,
        adv_dirty,
        mask,
        head,
        objective="cfpo",
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
    )
    assert fresh.metric_floats() == before
    fresh.metrics["ratio_max"].fill_(7.0)  # written in place (a view of the one buffer, on eager and fast)
    assert fresh.metric_floats() == {**before, "ratio_max": 7.0}


@pytest.mark.parametrize("path", PATHS)
def test_metrics_carry_no_graph(path):
    """Detached metrics, even when the advantages (or weights) require grad: a logger must not keep graphs alive."""
    head = lm_head(seed=5)
    _, old_dirty, adv, _, mask = side_batch("straddle", head)
    out = run(
        path,
        head["log_prob"].clone().requires_grad_(),
        old_dirty,
        adv.clone().requires_grad_(),
        mask,
        head,
        objective="cfpo",
        weights=torch.rand(B, T, dtype=torch.float64, requires_grad=True),
    )
    assert not any(v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("path", ["eager", "fast"])
def test_exit_fractions_count_neither_zero_advantages_nor_tokens_on_the_boundary(path):
    """A = 0 exactly (a GRPO group whose rewards are all equal) pushes nowhere: such a token is no exit, however far
    its ratio lies (TRL: `(ratio > 1 + eps_high) & (A > 0)`; verl's clip fraction compares -A·r with -A·clip(r),
    equal when A = 0). A ratio exactly on the boundary 1 - eps_low, 1 + eps_high or dual_clip is inside (strict
    comparisons, as the frameworks' clip fractions). eps 0.25 / 0.5, c = 2.5: exp(log x) is exactly x here."""
    b, t = B, T
    lr = {
        (0, 0): math.log(0.75),
        (0, 1): math.log(1.5),
        (1, 0): math.log(2.5),  # on the boundaries
        (3, 0): 2.0,
        (3, 1): -2.0,
        (4, 0): 1.5,  # far outside, A = 0
        (5, 0): 0.6,
        (5, 1): -0.4,
    }  # outside with A pushing: the cases that count
    adv_of = {(0, 0): -1.0, (0, 1): 1.0, (1, 0): -1.0, (3, 0): 0.0, (3, 1): 0.0, (4, 0): 0.0, (5, 0): 1.0, (5, 1): -1.0}
    mask = torch.zeros(b, t, dtype=torch.bool)
    lp = torch.zeros(b, t, dtype=torch.float64)
    old = torch.full((b, t), float("nan"), dtype=torch.float64)
    adv = torch.full((b, t), float("inf"), dtype=torch.float64)
    for key, x in lr.items():
        mask[key], old[key], adv[key] = True, -x, adv_of[key]
    on_boundary = torch.exp(lp - old)[[0, 0, 1], [0, 1, 0]]
    assert on_boundary.tolist() == [0.75, 1.5, 2.5]  # the fixture is exact
    out = compute_policy_loss(
        lp.requires_grad_(),
        old,
        adv,
        mask,
        objective="clip",
        eps_low=0.25,
        eps_high=0.5,
        dual_clip=2.5,
        compile=path == "fast",
    )
    floats = out.metric_floats()
    n = len(lr)
    assert floats["tr_exit_high"] == pytest.approx(1 / n)  # (5, 0) only
    assert floats["tr_exit_low"] == pytest.approx(1 / n)  # (5, 1) only
    assert floats["tr_exit_frac"] == pytest.approx(2 / n)
    assert floats["dual_clip_frac"] == 0.0  # (1, 0) sits on c; (3, 0) and (4, 0) beyond it have A = 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_a_batch_with_no_valid_token_reports_zero_means_and_ratio_extremes_of_one(ratio_level, path):
    """As documented in metrics.py: no valid token -> every mean 0, ratio_min = ratio_max = 1 (ratio_mean 1: r = 1
    is what an empty batch "used"), whatever garbage the padding holds."""
    head = lm_head(seed=6)
    mask = torch.zeros(B, T, dtype=torch.bool)
    old = torch.full((B, T), float("nan"), dtype=torch.float64)
    out = run(
        path,
        head["log_prob"].clone().requires_grad_(),
        old,
        torch.full((B,), float("inf"), dtype=torch.float64),
        mask,
        head,
        objective="clip",
        dual_clip=3.0,
        ratio_level=ratio_level,
    )
    expected = dict.fromkeys(
        ["ratio_dev", "tr_exit_frac", "tr_exit_low", "tr_exit_high", "approx_kl_k1", "approx_kl_k3", "dual_clip_frac"],
        0.0,
    )
    expected.update(ratio_mean=1.0, ratio_min=1.0, ratio_max=1.0)
    assert out.metric_floats() == expected
