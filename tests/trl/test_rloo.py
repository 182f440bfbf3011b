"""CFPORLOOTrainer, the one-line swap for TRL's RLOOTrainer (trl==1.16.0, the real trainer on a tiny Qwen2).

Clip mode is RLOOTrainer: a real `train()` gives TRL's logged trajectory and final parameters exactly, with RLOO's
loss-related options on (num_iterations, steps_per_generation, beta's KL-in-reward, normalize_advantages,
reward_clip_range), and `_compute_loss` gives TRL's loss, gradients and metrics in train and eval mode on ratios far
outside the trust region. CFPO mode is the paper's equation on RLOO's sequence ratio r = exp(sum_t log pi - sum_t
log pi_old), averaged over sequences: the expected loss and gradient are written out below in float64 (not taken from
the code under test). Bad configurations are refused by name."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from trl import GRPOTrainer, RLOOConfig, RLOOTrainer
from trl_helpers import make_rloo_inputs, make_trainer, prompt_dataset, reward_digits, sequence_ratio_bounds

from cfpo_loss import reference
from cfpo_loss.adapters._metric_names import framework_keys
from cfpo_loss.adapters.trl import CFPOConfig, CFPORLOOConfig, CFPORLOOTrainer, CFPOTrainer
from cfpo_loss.reference import assert_within

EPS_LOW, EPS_HIGH = 0.2, 0.28
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
CFPO_METRICS = ("cfpo/ratio_dev", "cfpo/ratio_max", "cfpo/ratio_min")
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
                "clip_ratio/region_mean")  # fmt: skip


# ---- a real train(): clip mode is RLOOTrainer, cfpo trains ---------------------------------------------------------


def _train(cls, cfg_cls, tiny_model_dir, tokenizer, tmp_path, **cfg):
    kwargs = dict(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        max_steps=8,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        beta=0.0,
    )
    kwargs.update(cfg)
    trainer = cls(model=tiny_model_dir, reward_funcs=reward_digits, args=cfg_cls(**kwargs),
                  train_dataset=prompt_dataset(32), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


RLOO_OPTIONS = {
    "num_iterations=4": dict(num_iterations=4),
    "steps_per_generation=4+beta+normalize+reward_clip": dict(
        gradient_accumulation_steps=1, steps_per_generation=4, per_device_train_batch_size=4, beta=0.04,
        normalize_advantages=True, reward_clip_range=(0.0, 0.3), epsilon=0.15, epsilon_high=0.25,
    ),
}  # fmt: skip


@pytest.mark.parametrize("cfg", list(RLOO_OPTIONS.values()), ids=list(RLOO_OPTIONS))
def test_clip_train_is_rloo_trainer(tiny_model_dir, tokenizer, tmp_path, cfg):
    """policy_objective="clip": the same logged trajectory (every TRL metric, loss, grad norm, reward) and the same
    final parameters as trl.RLOOTrainer, bit for bit, with the ratio really outside the trust region."""
    ref, ref_logs = _train(RLOOTrainer, RLOOConfig, tiny_model_dir, tokenizer, tmp_path / "rloo", **cfg)
    ours, logs = _train(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path / "ours",
                        policy_objective="clip", **cfg)  # fmt: skip
    assert len(logs) == len(ref_logs) == 8
    for step, (h, h_ref) in enumerate(zip(logs, ref_logs)):
        for key, value in h_ref.items():
            if key not in TIMING:
                assert h[key] == value, (step, key, h[key], value)
        for key in CFPO_METRICS:  # logged for clip too, so runs compare side by side
            assert math.isfinite(h[key]), (step, key)
        assert "cfpo/penalty" not in h
    for (name, p), (name_ref, p_ref) in zip(ours.model.named_parameters(), ref.model.named_parameters()):
        assert name == name_ref and torch.equal(p, p_ref), name
    assert max(h["clip_ratio/region_mean"] for h in ref_logs) > 0.0  # clipping was exercised
    assert max(h["cfpo/ratio_dev"] for h in logs) > 1e-3
    if cfg.get("beta"):
        assert all("kl" in h for h in logs if "reward" in h)  # RLOO's KL-in-reward path ran


@pytest.mark.parametrize("cfg", list(RLOO_OPTIONS.values()), ids=list(RLOO_OPTIONS))
def test_cfpo_train_ratios_leave_one(tiny_model_dir, tokenizer, tmp_path, cfg):
    trainer, logs = _train(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path, **cfg)
    assert trainer.policy_objective == "cfpo" and len(logs) == 8
    for h in logs:
        assert math.isfinite(h["loss"]), h
        for key in (*CLIP_METRICS, *CFPO_METRICS, "cfpo/penalty"):
            assert math.isfinite(h[key]), (key, h)
        assert 0.0 <= h["clip_ratio/region_mean"] <= 1.0
        assert h["cfpo/ratio_dev"] >= 0.0 and h["cfpo/penalty"] >= 0.0
    # the first step of each generation is on-policy (r = 1); later ones are not
    assert max(h["cfpo/ratio_dev"] for h in logs) > 1e-3
    assert max(h["cfpo/ratio_max"] for h in logs) > 1.0 + 1e-3
    assert max(h["cfpo/penalty"] for h in logs) > 0.0
    # and CFPO trains differently from clip once the ratio has left 1
    _, clip_logs = _train(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path / "clip",
                          policy_objective="clip", **cfg)  # fmt: skip
    # on-policy first step (r = 1 up to rounding): the same loss
    assert logs[0]["loss"] == pytest.approx(clip_logs[0]["loss"], rel=1e-5, abs=1e-7)
    assert any(h["loss"] != c["loss"] for h, c in zip(logs, clip_logs))


# ---- _compute_loss on the same tensors ----------------------------------------------------------------------------


def _loss_step(trainer, inputs):
    """Run the trainer's real `_compute_loss` and backprop it; keep the per-token log-probs TRL computed."""
    captured = []
    original = trainer._get_per_token_logps_and_entropies

    def wrapped(*args, **kwargs):
        logps, entropies, aux = original(*args, **kwargs)
        if logps.requires_grad:
            logps.retain_grad()
        captured.append(logps)
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = wrapped
    try:
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
    finally:
        del trainer._get_per_token_logps_and_entropies
    (logps,) = captured
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), logps, grads


def _make(cls, cfg_cls, tiny_model_dir, tokenizer, tmp_path, **cfg):
    return make_trainer(cls, cfg_cls, tiny_model_dir, tokenizer, tmp_path, beta=0.0, epsilon=EPS_LOW,
                        epsilon_high=EPS_HIGH, **cfg)  # fmt: skip


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_clip_loss_step_is_rloo_trainer(tiny_model_dir, tokenizer, tmp_path, mode):
    rloo = _make(RLOOTrainer, RLOOConfig, tiny_model_dir, tokenizer, tmp_path / "r")
    ours = _make(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path / "o", policy_objective="clip")
    inputs = make_rloo_inputs(rloo, seed=1, noise=1.0)
    for trainer in (rloo, ours):
        trainer.model.train(mode == "train")
    loss_ref, _, grads_ref = _loss_step(rloo, inputs)
    loss, _, grads = _loss_step(ours, inputs)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads_ref:
        assert torch.equal(grads[name], grads_ref[name]), name
    ref_metrics, metrics = rloo._metrics[mode], ours._metrics[mode]
    assert set(ref_metrics) == {"entropy", *CLIP_METRICS}
    for key, values in ref_metrics.items():
        assert metrics[key] == values, key
    assert set(metrics) - set(ref_metrics) == set(CFPO_METRICS)
    assert ref_metrics["clip_ratio/low_mean"][-1] > 0.0 and ref_metrics["clip_ratio/high_mean"][-1] > 0.0


def _paper_equation(logps, inputs, eps_low, eps_high):
    """Expected values, float64, from the paper's equation on RLOO's sequence ratio (written out here):
    r_i = exp(sum_t m_it log pi_it - old_i), J_i = r_i A_i - |A_i| / (2 eps_i) (r_i - 1)^2 with eps_i = eps_high
    where A_i > 0 and eps_low where A_i < 0; loss = -mean_i J_i; dloss/dlog pi_it = -(1/B) dJ_i/dr_i * r_i * m_it
    with dJ/dr = A - |A| / eps (r - 1)."""
    m = inputs["completion_mask"].double()
    adv = inputs["advantages"].double()
    r = torch.exp((logps.detach().double() * m).sum(1) - inputs["old_logps"].double())
    eps = torch.where(adv > 0, torch.full_like(adv, eps_high), torch.full_like(adv, eps_low))
    penalty = adv.abs() / (2 * eps) * (r - 1) ** 2
    objective = r * adv - penalty
    djdr = adv - adv.abs() / eps * (r - 1)
    grad = -(djdr * r)[:, None] * m / len(r)
    return r, -objective.mean(), grad, penalty


@pytest.mark.rounding
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cfpo_loss_step_is_the_paper_equation(tiny_model_dir, tokenizer, tmp_path, mode):
    trainer = _make(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path)
    assert trainer.policy_objective == "cfpo"
    inputs = make_rloo_inputs(trainer, seed=7, noise=1.0)
    trainer.model.train(mode == "train")
    loss, logps, _ = _loss_step(trainer, inputs)
    r, loss_ref, grad_ref, penalty = _paper_equation(logps, inputs, EPS_LOW, EPS_HIGH)
    # fp32 against float64: the bound follows from the computation (log r sums up to 7 fp32 terms of |log pi| ~ 4
    # each, and |dJ/dr|·r amplifies its error; trl_helpers.sequence_ratio_bounds)
    bound, grad_bound, metric_bound = sequence_ratio_bounds(logps, inputs, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    assert_within(loss.item(), loss_ref.item(), bound.loss, "loss")
    # the gradient w.r.t. the per-token log-probs TRL computed
    assert_within(logps.grad.double(), grad_ref, grad_bound, "dloss/dlog pi")
    # metrics: TRL's clip_ratio/* meaning (per sequence, in the advantage's direction), plus cfpo/*
    m = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    adv = inputs["advantages"].double()
    low = ((r < 1 - EPS_LOW) & (adv < 0)).double()
    high = ((r > 1 + EPS_HIGH) & (adv > 0)).double()
    expected = {
        "clip_ratio/low_mean": low.mean(), "clip_ratio/low_min": low.min(), "clip_ratio/high_mean": high.mean(),
        "clip_ratio/high_max": high.max(), "clip_ratio/region_mean": (low + high).mean(),
        "cfpo/ratio_dev": (r - 1).abs().mean(), "cfpo/ratio_max": r.max(), "cfpo/ratio_min": r.min(),
        "cfpo/penalty": penalty.mean(),
    }  # fmt: skip
    assert set(m) == {"entropy", *expected}
    trl_names = {key: name for name, key in framework_keys("trl").items()}
    for key, value in expected.items():
        # the per-sequence extremes are exact 0/1; the rest carry the metric's rounding bound
        assert_within(m[key], value.item(), metric_bound.get(trl_names.get(key), 0.0), key)
    assert m["clip_ratio/low_mean"] > 0.0 and m["clip_ratio/high_mean"] > 0.0 and m["cfpo/penalty"] > 0.0


def test_cfpo_gradient_restores_where_clip_is_flat(tiny_model_dir, tokenizer, tmp_path):
    """A sequence whose ratio left the trust region in its advantage's direction gets exactly zero gradient from
    RLOO's clipped loss, and from CFPO one that moves its log-ratio back (down if r > 1 + eps_high, A > 0; up if
    r < 1 - eps_low, A < 0) on every one of its valid tokens."""
    rloo = _make(RLOOTrainer, RLOOConfig, tiny_model_dir, tokenizer, tmp_path / "r")
    ours = _make(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path / "o")
    inputs = make_rloo_inputs(rloo, seed=8, noise=1.2)
    _, logps_clip, _ = _loss_step(rloo, inputs)
    _, logps_cfpo, grads = _loss_step(ours, inputs)
    mask = inputs["completion_mask"].bool()
    adv = inputs["advantages"]
    r = torch.exp((logps_cfpo.detach() * mask).sum(1) - inputs["old_logps"])
    high, low = (adv > 0) & (r > 1 + EPS_HIGH), (adv < 0) & (r < 1 - EPS_LOW)
    assert high.any() and low.any(), "the perturbation should push sequences out on both sides"
    for rows, sign in ((high, 1.0), (low, -1.0)):
        tokens = rows[:, None] & mask
        assert torch.all(logps_clip.grad[tokens] == 0)  # TRL: clipped, no gradient
        assert torch.all(logps_cfpo.grad[tokens] * sign > 0)  # descent moves log r back towards the region
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_cfpo_equals_clip_on_policy(tiny_model_dir, tokenizer, tmp_path):
    """r = 1 (old_logps = the current sum: the first step on each generated batch): CFPO's loss and parameter
    gradients equal RLOO's clipped ones."""
    rloo = _make(RLOOTrainer, RLOOConfig, tiny_model_dir, tokenizer, tmp_path / "r")
    ours = _make(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path / "o")
    inputs = make_rloo_inputs(rloo, seed=4, old="current")
    loss_ref, _, grads_ref = _loss_step(rloo, inputs)
    loss, _, grads = _loss_step(ours, inputs)
    torch.testing.assert_close(loss, loss_ref, atol=1e-7, rtol=1e-6)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-7, rtol=1e-6, msg=name)
    assert ours._metrics["train"]["cfpo/penalty"][-1] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.rounding
def test_plain_rloo_config_means_cfpo(tiny_model_dir, tokenizer, tmp_path):
    trainer = _make(CFPORLOOTrainer, RLOOConfig, tiny_model_dir, tokenizer, tmp_path)
    assert trainer.policy_objective == "cfpo"
    inputs = make_rloo_inputs(trainer, seed=5)
    loss, logps, _ = _loss_step(trainer, inputs)
    _, loss_ref, _, _ = _paper_equation(logps, inputs, EPS_LOW, EPS_HIGH)
    bound, _, _ = sequence_ratio_bounds(logps, inputs, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    assert_within(loss.item(), loss_ref.item(), bound.loss, "loss")


# ---- configuration --------------------------------------------------------------------------------------------------


def _cfg(tmp_path, cls=CFPORLOOConfig, **kw):
    return cls(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to="none",
               use_cpu=True, **kw)  # fmt: skip


def test_config_defaults(tmp_path):
    c = _cfg(tmp_path)
    assert c.policy_objective == "cfpo" and isinstance(c, RLOOConfig)


@pytest.mark.parametrize("objective", ["ppo", "CFPO", "", None, 1])
def test_bad_policy_objective(tmp_path, objective):
    with pytest.raises(ValueError, match="policy_objective"):
        _cfg(tmp_path, policy_objective=objective)


@pytest.mark.parametrize("objective", ["cfpo", "clip"])
@pytest.mark.parametrize("kw,name", [
    (dict(epsilon=1.0), "epsilon"),  # RLOOTrainer: no lower clip; CFPO: r* = 1 - eps = 0 is no ratio
    (dict(epsilon=1.5), "epsilon"),
    (dict(epsilon_high=float("inf")), "epsilon_high"),  # RLOOTrainer: no upper clip; CFPO: no penalty at all
    (dict(epsilon=0.0), "epsilon"),
])  # fmt: skip
def test_rloo_options_without_cfpo_meaning_are_refused_by_name(tmp_path, kw, name, objective):
    _cfg(tmp_path, cls=RLOOConfig, **kw)  # RLOO itself accepts them
    with pytest.raises(ValueError, match=rf"^{name} \("):
        _cfg(tmp_path, policy_objective=objective, **kw)
    # a plain RLOOConfig with it is refused by the trainer, before any model is loaded (the path does not exist)
    with pytest.raises(ValueError, match=rf"^{name} \("):
        CFPORLOOTrainer(model=str(tmp_path / "missing"), reward_funcs=reward_digits,
                        args=_cfg(tmp_path, cls=RLOOConfig, **kw), train_dataset=prompt_dataset())  # fmt: skip


@pytest.mark.parametrize("kw", [dict(loss_type="dapo"), dict(delta=2.0), dict(importance_sampling_level="token")])
def test_grpo_options_are_not_rloo_options(tmp_path, kw):
    """GRPO's loss options (aggregation, two-sided clipping, GSPO ratio) do not exist in RLOO: named, not ignored."""
    (name,) = kw
    with pytest.raises(TypeError, match=name):
        _cfg(tmp_path, **kw)


def test_trainer_refuses_other_configs(tmp_path):
    with pytest.raises(TypeError, match="args must be a CFPORLOOConfig or RLOOConfig, got CFPOConfig"):
        CFPORLOOTrainer(model=str(tmp_path / "missing"), reward_funcs=reward_digits,
                        args=_cfg(tmp_path, cls=CFPOConfig), train_dataset=prompt_dataset())  # fmt: skip
    with pytest.raises(TypeError, match="args must be a CFPOConfig or GRPOConfig, got CFPORLOOConfig"):
        CFPOTrainer(model=str(tmp_path / "missing"), reward_funcs=reward_digits, args=_cfg(tmp_path))
    c = _cfg(tmp_path)
    c.policy_objective = "ppo"  # mutated after construction: checked again by the trainer
    with pytest.raises(ValueError, match="policy_objective"):
        CFPORLOOTrainer(model=str(tmp_path / "missing"), reward_funcs=reward_digits, args=c)


def test_async_grpo_is_not_reached_and_refused(tmp_path):
    """TRL's experimental AsyncGRPOTrainer does not subclass GRPOTrainer and computes its clipped loss inline in
    compute_loss (no _compute_loss), so neither CFPO trainer can stand in for it; its config is refused by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning
        from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    assert not issubclass(AsyncGRPOTrainer, (GRPOTrainer, RLOOTrainer))
    assert "_compute_loss" not in vars(AsyncGRPOTrainer) and "compute_loss" in vars(AsyncGRPOTrainer)
    args = AsyncGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    for cls, cfg in ((CFPOTrainer, "CFPOConfig or GRPOConfig"), (CFPORLOOTrainer, "CFPORLOOConfig or RLOOConfig")):
        with pytest.raises(TypeError, match=f"args must be a {cfg}, got AsyncGRPOConfig"):
            cls(model=str(tmp_path / "missing"), reward_funcs=reward_digits, args=args)


# ---- sequence_ratio="mean": GSPO's length-normalised ratio, opt-in ---------------------------------------------------


def _hand_objective(r, adv, objective, eps_low, eps_high):
    """J(r, A) and dJ/dr in float64, written out here: cfpo r A - |A| / (2 eps) (r - 1)^2; clip min(r A, clip(r) A)."""
    if objective == "cfpo":
        eps = torch.where(adv > 0, torch.full_like(adv, eps_high), torch.full_like(adv, eps_low))
        return r * adv - adv.abs() / (2 * eps) * (r - 1) ** 2, adv - adv.abs() / eps * (r - 1)
    clipped = r.clamp(1 - eps_low, 1 + eps_high)
    flat = ((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < 1 - eps_low))  # the clip bound is the minimum
    return torch.minimum(r * adv, clipped * adv), torch.where(flat, 0.0, adv)


@pytest.mark.rounding
@pytest.mark.parametrize("objective", ["cfpo", "clip"])
def test_mean_sequence_ratio_is_gspo_the_core_and_the_paper_equation(tiny_model_dir, tokenizer, tmp_path, objective):
    """sequence_ratio="mean": r_i = exp((sum_t m_it log pi_it - old_i) / |y_i|), GSPO's ratio, written out in float64;
    it equals the core's ratio_level="sequence" ratio (compute_policy_loss with per-token old log-probs whose sum is
    old_i), and the loss, its gradient w.r.t. TRL's per-token log-probs and the metrics are the objective's equation
    on it, mean over sequences (for clip: GSPO's clipped objective on RLOO's advantages, not RLOOTrainer's loss)."""
    from cfpo_loss import compute_policy_loss

    trainer = _make(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path, policy_objective=objective,
                    sequence_ratio="mean")  # fmt: skip
    assert trainer.sequence_ratio == "mean"
    inputs = make_rloo_inputs(trainer, seed=8, noise=3.0)  # noise 3 on sums of up to 6 tokens: means on both sides
    # the empty completion as RLOOTrainer leaves it (old sum 0, so r = 1); A = 0 there, because RLOO's mean over
    # sequences counts its J(1, A) = A while the core's aggregation has no token for it
    inputs["old_logps"][4], inputs["advantages"][4] = 0.0, 0.0
    loss, logps, _ = _loss_step(trainer, inputs)
    m = inputs["completion_mask"].double()
    adv = inputs["advantages"].double()
    n = m.sum(1).clamp(min=1)
    r = torch.exp(((logps.detach().double() * m).sum(1) - inputs["old_logps"].double()) / n)
    objective_value, djdr = _hand_objective(r, adv, objective, EPS_LOW, EPS_HIGH)
    bound, grad_bound, metric_bound = sequence_ratio_bounds(logps, inputs, objective=objective, mean=True,
                                                            eps_low=EPS_LOW, eps_high=EPS_HIGH)  # fmt: skip
    assert_within(loss.item(), -objective_value.mean().item(), bound.loss, "loss")
    grad = -(djdr * r / n)[:, None] * m / len(r)
    assert_within(logps.grad.double(), grad, grad_bound, "dloss/dlog pi")
    # the core's sequence ratio on per-token old log-probs that sum to old_logps: the same r, loss and gradient
    spread = ((logps.detach() * inputs["completion_mask"]).sum(1) - inputs["old_logps"]) / n.float()
    old_per_token = logps.detach() - spread[:, None]
    leaf = logps.detach().clone().requires_grad_(True)
    core = compute_policy_loss(leaf, old_per_token, inputs["advantages"], inputs["completion_mask"].bool(),
                               objective=objective, eps_low=EPS_LOW, eps_high=EPS_HIGH, ratio_level="sequence",
                               agg="seq-mean-token-mean", global_batch_size=len(r))  # fmt: skip
    core.loss.backward()
    # the core on old log-probs spread back over the tokens: its own fp32 rounding of the spread and the mean, so
    # each side lies within its bound of the float64 values
    core_bound = reference.policy_loss_bound(leaf, old_per_token, inputs["advantages"], inputs["completion_mask"],
                                             objective=objective, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                             ratio_level="sequence", agg="seq-mean-token-mean")  # fmt: skip
    assert_within(core.ratio[:, 0], r, core_bound.ratio[:, 0] + bound.ratio, "core r")
    assert_within(core.loss, loss, core_bound.loss + bound.loss, "core loss")
    assert_within(leaf.grad, logps.grad, core_bound.grad + grad_bound, "core dloss/dlog pi")
    # metrics: on the mean ratio, per sequence
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    low, high = ((r < 1 - EPS_LOW) & (adv < 0)).double(), ((r > 1 + EPS_HIGH) & (adv > 0)).double()
    expected = {"clip_ratio/low_mean": low.mean(), "clip_ratio/high_mean": high.mean(),
                "clip_ratio/region_mean": (low + high).mean(), "cfpo/ratio_dev": (r - 1).abs().mean(),
                "cfpo/ratio_max": r.max(), "cfpo/ratio_min": r.min()}  # fmt: skip
    trl_names = {key: name for name, key in framework_keys("trl").items()}
    for key, value in expected.items():
        assert_within(logged[key], value.item(), metric_bound[trl_names[key]], key)
    assert low.sum() > 0 and high.sum() > 0, "the mean ratio should leave the trust region on both sides here"
    assert ("cfpo/penalty" in logged) == (objective == "cfpo")


def test_every_trl_key_of_the_metric_table_carries_its_core_metric(tiny_model_dir, tokenizer, tmp_path):
    """The adapters' one metric table (adapters/_metric_names.py) names the TRL key of each core metric: CFPORLOOTrainer
    logs each of them as the core's metric of that name on its per-sequence ratios (the core run on one "token" per
    sequence: log r_i against 0)."""
    from cfpo_loss import compute_policy_loss
    from cfpo_loss.adapters._metric_names import framework_keys

    trainer = _make(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path)
    inputs = make_rloo_inputs(trainer, seed=7, noise=1.0)
    _, logps, _ = _loss_step(trainer, inputs)
    log_r = ((logps.detach() * inputs["completion_mask"]).sum(1) - inputs["old_logps"])[:, None]
    core = compute_policy_loss(log_r, torch.zeros_like(log_r), inputs["advantages"], torch.ones_like(log_r).bool(),
                               eps_low=EPS_LOW, eps_high=EPS_HIGH).metric_floats()  # fmt: skip
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    keys = framework_keys("trl")
    assert set(keys) <= set(core) and set(keys.values()) <= set(logged)
    for name, key in keys.items():
        assert logged[key] == pytest.approx(core[name], rel=1e-5, abs=1e-6), (name, key)


@pytest.mark.parametrize("kw,warns", [
    (dict(max_completion_length=8), True),  # cfpo on the summed ratio, beyond 4 tokens: the caveat
    (dict(max_completion_length=None), True),  # as long as the model generates
    (dict(max_completion_length=4), False),
    (dict(max_completion_length=512, sequence_ratio="mean"), False),  # the opt-in
    (dict(max_completion_length=512, policy_objective="clip"), False),  # RLOOTrainer's own loss
], ids=["sum-8", "sum-None", "sum-4", "mean-512", "clip-512"])  # fmt: skip
def test_long_completions_on_the_summed_ratio_warn_at_construction(tiny_model_dir, tokenizer, tmp_path, kw, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _make(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path, **kw)
    ours = [w for w in caught if "summed sequence ratio" in str(w.message)]
    assert len(ours) == warns, [str(w.message) for w in caught]
    if warns:
        (w,) = ours
        assert w.category is UserWarning and "sequence_ratio='mean'" in str(w.message)
        assert f"max_completion_length={kw['max_completion_length']}" in str(w.message)
        assert w.filename == __file__ or "trl_helpers" in w.filename  # the user's line, not ours


def test_plain_rloo_config_means_the_summed_ratio_and_warns(tiny_model_dir, tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="summed sequence ratio"):
        trainer = _make(CFPORLOOTrainer, RLOOConfig, tiny_model_dir, tokenizer, tmp_path, max_completion_length=6)
    assert trainer.sequence_ratio == "sum"


@pytest.mark.parametrize("value", ["token", "SUM", "", None, 1])
def test_bad_sequence_ratio_is_refused_by_name(tmp_path, value):
    with pytest.raises(ValueError, match=r"unknown sequence_ratio .*; valid: 'sum', 'mean'"):
        _cfg(tmp_path, sequence_ratio=value)
    c = _cfg(tmp_path)
    c.sequence_ratio = value  # mutated after construction: checked again by the trainer, before any model loads
    with pytest.raises(ValueError, match=r"unknown sequence_ratio .*; valid: 'sum', 'mean'"):
        CFPORLOOTrainer(model=str(tmp_path / "missing"), reward_funcs=reward_digits, args=c)


def test_the_switch_is_a_hunk_of_the_stored_patch():
    """sequence_ratio="mean" lives in the mirrored method as a marked departure, so it is in the stored patch (which
    test_trl_check holds to the code: TRL's text + patch == our method)."""
    from cfpo_loss.adapters import trl_check

    patch = trl_check.patch_path("RLOOTrainer").read_text(encoding="utf-8")
    assert '+        if self.sequence_ratio == "mean":\n' in patch
    assert "+            log_ratio = log_ratio / completion_mask.sum(1).clamp(min=1.0)\n" in patch


def test_mean_ratio_trains(tiny_model_dir, tokenizer, tmp_path):
    """A real train() with the opt-in: finite, the (mean) ratio leaves 1, and cfpo trains differently from the sum."""
    trainer, logs = _train(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path / "mean",
                           sequence_ratio="mean", num_iterations=4)  # fmt: skip
    assert trainer.sequence_ratio == "mean" and len(logs) == 8
    for h in logs:
        assert math.isfinite(h["loss"]) and all(math.isfinite(h[k]) for k in (*CFPO_METRICS, "cfpo/penalty")), h
    assert max(h["cfpo/ratio_dev"] for h in logs) > 1e-3
    _, sum_logs = _train(CFPORLOOTrainer, CFPORLOOConfig, tiny_model_dir, tokenizer, tmp_path / "sum", num_iterations=4)
    assert logs[0]["loss"] == pytest.approx(sum_logs[0]["loss"], rel=1e-5, abs=1e-7)  # on-policy: r = 1 for both
    assert any(h["loss"] != s["loss"] for h, s in zip(logs, sum_logs))
