"""``CFPOConfig`` / ``CFPORLOOConfig`` and the checks both trainers run again at construction (a config may be a plain
``GRPOConfig`` / ``RLOOConfig``, or mutated after its ``__post_init__``): every option CFPO cannot honour is refused
by name, before any model is loaded."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig, RLOOConfig

from ..._checks import check_choice, check_eps
from ...surrogates import OBJECTIVES, get_objective
from ._fused import check_fused_args

POLICY_OBJECTIVES = tuple(OBJECTIVES)  # the core's registry: "cfpo", "clip"
#: TRL loss types that only choose the aggregation of the clipped objective (usable with either objective).
AGGREGATION_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: TRL loss types that are a different policy objective (not an aggregation): rejected.
_OTHER_OBJECTIVE_LOSS_TYPES = ("cispo", "sapo", "vespo")
#: CFPORLOOConfig.sequence_ratio: RLOO's exp(Σ_t log r_t) ("sum", RLOOTrainer's own) or GSPO's exp(mean_t log r_t)
SEQUENCE_RATIOS = ("sum", "mean")
#: cfpo on RLOO's summed ratio with completions longer than this is warned about at construction. Measured by
#: examples/rloo_ratio_study.py (README, "The length caveat"; 3 seeds, final reward): at 4 tokens cfpo 0.77-0.84
#: against clip's 0.98-1.00 (and above clip in the stability demo's RLOO table, also 4 tokens); at 8 tokens 0.55-0.63
#: against 0.97-0.98, at 12 0.40-0.56, at 16 0.40-0.44, at 32 0.30-0.42, while sequence_ratio="mean" stayed at
#: 0.96-0.99 at every length. 4 is the longest length measured without a clear loss; 5-7 were not measured.
SUM_RATIO_MAX_LENGTH = 4


def check_epsilons(args) -> tuple[float, float]:
    """``epsilon`` / ``epsilon_high`` (GRPOConfig and RLOOConfig alike) as (eps_low, eps_high), by the core's rule:
    eps_low in (0, 1), eps_high finite and > 0. TRL itself reads ``epsilon >= 1`` and ``epsilon_high = inf`` as "no
    lower / upper clip"; for CFPO eps is the trust region's half-width (the penalty |A| / (2 eps) * (r - 1)^2 vanishes
    at eps = inf, and r* = 1 - eps must be a ratio), so both are refused by name, for both objectives."""
    return check_eps(args.epsilon, args.epsilon_high, names=("epsilon (eps_low)", "epsilon_high (eps_high)"))


def check_grpo(args, policy_objective, use_fused_loss) -> None:
    """Raise a clear error for a configuration CFPOTrainer cannot honour. Runs for CFPOConfig and GRPOConfig."""
    check_choice("policy_objective", policy_objective, POLICY_OBJECTIVES)
    if not isinstance(use_fused_loss, bool):
        raise TypeError(f"use_fused_loss must be a bool, got {type(use_fused_loss).__name__} {use_fused_loss!r}")
    if use_fused_loss:
        check_fused_args(args)
    loss_type = args.loss_type
    if loss_type not in AGGREGATION_LOSS_TYPES:
        if loss_type in _OTHER_OBJECTIVE_LOSS_TYPES:
            kind = "is a different policy objective in TRL, not an aggregation"
        else:
            kind = "is unknown"
        raise ValueError(
            f"loss_type={loss_type!r} {kind}. With CFPOTrainer, loss_type only chooses how the "
            f"{policy_objective!r} objective is aggregated: one of {AGGREGATION_LOSS_TYPES}. "
            f"To train with TRL's {loss_type!r} objective, use trl.GRPOTrainer."
        )
    _, eps_high = check_epsilons(args)
    delta = args.delta
    if delta is not None:
        if not get_objective(policy_objective).takes_dual_clip:
            raise ValueError(
                f"delta={delta!r} (two-sided clipping) is an option of the clipped objective; CFPO has nothing to "
                "clip, its quadratic penalty already bounds large ratios. Leave delta=None with "
                "policy_objective='cfpo'."
            )
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 1.0 + eps_high:
            raise ValueError(f"delta must be a float > 1 + epsilon_high = {1.0 + eps_high}, got {delta!r}")


def check_rloo(args, policy_objective, sequence_ratio) -> None:
    """Raise a clear error for an RLOO configuration CFPORLOOTrainer cannot honour (CFPORLOOConfig and RLOOConfig)."""
    check_choice("policy_objective", policy_objective, POLICY_OBJECTIVES)
    check_choice("sequence_ratio", sequence_ratio, SEQUENCE_RATIOS)
    check_epsilons(args)


def warn_long_sum_ratio(args, policy_objective, sequence_ratio) -> None:
    """The length caveat, at construction: cfpo on RLOO's summed ratio with long completions."""
    length = args.max_completion_length  # None: as long as the model generates
    if policy_objective == "cfpo" and sequence_ratio == "sum" and (length is None or length > SUM_RATIO_MAX_LENGTH):
        warnings.warn(
            f"CFPORLOOTrainer: policy_objective='cfpo' on RLOO's summed sequence ratio r = exp(sum_t log r_t) with "
            f"max_completion_length={length}: r grows with the completion's length and CFPO's gradient with r^2, and "
            f"beyond {SUM_RATIO_MAX_LENGTH} tokens CFPO on it learned at a fraction of clip's pace in "
            "examples/rloo_ratio_study.py. Set sequence_ratio='mean' (GSPO's length-normalised exp(mean_t log r_t)), "
            "or policy_objective='clip'.",
            UserWarning,
            stacklevel=3,
        )


@dataclass
class CFPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the choice of policy objective.

    Args:
        policy_objective (`str`, *optional*, defaults to `"cfpo"`):
            `"cfpo"`: clipping-free objective r·A − |A|/(2ε)·(r−1)² (ε = `epsilon_high` for A > 0, `epsilon`
            for A < 0). `"clip"`: TRL's clipped objective min(r·A, clip(r, 1−ε_low, 1+ε_high)·A).
            `loss_type` chooses the aggregation for both (grpo, bnpo, dr_grpo, dapo, luspo).
        use_fused_loss (`bool`, *optional*, defaults to `False`):
            `True`: compute LM head, log-probs, objective and aggregation in one chunked pass
            (`cfpo_loss.fused_linear_policy_loss`), which never holds the logits and computes the gradients in the
            forward; `False`: TRL's own chunked log-prob kernel, then the objective. Same loss and gradients. The
            fused pass supports a subset of TRL's setups and loss options (one process, DDP or FSDP2; not FSDP1 /
            DeepSpeed; no entropy bonus / entropy mask / off-policy mask / vLLM IS correction; KL only with
            use_bias_correction_kl=False), refused by name.
    """

    policy_objective: str = field(
        default="cfpo",
        metadata={
            "help": "Policy objective: 'cfpo' (clipping-free quadratic trust region) or 'clip' (PPO/GRPO clipping). "
            "loss_type keeps choosing the aggregation.",
            "choices": list(POLICY_OBJECTIVES),
        },
    )
    use_fused_loss: bool = field(
        default=False,
        metadata={
            "help": "Compute LM head + objective + aggregation in one chunked pass (cfpo_loss.fused) instead of "
            "TRL's log-prob kernel followed by the objective; supports a subset of TRL's loss options."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_grpo(self, self.policy_objective, self.use_fused_loss)


@dataclass
class CFPORLOOConfig(RLOOConfig):
    """``RLOOConfig`` plus the choice of policy objective and of the sequence ratio it acts on.

    Args:
        policy_objective (`str`, *optional*, defaults to `"cfpo"`):
            `"cfpo"`: clipping-free objective r·A − |A|/(2ε)·(r−1)² on the sequence ratio r (ε = `epsilon_high` for
            A > 0, `epsilon` for A < 0). `"clip"`: TRL's RLOO objective min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) on the
            same ratio. Both are averaged over sequences, as in TRL.
        sequence_ratio (`str`, *optional*, defaults to `"sum"`):
            `"sum"`: RLOO's own ratio r = exp(Σ_t log π_θ − Σ_t log π_old) over the completion's valid tokens
            (`RLOOTrainer`'s estimator, unchanged). `"mean"` (opt-in): GSPO's length-normalised r = exp((Σ_t log π_θ −
            Σ_t log π_old) / |y|), for both objectives; with `"clip"` that is GSPO's clipped objective on RLOO's
            advantages, no longer `RLOOTrainer`'s loss. The summed ratio grows with the completion's length, and CFPO's
            gradient on it with r²: beyond a few tokens `"mean"` is the one to use with cfpo (a UserWarning at
            construction says so; README "CFPORLOOTrainer").
    """

    policy_objective: str = field(
        default="cfpo",
        metadata={
            "help": "Policy objective on RLOO's sequence ratio: 'cfpo' (clipping-free quadratic trust region) or "
            "'clip' (TRL's clipped RLOO objective).",
            "choices": list(POLICY_OBJECTIVES),
        },
    )
    sequence_ratio: str = field(
        default="sum",
        metadata={
            "help": "The sequence ratio the objective acts on: 'sum' (RLOO's exp(sum_t log r_t)) or 'mean' (GSPO's "
            "exp(mean_t log r_t), length-normalised; recommended with cfpo beyond a few tokens).",
            "choices": list(SEQUENCE_RATIOS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_rloo(self, self.policy_objective, self.sequence_ratio)
