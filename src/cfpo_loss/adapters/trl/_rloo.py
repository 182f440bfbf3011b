"""``CFPORLOOTrainer``: ``RLOOTrainer`` with the policy objective from cfpo_loss. The mirrored ``_compute_loss`` is in
``_rloo_mirror.py``, the configuration checks (and the length warning) in ``_config.py``; here is the core's objective
it calls."""

from __future__ import annotations

from typing import ClassVar

import torch
from trl import RLOOConfig, RLOOTrainer

from ...surrogates import get_objective
from ._config import CFPORLOOConfig, check_rloo, warn_long_sum_ratio
from ._rloo_mirror import RLOOLossMirror


class CFPORLOOTrainer(RLOOLossMirror, RLOOTrainer):
    """``RLOOTrainer`` with the policy objective taken from cfpo_loss (CFPO or clipped); everything else is TRL's.

    RLOO's ratio is one per sequence, r = exp(Σ_t log π_θ(y_t) − Σ_t log π_old(y_t)) over the completion's valid
    tokens (TRL's; ``sequence_ratio="mean"`` opts into GSPO's length-normalised exp(mean_t log r_t)), and its loss is
    the mean over sequences of −J(r, A); only J changes. Accepts a ``CFPORLOOConfig`` or a plain ``RLOOConfig``
    (objective "cfpo", sequence ratio "sum" then). With cfpo on the summed ratio and ``max_completion_length`` above
    ``SUM_RATIO_MAX_LENGTH`` (4) tokens, construction warns (README, "The length caveat"). See the package docstring.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "rloo", "cfpo"]
    _name = "CFPO-RLOO"

    def __init__(self, model, reward_funcs, args=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = CFPORLOOConfig(f"{str(name).rstrip('/').split('/')[-1]}-CFPO-RLOO")
        elif not isinstance(args, RLOOConfig):
            raise TypeError(f"args must be a CFPORLOOConfig or RLOOConfig, got {type(args).__name__}")
        policy_objective = getattr(args, "policy_objective", "cfpo")
        sequence_ratio = getattr(args, "sequence_ratio", "sum")
        check_rloo(args, policy_objective, sequence_ratio)  # before loading any model
        warn_long_sum_ratio(args, policy_objective, sequence_ratio)
        self.policy_objective = policy_objective
        self.sequence_ratio = sequence_ratio  # read by the mirrored _compute_loss
        self._objective = get_objective(policy_objective)  # the core's record: terms, has_penalty
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)

    def _objective_terms(self, ratio: torch.Tensor, advantages: torch.Tensor):
        """The core's terms of the objective (J to maximise, dJ/dr, penalty or None) on RLOO's sequence ratio, the very
        function cfpo_surrogate / clipped_surrogate return the value of. RLOO has no dual clip."""
        return self._objective.terms(ratio, advantages, self.epsilon_low, self.epsilon_high, None)

    def _policy_objective(self, ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """Per-sequence objective J(r, A) to maximise, from the core."""
        return self._objective_terms(ratio, advantages).objective
