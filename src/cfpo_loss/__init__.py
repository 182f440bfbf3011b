"""cfpo_loss: Clipping-Free Policy Optimization (arXiv 2601.22801) for LLM RL post-training.

The CFPO per-token objective, maximised (loss = −objective, aggregated):

    J_CFPO = r·A − |A|/(2ε)·(r − 1)²        see cfpo_loss/surrogates.py

Framework adapters live in cfpo_loss.adapters.{trl,verl,openrlhf}; importing this package imports
no RL framework.
"""

from ._version import __version__
from .advantages import group_advantages, rloo_advantages
from .aggregation import AGG_MODES, aggregate_loss
from .fused import fused_linear_policy_loss
from .loss import PolicyLossOutput, compute_policy_loss
from .metrics import read_metrics
from .surrogates import OBJECTIVES, Objective, cfpo_surrogate, clipped_surrogate, get_objective

__all__ = [
    "AGG_MODES",
    "OBJECTIVES",
    "Objective",
    "PolicyLossOutput",
    "__version__",
    "aggregate_loss",
    "cfpo_surrogate",
    "clipped_surrogate",
    "compute_policy_loss",
    "fused_linear_policy_loss",
    "get_objective",
    "group_advantages",
    "read_metrics",
    "rloo_advantages",
]
