"""``CFPORLOOTrainer._compute_loss``: trl==1.16.0 ``RLOOTrainer._compute_loss`` (``trl/trainer/rloo_trainer.py``)
with the objective from cfpo_loss, alone in this module so that its text compares with TRL's line for line.

TRL's method: per-token log-probs through the same kernel as GRPO's, ONE ratio per sequence, r = exp(Σ_t m_t log π_θ −
old_logps) with ``old_logps`` the rollout policy's Σ_t m_t log π_old (the sum, not GSPO's length-normalised mean;
``_generate_and_score_completions`` always computes it), the clipped objective on r, and the plain mean over
sequences; KL to the reference (``beta``) is subtracted from the *reward* before the leave-one-out advantages, so it
never reaches the loss. The copy departs in four places, each marked ``# CFPO:`` and stored as
``mirror/RLOOTrainer._compute_loss.patch`` (three hunks: 2 and 3 share one; a test holds TRL's text plus that patch to
this method):

1. a docstring;
2. the opt-in ``sequence_ratio="mean"`` (``CFPORLOOConfig``): the log-ratio divided by the completion's valid tokens,
   so r = exp(mean_t log r_t), GSPO's length-normalised ratio (the core's ``ratio_level="sequence"``), for both
   objectives; with ``"sum"`` (the default) r is RLOO's own. RLOOTrainer keeps only the summed rollout log-prob
   (``old_logps``), so the mean is taken here, on the sums, as TRL's GRPO ``importance_sampling_level="sequence"``
   does (``(log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)``; the tests hold it to the core's);
3. TRL's ``coef_2`` and ``-torch.min`` become ``-J(coef_1, A)`` with J the core's objective record
   (``CFPORLOOTrainer._policy_objective``: the core takes the ratio as given, so no new entry point was needed);
4. after TRL's ``clip_ratio/*`` block (verbatim, per sequence, on the ratio the objective used): ``cfpo/ratio_dev``,
   ``cfpo/ratio_max``, ``cfpo/ratio_min`` and (cfpo only) ``cfpo/penalty`` per sequence, through the same
   ``log_ratio_metrics`` as ``CFPOTrainer``.

With ``policy_objective="clip"`` a real ``train()`` gives ``RLOOTrainer``'s logged trajectory and parameters bit for
bit, and cfpo is the paper's equation on that ratio (loss, gradient, metrics): the contract tests/trl/test_rloo.py
holds.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import nanmax, nanmin

from ._metrics import log_ratio_metrics


class RLOOLossMirror:
    """The mirrored method; ``CFPORLOOTrainer`` (``_rloo.py``) puts it before ``RLOOTrainer`` and provides what it
    calls beyond TRL's: ``sequence_ratio``, ``_policy_objective`` (and ``_objective`` / ``_objective_terms`` for
    ``log_ratio_metrics``)."""

    def _compute_loss(self, model, inputs):
        """trl==1.16.0 RLOOTrainer._compute_loss with the objective from cfpo_loss. Departures are marked `# CFPO:`."""
        # Compute the per-token log probabilities for the model
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)  # we only need to compute the logits for the completion tokens

        # Compute the per_token_logps and the entropy at each position in the completion
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"),
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"),
            num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"),
            token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_position_ids=inputs.get("image_position_ids"),
        )

        logps = (per_token_logps * completion_mask).sum(1)  # mask out padding and tokens after EOS
        old_logps = inputs["old_logps"]
        log_ratio = logps - old_logps
        # CFPO: sequence_ratio="mean" (opt-in) divides by the completion's valid tokens: GSPO's exp(mean_t log r_t),
        # the core's ratio_level="sequence", instead of RLOO's exp(sum_t log r_t), for both objectives.
        if self.sequence_ratio == "mean":
            log_ratio = log_ratio / completion_mask.sum(1).clamp(min=1.0)

        # Compute the loss
        advantages = inputs["advantages"]
        coef_1 = torch.exp(log_ratio)
        # CFPO: TRL's clipped objective (coef_2 = clamp(coef_1, ...), -min(coef_1 * A, coef_2 * A); trl 1.16.0
        # rloo_trainer.py lines 1829-1832) is replaced by the core's objective on the same sequence ratio coef_1, (B,).
        per_sequence_loss = -self._policy_objective(coef_1, advantages)
        loss = per_sequence_loss.mean()

        # Log the metrics
        mode = "train" if self.model.training else "eval"

        # RLOO returns an unscaled loss (the HF Trainer divides by gradient accumulation), so add the aux term unscaled
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        # Entropy
        entropy_stats = self.accelerator.reduce(
            torch.stack([(entropies * completion_mask).sum(), completion_mask.sum().float()]), reduction="sum"
        )
        self._metrics[mode]["entropy"].append((entropy_stats[0] / entropy_stats[1].clamp(min=1.0)).item())

        # Compute the clipped probability ratios
        is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
        is_region_clipped = is_low_clipped | is_high_clipped
        gathered_low_clip = self.accelerator.gather(is_low_clipped.float())
        self._metrics[mode]["clip_ratio/low_mean"].append(gathered_low_clip.nanmean().item())
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(gathered_low_clip).item())
        gathered_high_clip = self.accelerator.gather(is_high_clipped.float())
        self._metrics[mode]["clip_ratio/high_mean"].append(gathered_high_clip.nanmean().item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(gathered_high_clip).item())
        gathered_clip_ratio = self.accelerator.gather(is_region_clipped.float())
        self._metrics[mode]["clip_ratio/region_mean"].append(gathered_clip_ratio.nanmean().item())
        # CFPO: cfpo/ratio_dev, cfpo/ratio_max, cfpo/ratio_min and (cfpo only) cfpo/penalty, one value per sequence as
        # TRL's clip_ratio/* above (a sequence with no valid token has r = 1 and counts, as in TRL's mean).
        ratio = coef_1.detach()[:, None]
        log_ratio_metrics(self, mode, ratio, advantages[:, None], torch.ones_like(ratio, dtype=torch.bool))
        return loss
