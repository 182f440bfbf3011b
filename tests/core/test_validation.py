"""Every bad input named in the contract raises a clear error naming the argument."""

import pytest
import torch

from cfpo_loss import aggregate_loss, cfpo_surrogate, clipped_surrogate, compute_policy_loss
from cfpo_loss import reference as cfpo_reference


def good(b=2, t=3):
    return dict(
        log_prob=torch.zeros(b, t),
        old_log_prob=torch.zeros(b, t),
        advantages=torch.ones(b),
        mask=torch.ones(b, t, dtype=torch.bool),
    )


def call(**over):
    kw = good()
    kw.update(over)
    args = [kw.pop(k) for k in ("log_prob", "old_log_prob", "advantages", "mask")]
    return compute_policy_loss(*args, **kw)


@pytest.mark.parametrize(
    "over,exc,pattern",
    [
        (
            dict(old_log_prob=torch.zeros(2, 4)),
            ValueError,
            r"old_log_prob must have the shape of log_prob \(2, 3\), got \(2, 4\)",
        ),
        (dict(advantages=torch.ones(3)), ValueError, r"advantages must be .* got \(3,\)"),
        (dict(mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, r"mask must have the shape"),
        (dict(log_prob=torch.zeros(6)), ValueError, r"log_prob must be \(B, T\)"),
        (dict(weights=torch.ones(2, 2)), ValueError, r"weights must have the shape"),
        (dict(log_prob=torch.zeros(2, 3, dtype=torch.long)), TypeError, r"log_prob must be a floating-point"),
        (dict(advantages=[1.0, 1.0]), TypeError, r"advantages must be a torch.Tensor"),
        (dict(mask=torch.full((2, 3), 0.5)), ValueError, r"mask must be bool or hold only 0 and 1"),
        (dict(mask=torch.full((2, 3), 2)), ValueError, r"mask must be bool or hold only 0 and 1"),
        (
            dict(log_prob=torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])),
            ValueError,
            r"log_prob holds 1 non-finite",
        ),
        (
            dict(old_log_prob=torch.tensor([[0.0, float("-inf"), 0.0], [0.0, 0.0, 0.0]])),
            ValueError,
            r"old_log_prob holds 1 non-finite",
        ),
        (dict(advantages=torch.tensor([1.0, float("inf")])), ValueError, r"advantages holds 3 non-finite"),
        (dict(weights=torch.full((2, 3), float("nan"))), ValueError, r"weights holds 6 non-finite"),
        (dict(eps_low=0.0), ValueError, r"eps_low must lie in \(0, 1\)"),
        (dict(eps_low=-0.1), ValueError, r"eps_low"),
        (dict(eps_low=1.0), ValueError, r"eps_low"),
        (dict(eps_high=0.0), ValueError, r"eps_high must be > 0"),
        (dict(eps_high=float("nan")), ValueError, r"eps_high must be finite"),
        (dict(eps_low="0.2"), TypeError, r"eps_low must be a float"),
        (dict(objective="clip", dual_clip=1.0), ValueError, r"dual_clip must be > 1"),
        (dict(objective="spo"), ValueError, r"unknown objective 'spo'; valid: 'cfpo', 'clip'"),
        (dict(agg="mean"), ValueError, r"unknown agg 'mean'; valid: 'token-mean', 'token-sum', 'seq-mean-token-sum'"),
        (dict(ratio_level="group"), ValueError, r"unknown ratio_level 'group'; valid: 'token', 'sequence'"),
        (dict(dp_size=0), ValueError, r"dp_size must be a positive int"),
        (dict(batch_num_tokens=0), ValueError, r"batch_num_tokens must be > 0"),
        # every tensor argument is named in its own type error (mutation testing found these unpinned)
        (dict(old_log_prob=[[0.0] * 3] * 2), TypeError, r"old_log_prob must be a torch.Tensor"),
        (dict(weights=[[1.0] * 3] * 2), TypeError, r"weights must be a torch.Tensor"),
        (dict(weights=torch.ones(2, 3, dtype=torch.long)), TypeError, r"weights must be a floating-point"),
        (dict(compile="yes"), ValueError, r"unknown compile 'yes'"),
        (dict(mask=[[True] * 3] * 2), TypeError, r"mask must be a torch.Tensor"),
        (dict(objective="clip", dual_clip="3"), TypeError, r"dual_clip must be a float"),
        (dict(dp_size=True), ValueError, r"dp_size must be a positive int"),
        (dict(global_batch_size=0, agg="seq-mean-token-mean"), ValueError, r"global_batch_size must be > 0"),
        (dict(loss_scale_factor=0.0, agg="seq-mean-token-sum-norm"), ValueError, r"loss_scale_factor must be > 0"),
    ],
)
def test_bad_input_raises(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(**over)


def test_device_mismatch_on_meta():
    with pytest.raises(ValueError, match=r"old_log_prob is on meta but log_prob is on cpu"):
        call(old_log_prob=torch.zeros(2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"mask is on meta"):
        call(mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"advantages is on meta but log_prob is on cpu"):
        call(advantages=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match=r"weights is on meta but log_prob is on cpu"):
        call(weights=torch.ones(2, 3, device="meta"))


def test_advantages_per_sequence_as_b_or_b_by_1():
    """(B,) and (B, 1) advantages are the same per-sequence advantages, broadcast over T; (T, 1) is not (B, 1)."""
    lp, old = torch.randn(2, 3), torch.randn(2, 3)
    adv = torch.tensor([0.5, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    a = compute_policy_loss(lp, old, adv, mask).loss
    b = compute_policy_loss(lp, old, adv[:, None], mask).loss
    c = compute_policy_loss(lp, old, adv[:, None].expand(2, 3), mask).loss
    assert a.item() == b.item() == c.item()
    with pytest.raises(ValueError, match=r"advantages must be \(B,\), \(B, 1\) or \(B, T\)"):
        compute_policy_loss(lp, old, torch.ones(3, 1), mask)


def test_check_finite_can_be_turned_off():
    lp = torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])
    out = call(log_prob=lp, check_finite=False)
    assert torch.isnan(out.loss)  # the user asked not to be told; the NaN is theirs


def test_surrogates_check_their_arguments():
    r, a = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match="eps_low"):
        cfpo_surrogate(r, a, eps_low=0.0)
    with pytest.raises(ValueError, match="eps_high"):
        clipped_surrogate(r, a, eps_high=-1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(r, a, dual_clip=0.5)


def test_aggregate_loss_checks_shapes_and_mode():
    with pytest.raises(ValueError, match="equal shapes"):
        aggregate_loss(torch.ones(2, 3), torch.ones(2, 4, dtype=torch.bool), "token-mean")
    with pytest.raises(ValueError, match="unknown agg"):
        aggregate_loss(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), "sum")


@pytest.mark.parametrize("fast", [False, True])
def test_a_bad_01_mask_raises_with_and_without_the_finite_check(fast):
    for check_finite in (True, False):
        with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
            call(mask=torch.tensor([[1, 0, 2], [1, 1, 1]]), check_finite=check_finite, compile=fast)
    # a valid 0/1 mask of another dtype is the bool mask
    a = call(mask=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), log_prob=torch.randn(2, 3))
    assert torch.isfinite(a.loss)


class _Syncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Device-to-host waits: what .item() / bool() / nonzero dispatch to, plus every Tensor.tolist() call (on
    CPU tolist does not go through the dispatcher; on a GPU it is one transfer)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "item")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_one_device_sync_per_call_metrics_included(monkeypatch, mask_dtype, fast):
    """The finite check is the loss's one sync and brings the metrics with it; a 0/1 mask's value check rides
    on it too. Without the finite check: no sync, and reading the metrics is one."""
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(4, 5, generator=g, requires_grad=True)
    old, adv = lp.detach() + 0.3 * torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).to(mask_dtype)
    reference = compute_policy_loss(lp, old, adv, mask, check_finite=False)
    expected = {k: v.item() for k, v in reference.metrics.items()}
    compute_policy_loss(lp, old, adv, mask, compile=fast)  # warm-up (compilation)
    for check_finite, in_call, in_read in ((True, 1, 0), (False, 0 if mask_dtype == torch.bool else 1, 1)):
        with _Syncs(monkeypatch) as probe:
            out = compute_policy_loss(lp, old, adv, mask, check_finite=check_finite, compile=fast)
            out.loss.backward()
            assert probe.count == in_call, (check_finite, probe.count)
            floats = out.metric_floats()
            assert probe.count == in_call + in_read, (check_finite, probe.count)
        assert floats.keys() == expected.keys()
        bounds = cfpo_reference.policy_metric_bounds(lp, old, adv, mask)  # two fp32 evaluations: twice the bound
        for k in expected:
            cfpo_reference.assert_within(floats[k], expected[k], 2 * bounds[k], k)


def test_cfpo_ignores_dual_clip():
    """dual_clip means nothing to CFPO (it clips nothing): not validated, no dual_clip_frac, the same loss."""
    g = torch.Generator().manual_seed(0)
    lp, old = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    plain = call(log_prob=lp, old_log_prob=old)
    for c in (0.5, 3.0):
        out = call(log_prob=lp, old_log_prob=old, dual_clip=c)
        assert out.loss.item() == plain.loss.item()
        assert out.metric_floats() == plain.metric_floats() and "dual_clip_frac" not in out.metrics
