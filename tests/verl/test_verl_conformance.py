"""The verl loss path against verl's own losses and the paper's equation.

* clip objective through the adapter path (make_policy_loss("clip"), dual_clip = clip_ratio_c)
  == verl's registered ``vanilla`` loss: value, gradient, metrics, every loss_agg_mode, with and
  without rollout_is_weights and global_batch_info, bool and float masks.
* clip objective at sequence level == verl's ``gspo`` loss (which on verl < 0.9.1 ignores
  loss_agg_mode and aggregates "seq-mean-token-mean": compared in that mode there).
* the registered ``cfpo`` / ``cfpo_seq`` == the paper's per-token objective
  J = r·A − |A|/(2ε)·(r−1)², aggregated by verl's own ``agg_loss``.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn
from verl_helpers import (
    AGG_MODES,
    GSPO_HONOURS_AGG_MODE,
    HAS_TOKEN_SUM,
    VERL_VERSION,
    actor_config,
    global_info,
    make_batch,
    rounding_bounds,
)

from cfpo_loss.adapters.verl import make_policy_loss
from cfpo_loss.reference import assert_within

# derived rounding bounds: CI runs these again with scalar kernels (noxfile SECOND_ROUNDING)
pytestmark = pytest.mark.rounding

VERL_KEYS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")


def _assert_two_fp32(got, want, bounds, keys=(), what=""):
    """(loss, grad, metrics) of two fp32 evaluations written differently (ours against verl's loss, or against the
    paper's equation evaluated in fp32 here): each lies within ``bounds`` (verl_helpers.rounding_bounds: derived from
    the computation) of the exact value, so they lie within twice it of each other."""
    (loss, grad, m), (ref_loss, ref_grad, ref_m), (bound, metric_bound) = got, want, bounds
    assert_within(loss, ref_loss, 2 * bound.loss, f"{what} loss")
    assert_within(grad, ref_grad, 2 * bound.grad, f"{what} d loss / d log_prob")  # exactly 0 off the mask in both
    for key in keys:
        assert_within(m[key], ref_m[key], 2 * metric_bound[key], f"{what} {key}")


def _run(fn, old, new, adv, mask, mode, cfg, weights):
    leaf = new.detach().clone().requires_grad_(True)
    loss, metrics = fn(old, leaf, adv, mask, mode, cfg, weights)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


def _paper_cfpo(ratio, adv, eps_low, eps_high):
    eps = torch.where(adv > 0, torch.full_like(adv, eps_high), torch.full_like(adv, eps_low))
    return ratio * adv - adv.abs() / (2 * eps) * (ratio - 1) ** 2


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("use_weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("gbi", ["none", "global"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_clip_path_equals_verl_vanilla(mode, use_weights, gbi, mask_dtype):
    old, new, adv, mask, w = make_batch(seed=1)
    mask = mask.to(mask_dtype)
    weights = w if use_weights else None
    cfg = actor_config("vanilla", mode, global_info(mask.bool(), gbi))
    vanilla = get_policy_loss_fn("vanilla")
    ref_loss, ref_grad, ref_m = _run(vanilla, old, new, adv, mask, mode, cfg, weights)
    loss, grad, m = _run(make_policy_loss("clip"), old, new, adv, mask, mode, cfg, weights)

    bounds = rounding_bounds(old, new, adv, mask, mode, cfg.global_batch_info, weights, objective="clip")
    _assert_two_fp32((loss, grad, m), (ref_loss, ref_grad, ref_m), bounds, VERL_KEYS, mode)
    assert isinstance(m["actor/pg_clipfrac"], float)


def test_fixture_exercises_both_clips_and_dual_clip():
    """The batch above really hits the upper clip, the lower clip and the dual clip."""
    old, new, adv, mask, _ = make_batch(seed=1)
    cfg = actor_config("vanilla")
    _, m = get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-mean", cfg, None)
    assert m["actor/pg_clipfrac"] > 0 and m["actor/pg_clipfrac_lower"] > 0
    _, mc = make_policy_loss("clip")(old, new, adv, mask, "token-mean", cfg, None)
    assert mc["actor/cfpo/tr_exit_low"] > 0 and mc["actor/cfpo/tr_exit_high"] > 0


def test_clip_ratio_fallback_with_dictconfig():
    """clip_ratio_low/high = None fall back to clip_ratio, as vanilla reads them (legacy DictConfig)."""
    old, new, adv, mask, w = make_batch(seed=2)
    cfg = OmegaConf.create(
        {
            "clip_ratio": 0.25,
            "clip_ratio_low": None,
            "clip_ratio_high": None,
            "clip_ratio_c": 2.5,
            "global_batch_info": {},
        }
    )
    ref_loss, ref_grad, ref_m = _run(get_policy_loss_fn("vanilla"), old, new, adv, mask, "token-mean", cfg, w)
    loss, grad, m = _run(make_policy_loss("clip"), old, new, adv, mask, "token-mean", cfg, w)
    bounds = rounding_bounds(old, new, adv, mask, "token-mean", {}, w, objective="clip", eps_low=0.25, eps_high=0.25,
                             dual_clip=2.5)  # fmt: skip
    _assert_two_fp32((loss, grad, m), (ref_loss, ref_grad, ref_m), bounds, VERL_KEYS)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("weights_kind", ["none", "per_row"])
def test_clip_sequence_level_equals_verl_gspo(mode, weights_kind):
    """Sequence-level ratio: our clip objective at ratio_level="sequence" == verl's gspo loss.

    (Gradients agree when the per-token weights are constant within a row; verl's GSPO-token form
    sg[s_i]·π_t/sg[π_t] and the core's exp(mean_t log r) then give the same gradient.)
    """
    old, new, adv, mask, w = make_batch(seed=3, spread=0.4)
    weights = None if weights_kind == "none" else w[:, :1].expand_as(w).contiguous()
    cfg = actor_config("gspo", mode, global_info(mask, "global"), clip_ratio_c=10.0)  # gspo has no dual clip
    ref_loss, ref_grad, ref_m = _run(get_policy_loss_fn("gspo"), old, new, adv, mask, mode, cfg, weights)
    # verl < 0.9.1's gspo always aggregates seq-mean-token-mean, whatever loss_agg_mode says
    ours_mode = mode if GSPO_HONOURS_AGG_MODE else "seq-mean-token-mean"
    loss, grad, m = _run(make_policy_loss("clip", "sequence"), old, new, adv, mask, ours_mode, cfg, weights)
    bounds = rounding_bounds(old, new, adv, mask, ours_mode, cfg.global_batch_info, weights, objective="clip",
                             ratio_level="sequence", dual_clip=10.0)  # fmt: skip
    _assert_two_fp32((loss, grad, m), (ref_loss, ref_grad, ref_m), bounds, VERL_KEYS, ours_mode)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("use_weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("gbi", ["none", "global"])
def test_registered_cfpo_equals_paper_equation_with_verl_agg_loss(mode, use_weights, gbi):
    old, new, adv, mask, w = make_batch(seed=4)
    weights = w if use_weights else None
    cfg = actor_config("cfpo", mode, global_info(mask, gbi))
    loss, grad, m = _run(get_policy_loss_fn("cfpo"), old, new, adv, mask, mode, cfg, weights)

    leaf = new.detach().clone().requires_grad_(True)
    ratio = torch.exp(torch.clamp(leaf - old, -20, 20))
    per_token = -_paper_cfpo(ratio, adv, 0.2, 0.28) * (w if use_weights else 1.0)
    expected = agg_loss(per_token, mask, mode, **cfg.global_batch_info)
    expected.backward()
    bounds = rounding_bounds(old, new, adv, mask, mode, cfg.global_batch_info, weights)
    eps = torch.where(adv > 0, 0.28, 0.2)
    penalty = (adv.abs() / (2 * eps) * (ratio.detach() - 1) ** 2)[mask].mean()  # the metric, in fp32 here
    # verl keys carry verl's meaning: the same statistics vanilla reports on the same inputs
    _, ref_m = get_policy_loss_fn("vanilla")(old, new, adv, mask, mode, cfg, weights)
    ref_m["actor/cfpo/penalty"] = penalty.item()
    _assert_two_fp32((loss, grad, m), (expected.detach(), leaf.grad, ref_m), bounds,
                     ("actor/pg_clipfrac", "actor/ppo_kl", "actor/cfpo/penalty"), mode)  # fmt: skip
    assert m["actor/pg_clipfrac_lower"] == 0.0  # CFPO has no dual clip (verl's gspo also reports 0)
    expected_keys = {
        "ratio_mean", "ratio_min", "ratio_max", "ratio_dev", "tr_exit_frac", "tr_exit_low",
        "tr_exit_high", "approx_kl_k1", "approx_kl_k3", "penalty",
    }  # fmt: skip
    assert {f"actor/cfpo/{k}" for k in expected_keys} <= set(m)
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("mode", AGG_MODES)
def test_registered_cfpo_seq_equals_paper_equation_with_sequence_ratio(mode):
    old, new, adv, mask, w = make_batch(seed=5, spread=0.3)
    cfg = actor_config("cfpo_seq", mode, global_info(mask, "global"))
    loss, grad, _ = _run(get_policy_loss_fn("cfpo_seq"), old, new, adv, mask, mode, cfg, w)

    leaf = new.detach().clone().requires_grad_(True)
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    seq_ratio = torch.exp(((leaf - old) * mask).sum(-1, keepdim=True) / lengths).expand_as(leaf)
    per_token = -_paper_cfpo(seq_ratio, adv, 0.2, 0.28) * w
    expected = agg_loss(per_token, mask, mode, **cfg.global_batch_info)
    expected.backward()
    bounds = rounding_bounds(old, new, adv, mask, mode, cfg.global_batch_info, w, ratio_level="sequence")
    _assert_two_fp32((loss, grad, None), (expected.detach(), leaf.grad, None), bounds, what=mode)


@pytest.mark.skipif(HAS_TOKEN_SUM, reason=f"verl {VERL_VERSION} has agg_loss 'token-sum'")
@pytest.mark.parametrize("loss_mode", ["cfpo", "cfpo_seq"])
def test_token_sum_is_refused_by_name_where_verl_has_no_token_sum(loss_mode):
    """verl 0.8.0's agg_loss (and so its vanilla loss) has no "token-sum"; ours refuses it too, naming why."""
    old, new, adv, mask, _ = make_batch()
    cfg = actor_config("vanilla")
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-sum", cfg, None)
    with pytest.raises(ValueError, match=r"token-sum.*verl 0\.8\.0.*0\.9\.0"):
        get_policy_loss_fn(loss_mode)(old, new, adv, mask, "token-sum", actor_config(loss_mode), None)


def test_cfpo_ignores_nan_padding_where_verl_agg_would_not():
    """Padding positions may hold NaN/-inf (verl #6349): the cfpo loss and gradient stay finite."""
    old, new, adv, mask, w = make_batch(seed=6)
    cfg = actor_config("cfpo")
    clean_loss, clean_grad, _ = _run(get_policy_loss_fn("cfpo"), old, new, adv, mask, "token-mean", cfg, w)
    old_bad = old.masked_fill(~mask, float("nan"))
    new_bad = new.detach().masked_fill(~mask, float("-inf"))
    adv_bad = adv.masked_fill(~mask, float("inf"))
    loss, grad, m = _run(get_policy_loss_fn("cfpo"), old_bad, new_bad, adv_bad, mask, "token-mean", cfg, w)
    # exact: the valid positions hold the same values and the padding is replaced (not multiplied) by 0 before any
    # arithmetic, so both runs do the same operations on the same numbers in the same order
    assert torch.equal(loss, clean_loss)
    assert torch.equal(grad, clean_grad)
    assert all(v == v for v in m.values())


def test_bad_arguments_are_named():
    old, new, adv, mask, _ = make_batch()
    fn = get_policy_loss_fn("cfpo")
    with pytest.raises(ValueError, match="config"):
        fn(old, new, adv, mask, "token-mean", None, None)
    with pytest.raises(ValueError, match="agg"):
        fn(old, new, adv, mask, "token-median", actor_config(), None)
    with pytest.raises(ValueError, match="global_batch_info"):
        fn(old, new, adv, mask, "token-mean", actor_config(global_batch_info={"dp": 2}), None)
    with pytest.raises(ValueError, match="advantages"):
        fn(old, new, adv[:, :2], mask, "token-mean", actor_config(), None)


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
def test_every_verl_key_of_the_metric_table_carries_its_core_metric(objective):
    """The adapters' one metric table (adapters/_metric_names.py) says which verl key carries which core metric: the
    loss returns exactly those keys plus every core metric under actor/cfpo/, each the core's value on the same
    tensors (a key the objective has no metric for, pg_clipfrac_lower with cfpo, is 0.0)."""
    from cfpo_loss import compute_policy_loss
    from cfpo_loss.adapters._metric_names import EVERY_CORE_METRIC, framework_keys

    old, new, adv, mask, _ = make_batch(seed=1)
    cfg = actor_config("vanilla")
    _, m = make_policy_loss(objective)(old, new, adv, mask, "token-mean", cfg, None)
    core = compute_policy_loss(new, old, adv, mask, objective=objective, eps_low=cfg.clip_ratio_low,
                               eps_high=cfg.clip_ratio_high, dual_clip=cfg.clip_ratio_c).metric_floats()  # fmt: skip
    keys = framework_keys("verl")
    assert set(m) == set(keys.values()) | {EVERY_CORE_METRIC["verl"] + name for name in core}
    for name, key in keys.items():  # exact: the adapter returns the core's metric on the same tensors
        assert m[key] == core.get(name, 0.0), (name, key)
    assert m["actor/pg_clipfrac"] > 0 and (m["actor/pg_clipfrac_lower"] > 0) == (objective == "clip")
