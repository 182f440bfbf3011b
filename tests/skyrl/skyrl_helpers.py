"""Batches, configs, the paper's equation in float64 (written here, independently of cfpo_loss) and the derived
fp32 error bounds the comparisons with it use."""

from __future__ import annotations

import torch

U = 2.0**-24  # fp32 unit roundoff
EPS_LOW, EPS_HIGH = 0.2, 0.28
B, T = 8, 12
PROMPTS = [(0, 4), (4, 8)]  # 2 prompts x 4 samples (prompt_mean's groups)
MICRO_BATCH = 4  # token_mean_legacy's micro-batches
MAX_SEQ_LEN = 16  # seq_mean_token_sum_norm's constant
REDUCTIONS = ("token_mean", "token_mean_legacy", "sequence_mean", "seq_mean_token_sum_norm", "prompt_mean")

#: off-policy corrections SkyRL offers (off_policy_correction.*), each combination its clipped loss composes
CORRECTIONS = {
    "none": {},
    "tis_token": {"tis_ratio_type": "token", "token_tis_ratio_clip_high": 1.5},
    "tis_sequence+product_mask": {"tis_ratio_type": "sequence", "sequence_tis_ratio_clip_high": 3.0,
                                  "sequence_mask_metric": "product", "product_mask_low": 0.3, "product_mask_high": 3.0},
    "geo_mask": {"sequence_mask_metric": "geometric", "geo_mask_low": 0.9, "geo_mask_high": 1.1},
    "geo_mask+outlier+token_mask": {"sequence_mask_metric": "geometric", "geo_mask_low": 0.9, "geo_mask_high": 1.1,
                                    "outlier_token_is_threshold_low": 0.4, "outlier_token_is_threshold_high": 2.5,
                                    "token_mask_is_threshold_low": 0.6, "token_mask_is_threshold_high": 1.6},
}  # fmt: skip


def algorithm(policy_loss_type: str = "regular", correction: str = "none", reduction: str = "token_mean", **options):
    """SkyRL's real AlgorithmConfig with the tests' ε and the named off-policy correction."""
    from skyrl.train.config import AlgorithmConfig

    cfg = AlgorithmConfig()
    cfg.policy_loss_type = policy_loss_type
    cfg.loss_reduction = reduction
    cfg.eps_clip_low, cfg.eps_clip_high = EPS_LOW, EPS_HIGH
    cfg.max_seq_len = MAX_SEQ_LEN
    for key, value in CORRECTIONS[correction].items():
        setattr(cfg.off_policy_correction, key, value)
    for key, value in options.items():
        setattr(cfg, key, value)
    return cfg


def batch(seed: int = 0, *, per_token_advantages: bool = True, spread: float = 0.3):
    """log π_θ (leaf, requires grad), log π_old, log π_rollout, raw advantages, 0/1 float loss mask (right padding,
    lengths 3..T). Log-ratios ~ N(0, spread²): both clip branches and every correction mask are active."""
    g = torch.Generator().manual_seed(seed)
    log_probs = (-torch.rand(B, T, generator=g) * 2 - 0.05).requires_grad_()
    old = log_probs.detach() + spread * torch.randn(B, T, generator=g)
    rollout = old + spread * torch.randn(B, T, generator=g)
    if per_token_advantages:
        advantages = torch.randn(B, T, generator=g)
    else:
        advantages = torch.randn(B, 1, generator=g).expand(B, T).clone()
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).float()
    return log_probs, old, rollout, advantages, mask


def scaled(advantages, mask, reduction: str):
    """SkyRL's own per-mini-batch advantage scaling (what its trainer does before the loss)."""
    from skyrl.backends.skyrl_train.utils.ppo_utils import apply_loss_reduction_to_advantages_minibatch

    return apply_loss_reduction_to_advantages_minibatch(
        advantages, mask, reduction, MICRO_BATCH, MAX_SEQ_LEN, prompt_boundaries=PROMPTS
    )


# ---------------------------------------------------------------------------------------------- the oracle
def reduction_scale(mask, reduction: str):
    """float64 (B, T): the weight of each token's objective in the reduced loss, from SkyRL's definitions."""
    mask = mask.double()
    rows = mask.sum(-1, keepdim=True).clamp(min=1)
    if reduction == "token_mean":
        return mask / mask.sum()
    if reduction == "token_mean_legacy":  # mean over micro-batches of each micro-batch's token mean
        scale = torch.zeros_like(mask)
        chunks = range(0, B, MICRO_BATCH)
        for i in chunks:
            scale[i : i + MICRO_BATCH] = mask[i : i + MICRO_BATCH] / mask[i : i + MICRO_BATCH].sum() / len(chunks)
        return scale
    if reduction == "sequence_mean":
        return mask / rows / B
    if reduction == "seq_mean_token_sum_norm":
        return mask / MAX_SEQ_LEN / B
    if reduction == "prompt_mean":
        scale = torch.zeros_like(mask)
        for start, end in PROMPTS:
            scale[start:end] = mask[start:end] / mask[start:end].sum() / len(PROMPTS)
        return scale
    raise ValueError(reduction)


def paper_objective(ratio, advantages, eps_low=EPS_LOW, eps_high=EPS_HIGH):
    """J = r·A − |A|/(2ε)·(r − 1)², ε = eps_high where A > 0, eps_low where A < 0 (the paper's equation)."""
    eps = torch.where(advantages > 0, torch.full_like(advantages, eps_high), torch.full_like(advantages, eps_low))
    return ratio * advantages - advantages.abs() / (2 * eps) * (ratio - 1) ** 2


def oracle_weights(old, rollout, mask, correction: str):
    """float64 per-token IS weight × rejection for the corrections the oracle knows (token TIS, geometric mask)."""
    options = CORRECTIONS[correction]
    log_is = (old - rollout).double()
    weights = mask.double().clone()
    if "geo_mask_low" in options:
        geo = torch.exp((log_is * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True))
        weights = weights * ((geo >= options["geo_mask_low"]) & (geo <= options["geo_mask_high"]))
    if options.get("tis_ratio_type") == "token":
        weights = weights * torch.exp(log_is).clamp(max=options["token_tis_ratio_clip_high"])
    return weights


def oracle(log_probs, old, advantages, mask, reduction, weights, *, sequence=False):
    """float64 loss and dloss/dlog π_θ of −Σ scale·w·J with raw (unscaled) advantages."""
    lp = log_probs.detach().double().requires_grad_()
    log_ratio = lp - old.double()
    if sequence:  # GSPO ratio exp(mean_t log r), one per sequence
        m = mask.double()
        log_ratio = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)).expand_as(lp)
    objective = paper_objective(torch.exp(log_ratio), advantages.double())
    loss = -(reduction_scale(mask, reduction) * weights * objective).sum()
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def fp32_bounds(log_probs, old, advantages, mask, reduction, weights, weight_log_is=None, *, sequence=False):
    """First-order bounds on |fp32 − exact| for the loss and each gradient entry, in float64.

    Standard model: each fp32 operation errs by at most u of its result (exp: 2u, one ulp).
    Loss: r = exp(Δ) from an fp32 Δ = log π − log π_old has relative error e_r = (|Δ| + 2)·u (the subtraction
    rounds Δ, exp adds one ulp); for the sequence ratio the fp32 mean of n log-ratios adds (Σ|Δ| + |mean|)·u. With
    a = |A_s|, the scaled advantage (SkyRL's fp32 divisions: ≤ 3u relative), c = a/(2ε), d = r − 1, a token's
    objective errs by at most u·[|r·A_s|(|Δ| + 5) + c·(2|d|·r·(|Δ| + 2) + 6d²)]; the IS weight (fp32 exp of
    old − rollout: (|log w| + 3)·u) scales it; the sum of n terms adds n·u·Σ|w·J| (recursive summation).
    Gradient −w·(A_s − 2c·d)·r: k = 15 roundings on its path (advantage scaling 2, ratio 3, |A|/(2ε) 2, r − 1 1,
    2c·d 1, A − 2c·d 1, × w 1, × r 1, the weight 3), each counted against the largest magnitude on the path,
    w·r·(|A_s| + 2c|d| + 2c·r), and amplified by |Δ| and |log w| (the two exps):
    u·(15 + |Δ| + |log w|)·w·r·(|A_s| + 2c|d| + 2c·r).
    """
    m = mask.double()
    delta = (log_probs.detach() - old).double().abs() * m
    a_s = (reduction_scale(mask, reduction) * advantages.double()).abs()
    eps = torch.where(advantages > 0, EPS_HIGH, EPS_LOW).double()
    if sequence:
        n = m.sum(-1, keepdim=True)
        mean = (log_probs.detach() - old).double().mul(m).sum(-1, keepdim=True) / n
        e_r = (n * delta.sum(-1, keepdim=True) / n + mean.abs() + 2) * U
        r = torch.exp(mean).expand_as(m)
        e_r = e_r.expand_as(m)
    else:
        e_r = (delta + 2) * U
        r = torch.exp((log_probs.detach() - old).double())
    c = a_s / (2 * eps)
    d = (r - 1).abs()
    log_w = (weight_log_is.double().abs() if weight_log_is is not None else torch.zeros_like(m)) * m
    e_w = (log_w + 3) * U
    w = weights.abs()
    term = U * (r * a_s * (e_r / U + 5) + c * (2 * d * r * (e_r / U + 2) + 6 * d**2))
    objective = (r * a_s + c * d**2) * m
    loss_bound = (w * term + w * objective * e_w).sum() + m.sum() * U * (w * objective).sum()
    grad_bound = U * (15 + delta + log_w) * w * r * (a_s + 2 * c * d + 2 * c * r)
    if sequence:  # each token's gradient is the mean of the row's n terms: their largest error, plus the sum's n·u
        terms = w * (a_s + 2 * c * d) * r * m
        n = m.sum(-1, keepdim=True)
        grad_bound = (grad_bound * m + e_r * terms).amax(-1, keepdim=True) + n * U * terms.amax(-1, keepdim=True)
        grad_bound = grad_bound.expand_as(m)
    return loss_bound, grad_bound * m
