"""PolicyLoss(policy_loss_type="cfpo" / "cfpo_seq") against the installed OpenRLHF's own PolicyLoss (either API:
0.11.2's is_correction_* and 5 outputs, or 0.10.4 - 0.11.1's vllm_is_* and 4 outputs; see orl_compat.py).

Reference values come from an untouched copy of OpenRLHF's ``models/loss.py`` (``native_loss_module``)
or from the core (for the CFPO objective itself); never from the adapter.

Conformance: the adapter's translation run with the *clip* objective (``cfpo_policy_loss_forward(...,
objective="clip")``) must reproduce native "ppo" (token ratio) / "gspo" (sequence ratio) - loss,
gradient, clip_ratio, ppo_kl, vllm_kl (and is_filter_ratio where it exists) - so everything around the objective
(ratio, aggregation, data-parallel normalisers, IS correction, metrics) is OpenRLHF's.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from orl_bounds import U, is_coefficient, rounding_bounds
from orl_compat import API, IS_CORRECTION, N_OUTPUTS, is_kwargs

import cfpo_loss
from cfpo_loss.adapters.openrlhf import cfpo_policy_loss_forward, install
from cfpo_loss.reference import assert_within

# derived rounding bounds: CI runs these again with scalar kernels (noxfile SECOND_ROUNDING)
pytestmark = pytest.mark.rounding

B, T = 6, 7


def make_batch(seed=0, *, mask_dtype=torch.bool, token_adv=True, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(B, T, generator=g, dtype=torch.float32) * 3 - 0.05
    delta = torch.randn(B, T, generator=g) * spread
    delta[0, :3] = torch.tensor([1.4, 1.6, -1.5])  # dual-clip territory (r ~ 4-5) and deep below 1 - eps
    old_log_probs = log_probs - delta
    if token_adv:
        advantages = torch.randn(B, T, generator=g)
    else:
        advantages = torch.randn(B, 1, generator=g).expand(B, T).clone()
    advantages[0, :3] = torch.tensor([-1.0, -0.5, 0.7])
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, :3] = True
    mask[-1] = False  # one fully masked sequence
    rollout_log_probs = old_log_probs + torch.randn(B, T, generator=g) * 0.4
    return dict(
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        action_mask=mask.to(mask_dtype),
        rollout_log_probs=rollout_log_probs,
    )


def run(call, batch, **batch_info):
    """Call ``call(log_probs, ...)`` as OpenRLHF's actor does; return every output and d loss / d log_probs."""
    log_probs = batch["log_probs"].clone().requires_grad_(True)
    out = call(
        log_probs,
        batch["old_log_probs"],
        batch["advantages"],
        action_mask=batch["action_mask"],
        rollout_log_probs=batch["rollout_log_probs"],
        **batch_info,
    )
    assert isinstance(out, tuple) and len(out) == N_OUTPUTS
    loss, clip_ratio, ppo_kl, vllm_kl = out[:4]
    is_filter_ratio = out[4] if N_OUTPUTS == 5 else None
    (grad,) = torch.autograd.grad(loss, log_probs)
    return dict(
        loss=loss.detach(),
        grad=grad,
        clip_ratio=clip_ratio,
        ppo_kl=ppo_kl,
        vllm_kl=vllm_kl,
        is_filter_ratio=is_filter_ratio,
    )


def assert_same(ours, native, *, exact=False, bounds=None, what=""):
    """exact: bit-identical (the same code on the same tensors). Otherwise two fp32 evaluations written differently:
    each within ``bounds`` (orl_bounds.rounding_bounds, derived from the computation) of the exact value, so within
    twice it of each other."""
    if not exact:
        bound, metric_bound = bounds
        bound_of = {"loss": bound.loss, "grad": bound.grad, **metric_bound}
    for key in native:
        a, b = ours[key], native[key]
        if b is None:
            assert a is None, key
            continue
        if exact:
            assert torch.equal(a, b), (key, a, b)
        else:
            assert_within(a, b, 2 * bound_of[key], f"{what} {key}")


BATCH_INFO = {
    "token-local": dict(token_level_loss=True, info={}),
    "token-global": dict(token_level_loss=True, info=dict(dp_size=2, batch_num_tokens=torch.tensor(61.0))),
    "seq-local": dict(token_level_loss=False, info={}),
    "seq-global": dict(token_level_loss=False, info=dict(dp_size=4, global_batch_size=torch.tensor(19.0))),
}
EPS = [(0.2, 0.2), (0.2, 0.28)]


@pytest.mark.parametrize("agg", sorted(BATCH_INFO))
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_clip_objective_reproduces_native_ppo(native_loss_module, patched_policy_loss, agg, eps, dual_clip, mask_dtype):
    cfg = BATCH_INFO[agg]
    kwargs = dict(clip_eps_low=eps[0], clip_eps_high=eps[1], token_level_loss=cfg["token_level_loss"])
    batch = make_batch(1, mask_dtype=mask_dtype)
    native = run(
        native_loss_module.PolicyLoss(dual_clip=dual_clip, policy_loss_type="ppo", **kwargs), batch, **cfg["info"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dual_clip has no effect on cfpo: it warns
        ours_fn = patched_policy_loss(dual_clip=dual_clip, policy_loss_type="cfpo", **kwargs)

    def ours(*args, **kw):
        return cfpo_policy_loss_forward(ours_fn, *args, objective="clip", **kw)

    result = run(ours, batch, **cfg["info"])
    level = cfg["token_level_loss"]
    bounds = rounding_bounds(batch, token_level_loss=level, info=cfg["info"], objective="clip", eps=eps)
    assert_same(result, native, bounds=bounds, what=f"ppo {agg}")
    # the data really exercises clipping (and dual clipping) on both sides
    assert 0.05 < native["clip_ratio"] < 0.95
    if dual_clip is not None:
        plain = run(native_loss_module.PolicyLoss(policy_loss_type="ppo", **kwargs), batch, **cfg["info"])
        assert not torch.equal(plain["grad"], native["grad"])


@pytest.mark.parametrize("is_kwargs", IS_CORRECTION, ids=lambda d: "-".join(str(v) for v in d.values()))
@pytest.mark.parametrize("agg", ["token-global", "seq-local"])
def test_clip_objective_reproduces_native_ppo_with_is_correction(
    native_loss_module, patched_policy_loss, is_kwargs, agg
):
    cfg = BATCH_INFO[agg]
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, token_level_loss=cfg["token_level_loss"], **is_kwargs)
    batch = make_batch(2)
    native = run(native_loss_module.PolicyLoss(policy_loss_type="ppo", **kwargs), batch, **cfg["info"])
    loss_fn = patched_policy_loss(policy_loss_type="cfpo", **kwargs)
    result = run(lambda *a, **k: cfpo_policy_loss_forward(loss_fn, *a, objective="clip", **k), batch, **cfg["info"])
    assert native["vllm_kl"] is not None
    if API == "is_correction":
        assert 0.0 < native["is_filter_ratio"] < 1.0  # some units really filtered
    bounds = rounding_bounds(batch, token_level_loss=cfg["token_level_loss"], info=cfg["info"], objective="clip",
                             eps=(0.2, 0.28), is_coef=is_coefficient(native_loss_module, is_kwargs, batch))  # fmt: skip
    assert_same(result, native, bounds=bounds, what=f"ppo {agg} {is_kwargs}")


@pytest.mark.parametrize("agg", ["seq-local", "seq-global", "token-local"])
@pytest.mark.parametrize("correction", [False, True])
def test_clip_objective_with_sequence_ratio_reproduces_native_gspo(
    native_loss_module, patched_policy_loss, agg, correction
):
    cfg = BATCH_INFO[agg]
    kwargs = dict(clip_eps_low=3e-4, clip_eps_high=4e-4, token_level_loss=cfg["token_level_loss"])
    if correction:
        kwargs.update(is_kwargs("token", "mask", "ratio", (0.5, 2.0)))
    batch = make_batch(3, token_adv=False, spread=0.01)
    native = run(native_loss_module.PolicyLoss(policy_loss_type="gspo", **kwargs), batch, **cfg["info"])
    loss_fn = patched_policy_loss(policy_loss_type="cfpo_seq", **kwargs)
    assert loss_fn.token_level_loss is False  # forced, as OpenRLHF forces it for gspo
    result = run(lambda *a, **k: cfpo_policy_loss_forward(loss_fn, *a, objective="clip", **k), batch, **cfg["info"])
    assert 0.0 < native["clip_ratio"] < 1.0
    denominator = "rollout_log_probs" if correction else "old_log_probs"  # OpenRLHF's gspo with the correction
    bounds = rounding_bounds(batch, token_level_loss=False, info=cfg["info"], objective="clip", ratio_level="sequence",
                             eps=(3e-4, 4e-4), denominator=denominator)  # fmt: skip
    assert_same(result, native, bounds=bounds, what=f"gspo {agg}")


@pytest.mark.parametrize("agg", sorted(BATCH_INFO))
@pytest.mark.parametrize("eps", EPS)
def test_cfpo_equals_the_core(patched_policy_loss, agg, eps):
    cfg = BATCH_INFO[agg]
    batch = make_batch(4)
    loss_fn = patched_policy_loss(
        clip_eps_low=eps[0], clip_eps_high=eps[1], token_level_loss=cfg["token_level_loss"], policy_loss_type="cfpo"
    )
    ours = run(loss_fn, batch, **cfg["info"])

    info = cfg["info"]
    core_kwargs = dict(objective="cfpo", eps_low=eps[0], eps_high=eps[1], dp_size=info.get("dp_size", 1))
    if cfg["token_level_loss"]:
        core_kwargs.update(agg="token-mean", batch_num_tokens=info.get("batch_num_tokens"))
    else:
        core_kwargs.update(agg="seq-mean-token-mean", global_batch_size=info.get("global_batch_size"))
    log_probs = batch["log_probs"].clone().requires_grad_(True)
    core = cfpo_loss.compute_policy_loss(
        log_probs, batch["old_log_probs"], batch["advantages"], batch["action_mask"], **core_kwargs
    )
    (core_grad,) = torch.autograd.grad(core.loss, log_probs)
    # ours aggregates the core's per-token loss with OpenRLHF's aggregate_loss, the core with its own: two fp32
    # evaluations written differently, within twice the derived bound
    bound, _ = rounding_bounds(batch, token_level_loss=cfg["token_level_loss"], info=info, eps=eps)
    assert_within(ours["loss"], core.loss.detach(), 2 * bound.loss, f"cfpo {agg} loss")
    assert_within(ours["grad"], core_grad, 2 * bound.grad, f"cfpo {agg} d loss / d log_probs")
    assert torch.equal(ours["clip_ratio"], core.metrics["tr_exit_frac"])  # exact: the core's metric, same tensors
    assert 0.05 < ours["clip_ratio"] < 0.95
    assert ours["vllm_kl"] is None and ours["is_filter_ratio"] is None
    assert set(loss_fn.cfpo_metrics) >= {"ratio_mean", "tr_exit_low", "tr_exit_high", "penalty", "approx_kl_k3"}


@pytest.mark.parametrize("agg", ["seq-local", "seq-global"])
def test_cfpo_seq_equals_the_core_sequence_ratio(patched_policy_loss, agg):
    cfg = BATCH_INFO[agg]
    batch = make_batch(5, token_adv=False, spread=0.3)
    loss_fn = patched_policy_loss(clip_eps_low=0.2, clip_eps_high=0.28, policy_loss_type="cfpo_seq")
    ours = run(loss_fn, batch, **cfg["info"])
    log_probs = batch["log_probs"].clone().requires_grad_(True)
    core = cfpo_loss.compute_policy_loss(
        log_probs,
        batch["old_log_probs"],
        batch["advantages"],
        batch["action_mask"],
        objective="cfpo",
        eps_low=0.2,
        eps_high=0.28,
        ratio_level="sequence",
        agg="seq-mean-token-mean",
        dp_size=cfg["info"].get("dp_size", 1),
        global_batch_size=cfg["info"].get("global_batch_size"),
    )
    (core_grad,) = torch.autograd.grad(core.loss, log_probs)
    # two fp32 evaluations written differently (OpenRLHF's aggregate_loss, the core's): twice the derived bound
    bound, _ = rounding_bounds(batch, token_level_loss=False, info=cfg["info"], ratio_level="sequence", eps=(0.2, 0.28))
    assert_within(ours["loss"], core.loss.detach(), 2 * bound.loss, f"cfpo_seq {agg} loss")
    assert_within(ours["grad"], core_grad, 2 * bound.grad, f"cfpo_seq {agg} d loss / d log_probs")


def test_cfpo_with_is_correction_weights_the_core_loss_by_openrlhfs_coefficient(
    native_loss_module, patched_policy_loss
):
    """CFPO + ICEPOP: the per-token IS coefficient is OpenRLHF's. Native ppo at r = 1 with A = 1 has
    d loss / d log_prob = -coef / N (token mean), which reads the coefficient off OpenRLHF's own code."""
    icepop = is_kwargs("token", "mask", "ratio", (0.8, 1.25))
    batch = make_batch(6)
    mask = batch["action_mask"]
    on_policy = dict(batch, log_probs=batch["old_log_probs"], advantages=torch.ones(B, T))
    probe = run(native_loss_module.PolicyLoss(policy_loss_type="ppo", **icepop), on_policy)
    coef = -probe["grad"] * mask.sum()
    assert ((coef == 0) & mask).any() and ((coef > 0) & mask).any()

    ours = run(patched_policy_loss(policy_loss_type="cfpo", **icepop), batch)
    log_probs = batch["log_probs"].clone().requires_grad_(True)
    core = cfpo_loss.compute_policy_loss(
        log_probs, batch["old_log_probs"], batch["advantages"], mask, objective="cfpo", weights=coef
    )
    (core_grad,) = torch.autograd.grad(core.loss, log_probs)
    # two fp32 evaluations written differently (the adapter's IS coefficient and OpenRLHF's aggregation against the
    # coefficient read off the probe and the core's aggregation): within twice the derived bound
    bound, metric_bound = rounding_bounds(batch, is_coef=is_coefficient(native_loss_module, icepop, batch))
    assert_within(ours["loss"], core.loss.detach(), 2 * bound.loss, "cfpo icepop loss")
    assert_within(ours["grad"], core_grad, 2 * bound.grad, "cfpo icepop d loss / d log_probs")
    assert_within(ours["vllm_kl"], probe["vllm_kl"], 2 * metric_bound["vllm_kl"], "cfpo icepop vllm_kl")
    if API == "is_correction":
        bound = 2 * metric_bound["is_filter_ratio"]
        assert_within(ours["is_filter_ratio"], probe["is_filter_ratio"], bound, "cfpo icepop is_filter_ratio")


def test_cfpo_gradient_equals_native_ppo_at_ratio_one(native_loss_module, patched_policy_loss):
    """Paper: at r = 1 the CFPO gradient equals the clipped objective's (both are A)."""
    batch = make_batch(7)
    batch["old_log_probs"] = batch["log_probs"].clone()
    for token_level_loss in (True, False):
        native = run(native_loss_module.PolicyLoss(token_level_loss=token_level_loss), batch)
        ours = run(patched_policy_loss(token_level_loss=token_level_loss, policy_loss_type="cfpo"), batch)
        # two fp32 evaluations written differently: within twice the derived bound (the clip objective's bound for
        # native ppo, which at r = 1 is the larger: its clipped region is not flat there)
        bound, _ = rounding_bounds(batch, token_level_loss=token_level_loss, objective="clip")
        assert_within(ours["grad"], native["grad"], 2 * bound.grad, f"r = 1, token_level_loss={token_level_loss} grad")
        assert_within(ours["loss"], native["loss"], 2 * bound.loss, f"r = 1, token_level_loss={token_level_loss} loss")


CONFIGS = [
    dict(policy_loss_type="ppo"),
    dict(policy_loss_type="ppo", clip_eps_high=0.28, dual_clip=3.0),
    dict(policy_loss_type="ppo", token_level_loss=False),
    dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
    *[dict(policy_loss_type="ppo", **kw) for kw in IS_CORRECTION],
    dict(policy_loss_type="gspo", **is_kwargs("token", "mask", "ratio", (0.5, 2.0))),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("agg", ["token-global", "seq-global"])
def test_ppo_and_gspo_stay_bit_identical_to_native(native_loss_module, patched_policy_loss, config, agg):
    info = BATCH_INFO[agg]["info"]
    batch = make_batch(8, token_adv=config["policy_loss_type"] == "ppo")
    native = run(native_loss_module.PolicyLoss(**config), batch, **info)
    patched = run(patched_policy_loss(**config), batch, **info)
    assert_same(patched, native, exact=True)


def test_native_errors_are_untouched(native_loss_module, patched_policy_loss):
    batch = make_batch(9)
    for cls in (native_loss_module.PolicyLoss, patched_policy_loss):
        with pytest.raises(ValueError, match="Invalid policy loss type"):
            run(cls(policy_loss_type="spo"), batch)
        bad_is = dict(is_correction_level="geo") if API == "is_correction" else dict(vllm_is_correction_type="geo")
        with pytest.raises(ValueError, match=next(iter(bad_is))):
            cls(policy_loss_type="cfpo" if cls is patched_policy_loss else "ppo", **bad_is)
        with pytest.raises(AssertionError, match="dual_clip"):
            cls(dual_clip=0.5, policy_loss_type="cfpo" if cls is patched_policy_loss else "ppo")


def test_bad_configuration_is_reported(patched_policy_loss):
    with pytest.raises(ValueError, match="eps_low"):
        patched_policy_loss(clip_eps_low=0.0, policy_loss_type="cfpo")
    with pytest.raises(ValueError, match="eps_high"):
        patched_policy_loss(clip_eps_high=-0.1, policy_loss_type="cfpo_seq")
    with pytest.warns(RuntimeWarning, match="dual_clip"):
        patched_policy_loss(dual_clip=3.0, policy_loss_type="cfpo")
    loss_fn = patched_policy_loss(policy_loss_type="cfpo", **is_kwargs("token"))
    batch = make_batch(10)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        loss_fn(batch["log_probs"], batch["old_log_probs"], batch["advantages"], batch["action_mask"])
    bad = dict(batch, log_probs=batch["log_probs"].clone())
    bad["log_probs"][0, 0] = float("nan")  # a valid position
    with pytest.raises(ValueError, match="log_prob"):
        run(patched_policy_loss(policy_loss_type="cfpo"), bad)


@pytest.mark.parametrize("loss_type", ["cfpo", "cfpo_seq"])
def test_garbage_at_masked_positions_is_ignored(patched_policy_loss, loss_type):
    batch = make_batch(11)
    loss_fn = patched_policy_loss(policy_loss_type=loss_type, **is_kwargs("token", "mask", "ratio", (0.5, 2.0)))
    clean = run(loss_fn, batch, dp_size=2, batch_num_tokens=torch.tensor(61.0))
    dirty = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["action_mask"]
    for key, value in (
        ("log_probs", float("nan")),
        ("old_log_probs", float("-inf")),
        ("advantages", float("inf")),
        ("rollout_log_probs", float("nan")),
    ):
        dirty[key][pad] = value
    result = run(loss_fn, dirty, dp_size=2, batch_num_tokens=torch.tensor(61.0))
    for key in ("loss", "grad", "clip_ratio", "vllm_kl", "is_filter_ratio"):
        if clean[key] is not None:
            assert torch.isfinite(result[key]).all(), key
            # exact: the padding is replaced by 0 (torch.where) before any arithmetic, so both runs do the same
            # operations on the same numbers in the same order
            assert torch.equal(result[key], clean[key]), key


def test_bf16_inputs_give_an_fp32_loss(patched_policy_loss):
    batch = make_batch(12)
    batch = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in batch.items()}
    out = run(patched_policy_loss(policy_loss_type="cfpo"), batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert out["grad"].dtype == torch.bfloat16


def test_install_is_idempotent_and_patches_the_class_in_place(patched_policy_loss):
    import openrlhf.models
    import openrlhf.models.loss

    init, forward = patched_policy_loss.__init__, patched_policy_loss.forward
    install()
    install()
    assert patched_policy_loss.__init__ is init and patched_policy_loss.forward is forward
    assert openrlhf.models.PolicyLoss is openrlhf.models.loss.PolicyLoss is patched_policy_loss
    # one layer of wrapping around OpenRLHF's own methods, never two
    native_forward = forward.__wrapped__
    assert not hasattr(native_forward, "__wrapped__") and native_forward.__module__ == "openrlhf.models.loss"
    batch = make_batch(13)
    a = run(patched_policy_loss(policy_loss_type="cfpo"), batch)
    install()
    b = run(patched_policy_loss(policy_loss_type="cfpo"), batch)
    assert_same(a, b, exact=True)


@pytest.mark.parametrize("loss_type,agg", list(itertools.product(["cfpo", "cfpo_seq"], ["token-global", "seq-global"])))
def test_data_parallel_shards_add_up_to_the_full_batch(patched_policy_loss, loss_type, agg):
    """OpenRLHF's DP contract (its own test_loss_aggregation): mean over ranks of the per-rank losses
    with global normalisers == the loss of the whole batch."""
    cfg = BATCH_INFO[agg]
    batch = make_batch(14)
    batch["action_mask"][-1, 0] = True  # no empty sequence, so the global sequence count is simply B
    loss_fn = patched_policy_loss(policy_loss_type=loss_type, token_level_loss=cfg["token_level_loss"])
    full = run(loss_fn, batch)["loss"]
    info = (
        dict(batch_num_tokens=batch["action_mask"].sum())
        if loss_fn.token_level_loss
        else dict(global_batch_size=torch.tensor(float(B)))
    )
    shards = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 2), slice(2, B))]
    per_rank = [run(loss_fn, shard, dp_size=2, **info)["loss"] for shard in shards]
    # the same fp32 loss summed in two groupings: each within the derived bound of the exact value (a shard's error
    # is at most its share of the full batch's; the sum of the two and ÷ 2 add two roundings of the loss)
    bound, _ = rounding_bounds(batch, token_level_loss=loss_fn.token_level_loss, eps=(0.2, 0.2),
                               ratio_level="sequence" if loss_type == "cfpo_seq" else "token")  # fmt: skip
    assert_within((per_rank[0] + per_rank[1]) / 2, full, 2 * bound.loss + 2 * U * abs(float(full)), agg)


BY_NAME = """
import torch
from openrlhf.trainer.ray.ppo_actor import PolicyLoss  # bound by name, as OpenRLHF's PPO actor does
from openrlhf.trainer.ray import ppo_actor
args = (torch.zeros(1, 2, requires_grad=True), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2).bool())
try:
    PolicyLoss(policy_loss_type="cfpo")(*args)
    raise SystemExit("cfpo worked before install()")
except ValueError as e:
    assert "Invalid policy loss type" in str(e), e
from cfpo_loss.adapters.openrlhf import install, is_installed
assert not is_installed()
install()
install()
assert is_installed()
for cls in (PolicyLoss, ppo_actor.PolicyLoss):
    loss, clip_ratio, ppo_kl, vllm_kl = cls(policy_loss_type="cfpo")(*args)[:4]
    assert loss.item() == -1.0 and clip_ratio.item() == 0.0 and vllm_kl is None, loss  # r = 1: J = A
print("OK")
"""


def test_install_reaches_policy_loss_names_bound_before_it():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", BY_NAME], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-3000:]


ON_IMPORT = """
import sys
from cfpo_loss.adapters.openrlhf import install_on_import, is_installed
install_on_import()
install_on_import()
assert "openrlhf" not in sys.modules and "deepspeed" not in sys.modules  # the hook imports neither
import torch
from openrlhf.trainer.ray.ppo_actor import PolicyLoss  # what a PPO actor process imports
assert is_installed()
args = (torch.zeros(1, 2, requires_grad=True), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2).bool())
loss = PolicyLoss(policy_loss_type="cfpo")(*args)[0]
assert loss.item() == -1.0, loss
import inspect, openrlhf.models.loss as m
assert "class PolicyLoss" in inspect.getsource(m)  # the module's loader still works for tools
print("OK")
"""


def test_install_on_import_patches_when_openrlhf_is_imported_later():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", ON_IMPORT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_a_policy_loss_of_another_api_is_refused_by_name(native_loss_module):
    """A PolicyLoss with neither IS-correction API (e.g. a future OpenRLHF that changed it again) is not patched."""
    from cfpo_loss.adapters.openrlhf import patch_policy_loss_class

    class OtherPolicyLoss(torch.nn.Module):
        def __init__(
            self,
            clip_eps_low=0.2,
            clip_eps_high=0.2,
            dual_clip=None,
            token_level_loss=True,
            policy_loss_type="ppo",
            off_policy_correction="none",
        ):
            super().__init__()

        def forward(
            self,
            log_probs,
            old_log_probs,
            advantages,
            action_mask=None,
            rollout_log_probs=None,
            dp_size=1,
            batch_num_tokens=None,
            global_batch_size=None,
        ):
            raise AssertionError

    OtherPolicyLoss.__module__ = native_loss_module.__name__  # a module with OpenRLHF's aggregate_loss
    with pytest.raises(
        RuntimeError,
        match=r"openrlhf>=0\.10\.4,<0\.12.*missing: \(is_correction_level.*\) or "
        r"\(enable_vllm_is_correction",
    ):
        patch_policy_loss_class(OtherPolicyLoss)
    assert "__cfpo_loss_patch__" not in vars(OtherPolicyLoss)


@pytest.mark.parametrize("version", ["0.10.3", "0.12.0"])
def test_an_unsupported_openrlhf_is_warned_about_naming_the_range(monkeypatch, patched_policy_loss, version):
    import cfpo_loss.adapters.openrlhf as adapter

    monkeypatch.setattr(adapter, "installed_version", lambda dist: version)
    with pytest.warns(RuntimeWarning, match=rf"supports openrlhf>=0\.10\.4,<0\.12 \(tested: .*\), found {version}"):
        install()


def test_the_installed_api_is_the_one_tested(patched_policy_loss):
    from cfpo_loss.adapters.openrlhf import _patch_info

    assert _patch_info(patched_policy_loss)["api"] == API


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
def test_every_openrlhf_return_value_of_the_metric_table_carries_its_core_metric(patched_policy_loss, objective):
    """The adapters' one metric table (adapters/_metric_names.py) says which PolicyLoss.forward return value carries
    which core metric; each is the core's value on the same tensors."""
    from cfpo_loss.adapters._metric_names import framework_keys
    from cfpo_loss.adapters.openrlhf import cfpo_policy_loss_forward

    batch = make_batch(4)
    loss_fn = patched_policy_loss(clip_eps_low=0.2, clip_eps_high=0.28, policy_loss_type="cfpo")
    out = cfpo_policy_loss_forward(loss_fn, batch["log_probs"], batch["old_log_probs"], batch["advantages"],
                                   batch["action_mask"], objective=objective)  # fmt: skip
    returned = dict(zip(["loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"], out))
    core = cfpo_loss.compute_policy_loss(
        batch["log_probs"],
        batch["old_log_probs"],
        batch["advantages"],
        batch["action_mask"],
        objective=objective,
        eps_low=0.2,
        eps_high=0.28,
    )
    keys = framework_keys("openrlhf")
    assert keys and set(keys.values()) <= set(returned)
    for name, key in keys.items():  # exact: the adapter returns the core's metric computed on the same tensors
        assert torch.equal(returned[key], core.metrics[name]), key
    assert 0.05 < returned["clip_ratio"] < 0.95
