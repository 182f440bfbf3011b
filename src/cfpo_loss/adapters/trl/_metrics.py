"""The statistics both trainers add to TRL's logs: ``cfpo/ratio_dev``, ``cfpo/ratio_max``, ``cfpo/ratio_min`` and, for
an objective with a penalty (cfpo), ``cfpo/penalty`` (keys from the adapters' one metric table), from the core's
``ratio_sums``, reduced over every rank."""

from __future__ import annotations

import math

import torch

from ...metrics import ratio_sums
from .._metric_names import framework_keys

#: core metric -> TRL key (the cfpo/* ones are logged here; clip_ratio/* by TRL's own lines)
TRL_KEYS = framework_keys("trl")


def log_ratio_metrics(trainer, mode, ratio, advantages, valid) -> None:
    """Mean |r - 1|, max and min r and (cfpo) mean |A| / (2 eps) * (r - 1)^2 over the ``valid`` entries of ``ratio`` on
    every rank, into ``trainer._metrics[mode]``. ``ratio`` (detached), ``advantages`` and ``valid`` broadcast together:
    (B, T) per token, or (B, 1) per sequence (then the statistics are per sequence, as TRL's clip_ratio/* are).
    Shared by CFPOTrainer (both paths) and CFPORLOOTrainer.

    All of them in ONE collective and ONE device sync (TRL's own clip_ratio block costs five of each; this one is what
    the adapters add to TRL's step)."""
    ratio = torch.where(valid, ratio, 1.0)  # neutral where not valid, as the core's sums take it
    penalty = None
    if trainer._objective.has_penalty:
        penalty = trainer._objective_terms(ratio, torch.where(valid, advantages.detach(), 0.0)).penalty
    sums = ratio_sums(ratio, valid, penalty=penalty)
    local = [sums.abs_deviation, sums.count, sums.ratio_max, -sums.ratio_min]
    if penalty is not None:
        local.append(sums.penalty)
    per_rank = trainer.accelerator.gather(torch.stack(local).float()[None]).reshape(-1, len(local)).tolist()
    totals = [sum(column) for column in zip(*per_rank)]
    count = max(totals[1], 1.0)
    top, neg_bottom = (max(column) for column in list(zip(*per_rank))[2:4])  # -inf where no rank had a valid entry
    metrics = trainer._metrics[mode]
    metrics[TRL_KEYS["ratio_dev"]].append(totals[0] / count)
    metrics[TRL_KEYS["ratio_max"]].append(top if top > -math.inf else math.nan)
    # the min shows ratios collapsing towards 0 on negative-advantage tokens, which the max cannot
    metrics[TRL_KEYS["ratio_min"]].append(-neg_bottom if neg_bottom > -math.inf else math.nan)
    if penalty is not None:
        metrics[TRL_KEYS["penalty"]].append(totals[4] / count)
