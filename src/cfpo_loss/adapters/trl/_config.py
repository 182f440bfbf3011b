"""``CFPOConfig`` / ``CFPORLOOConfig`` and the checks both trainers run again at construction (a config may be a plain
``GRPOConfig`` / ``RLOOConfig``, or mutated after its ``__post_init__``): every option CFPO cannot honour is refused
by name, before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig, RLOOConfig

from ..._checks import check_eps
from ...surrogates import OBJECTIVES, get_objective
from ._fused import check_fused_args

POLICY_OBJECTIVES = tuple(OBJECTIVES)  # the core's registry: "cfpo", "clip"
#: TRL loss types that only choose the aggregation of the clipped objective (usable with either objective).
AGGREGATION_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: TRL loss types that are a different policy objective (not an aggregation): rejected.
_OTHER_OBJECTIVE_LOSS_TYPES = ("cispo", "sapo", "vespo")


def check_policy_objective(policy_objective) -> str:
    if not isinstance(policy_objective, str) or policy_objective not in POLICY_OBJECTIVES:
        raise ValueError(f"policy_objective must be one of {POLICY_OBJECTIVES}, got {policy_objective!r}")
    return policy_objective


def check_epsilons(args) -> tuple[float, float]:
    """``epsilon`` / ``epsilon_high`` (GRPOConfig and RLOOConfig alike) as (eps_low, eps_high), by the core's rule:
    eps_low in (0, 1), eps_high finite and > 0. TRL itself reads ``epsilon >= 1`` and ``epsilon_high = inf`` as "no
    lower / upper clip"; for CFPO eps is the trust region's half-width (the penalty |A| / (2 eps) * (r - 1)^2 vanishes
    at eps = inf, and r* = 1 - eps must be a ratio), so both are refused by name, for both objectives."""
    return check_eps(args.epsilon, args.epsilon_high, names=("epsilon (eps_low)", "epsilon_high (eps_high)"))


def check_grpo(args, policy_objective, use_fused_loss) -> None:
    """Raise a clear error for a configuration CFPOTrainer cannot honour. Runs for CFPOConfig and GRPOConfig."""
    check_policy_objective(policy_objective)
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


def check_rloo(args, policy_objective) -> None:
    """Raise a clear error for an RLOO configuration CFPORLOOTrainer cannot honour (CFPORLOOConfig and RLOOConfig)."""
    check_policy_objective(policy_objective)
    check_epsilons(args)


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
    """``RLOOConfig`` plus the choice of policy objective.

    Args:
        policy_objective (`str`, *optional*, defaults to `"cfpo"`):
            `"cfpo"`: clipping-free objective r·A − |A|/(2ε)·(r−1)² on RLOO's sequence ratio r = exp(Σ_t log π_θ −
            Σ_t log π_old) (ε = `epsilon_high` for A > 0, `epsilon` for A < 0). `"clip"`: TRL's RLOO objective
            min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) on the same ratio. Both are averaged over sequences, as in TRL.
    """

    policy_objective: str = field(
        default="cfpo",
        metadata={
            "help": "Policy objective on RLOO's sequence ratio: 'cfpo' (clipping-free quadratic trust region) or "
            "'clip' (TRL's clipped RLOO objective).",
            "choices": list(POLICY_OBJECTIVES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_rloo(self, self.policy_objective)
