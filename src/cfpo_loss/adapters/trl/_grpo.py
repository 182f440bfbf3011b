"""``CFPOTrainer``: ``GRPOTrainer`` with the policy objective from cfpo_loss. The mirrored ``_compute_loss`` is in
``_grpo_mirror.py``, the fused path in ``_fused.py``, the configuration checks in ``_config.py``; here is what they
call: the core's objective, and TRL's metric lines that the mirrored method and the fused path share."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ...surrogates import get_objective
from . import _fused
from ._config import CFPOConfig, check_grpo
from ._grpo_mirror import GRPOLossMirror
from ._metrics import log_ratio_metrics


class MetricReducers(NamedTuple):
    masked_seq_mean: Callable  # x -> one value per sequence
    global_masked_mean: Callable  # x -> the masked mean over every rank, a float


class CFPOTrainer(GRPOLossMirror, GRPOTrainer):
    """``GRPOTrainer`` with the policy objective taken from cfpo_loss (CFPO or clipped); everything else is TRL's.

    Accepts a ``CFPOConfig`` or a plain ``GRPOConfig`` (objective "cfpo" then). See the package docstring.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "cfpo"]
    _name = "CFPO"

    def __init__(self, model, reward_funcs=None, args=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = CFPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-CFPO")
        elif not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a CFPOConfig or GRPOConfig, got {type(args).__name__}")
        policy_objective = getattr(args, "policy_objective", "cfpo")
        check_grpo(args, policy_objective, getattr(args, "use_fused_loss", False))  # before loading any model
        self.policy_objective = policy_objective
        self._objective = get_objective(policy_objective)  # the core's record: terms, takes_dual_clip, has_penalty
        self.use_fused_loss = getattr(args, "use_fused_loss", False)
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        if self.use_fused_loss:
            _fused.check_fused_model(self)
            _fused.add_fused_policy_loss(self.accelerator.unwrap_model(self.model))

    def _compute_loss_fused(self, model, inputs):
        """``use_fused_loss=True``: ``_compute_loss``'s loss in one chunked pass (``_fused.compute_loss_fused``)."""
        return _fused.compute_loss_fused(self, model, inputs)

    @property
    def _dual_clip(self):
        return self.args.delta if self._objective.takes_dual_clip else None

    def _objective_terms(self, coef_1: torch.Tensor, advantages: torch.Tensor):
        """The core's per-token terms of the objective (J to maximise, dJ/dr, penalty or None), the very function
        cfpo_surrogate / clipped_surrogate return the value of. Shapes broadcast as TRL's coef_1 * advantages."""
        return self._objective.terms(coef_1, advantages, self.epsilon_low, self.epsilon_high, self._dual_clip)

    def _policy_objective(self, coef_1: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """Per-token objective J(r, A) to maximise, from the core."""
        return self._objective_terms(coef_1, advantages).objective

    def _metric_reducers(self, mask) -> MetricReducers:
        """TRL 1.16.0's metric closures from `_compute_loss`, verbatim."""

        def masked_seq_mean(x):
            if x.shape[1] == 1:  # when importance_sampling_level == "sequence": already one value per sequence
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:  # when importance_sampling_level == "sequence": one value per sequence
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        return MetricReducers(masked_seq_mean, global_masked_mean)

    def _log_trust_region_metrics(self, mode, coef_1, advantages, mask):
        """TRL's clip_ratio/* metrics (trl 1.16.0 `GRPOTrainer._compute_loss`, verbatim: same meaning for both
        objectives) plus cfpo/ratio_dev, cfpo/ratio_max, cfpo/ratio_min and (cfpo only) cfpo/penalty.

        coef_1 is the ratio, (B, T) at token level or (B, 1) at sequence level (then the statistics are per
        sequence, as TRL's are)."""
        masked_seq_mean, global_masked_mean = self._metric_reducers(mask)
        if self.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
            # Compute the clipped probability ratios
            is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
            is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
            is_region_clipped = is_low_clipped | is_high_clipped
            self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(is_low_clipped.float()))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(is_high_clipped.float()))
            self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(is_region_clipped.float()))
            gathered_low_clip = self.accelerator.gather(masked_seq_mean(is_low_clipped.float()))
            self._metrics[mode]["clip_ratio/low_min"].append(nanmin(gathered_low_clip).item())
            gathered_high_clip = self.accelerator.gather(masked_seq_mean(is_high_clipped.float()))
            self._metrics[mode]["clip_ratio/high_max"].append(nanmax(gathered_high_clip).item())

        # trust-region diagnostics logged for both objectives (penalty only for cfpo), so runs compare side by
        # side: mean |r - 1|, max and min r over valid tokens (per sequence at sequence level), and CFPO's mean
        # quadratic penalty |A| / (2 eps) * (r - 1)^2. TRL's cispo / vespo metrics are gone with those loss types.
        ratio = coef_1.detach()
        # (B, 1) when importance_sampling_level == "sequence": one value per sequence, as TRL's metrics count them
        valid = torch.ones_like(ratio, dtype=torch.bool) if ratio.shape[1] == 1 else mask.bool()
        log_ratio_metrics(self, mode, ratio, advantages, valid)
