"""One table of metric names: each core metric (``cfpo_loss.metrics``), what it means, and the key under which each
framework's adapter logs it. Every adapter takes its renaming from ``framework_keys``; ``markdown_table`` renders
the table for the docs. Framework-free (the core session tests it).

A key is the framework's own name for the statistic where the framework has one (verl ``actor/pg_clipfrac`` is
``tr_exit_frac`` for clip, and the same statistic for cfpo, so runs compare in one dashboard), else the name the
adapter adds (TRL ``cfpo/ratio_dev``); None where the adapter logs no such key. Beyond the table, verl logs every
core metric as ``actor/cfpo/<core name>`` (``EVERY_CORE_METRIC``) and OpenRLHF's patched ``PolicyLoss`` keeps them
all on ``loss_fn.cfpo_metrics``; SkyRL's adapter logs each as ``cfpo/<core name>`` (also ``EVERY_CORE_METRIC``).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["FRAMEWORKS", "METRIC_NAMES", "EVERY_CORE_METRIC", "NOTES", "MetricName", "framework_keys", "markdown_table"]

FRAMEWORKS = ("trl", "verl", "openrlhf", "skyrl", "areal")


class MetricName(NamedTuple):
    core: str  # the core's name (cfpo_loss.metrics.metric_names)
    meaning: str  # one line: what it is, over the valid tokens (or sequences, see NOTES)
    trl: str | None = None  # CFPOTrainer / CFPORLOOTrainer's key in trainer logs
    verl: str | None = None  # the key in the metrics dict the verl loss returns
    openrlhf: str | None = None  # the name of PolicyLoss.forward's return value that carries it
    skyrl: str | None = None  # the key in the metrics dict the SkyRL loss returns (its worker adds loss_metrics/)
    areal: str | None = None  # the stat AReaL's grpo_loss_fn logs from policy_loss_fn's stat dict


#: in the core's buffer order (metrics.metric_names(dual_clip=True, penalty=True)); a test holds the two together
METRIC_NAMES: tuple[MetricName, ...] = (
    MetricName("ratio_mean", "mean r", areal="importance_weight/avg"),
    MetricName("ratio_min", "min r", trl="cfpo/ratio_min", areal="importance_weight/min"),
    MetricName("ratio_max", "max r", trl="cfpo/ratio_max", areal="importance_weight/max"),
    MetricName("ratio_dev", "mean |r − 1|", trl="cfpo/ratio_dev"),
    MetricName("tr_exit_frac", "fraction with A > 0 and r > 1 + ε_high, or A < 0 and r < 1 − ε_low (for clip: the clip "
               "fraction)", trl="clip_ratio/region_mean", verl="actor/pg_clipfrac", openrlhf="clip_ratio",
               skyrl="clip_ratio", areal="clip_ratio/avg"),
    MetricName("tr_exit_low", "fraction with A < 0 and r < 1 − ε_low", trl="clip_ratio/low_mean"),
    MetricName("tr_exit_high", "fraction with A > 0 and r > 1 + ε_high", trl="clip_ratio/high_mean"),
    MetricName("approx_kl_k1", "mean(log π_old − log π_θ), the log-ratio clamped to ±20", verl="actor/ppo_kl"),
    MetricName("approx_kl_k3", "mean(r − 1 − log r)"),
    MetricName("dual_clip_frac", "fraction with A < 0 and r > dual_clip (clip with a dual clip only)",
               verl="actor/pg_clipfrac_lower", areal="dual_clip_ratio/avg"),
    MetricName("penalty", "mean |A| / (2ε) · (r − 1)² (cfpo only)", trl="cfpo/penalty"),
)  # fmt: skip

#: framework -> the prefix under which its adapter also logs every core metric, by its core name
EVERY_CORE_METRIC = {"verl": "actor/cfpo/", "skyrl": "cfpo/"}

#: what the table alone does not say, one line each (rendered below it)
NOTES = (
    'TRL: per sequence where TRL\'s ratio is (`CFPORLOOTrainer`, `importance_sampling_level="sequence"`), and reduced '
    "over every rank; `clip_ratio/low_min` and `clip_ratio/high_max` are TRL's own per-sequence extremes, no core "
    "metric.",
    "verl: every core metric also as `actor/cfpo/<core name>`; `actor/pg_clipfrac_lower` is 0.0 where the objective "
    "has no dual clip (cfpo), as verl's own `gspo` reports.",
    "OpenRLHF: `clip_ratio` is `PolicyLoss.forward`'s second return value; every core metric of the last call is on "
    "`loss_fn.cfpo_metrics`. Its `ppo_kl` is OpenRLHF's own masked mean of log π_old − log π_θ (no clamp), computed "
    "as OpenRLHF does, not `approx_kl_k1`.",
    "SkyRL: logged as `loss_metrics/<key>`; every core metric also as `loss_metrics/cfpo/<core name>`, over the "
    "tokens of `loss_mask` before the off-policy rejection (as SkyRL's `clip_ratio`); SkyRL's own off-policy "
    "metrics (`is_ratio_mean`, ...) unchanged.",
    "AReaL: logged under `ppo_actor/update/`, per token, over the valid tokens before rejection sampling (a rejected "
    "token counts with `importance_weight` 0, as in AReaL's own loss); `dual_clip_ratio` is 0 for cfpo. AReaL's own "
    "`approx_kl` is log π_θ − log π_prox, the opposite sign of `approx_kl_k1`.",
)


def framework_keys(framework: str) -> dict[str, str]:
    """{core name: the framework's key} for the core metrics ``framework`` has a key for, in the table's order."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; valid: {', '.join(map(repr, FRAMEWORKS))}")
    return {row.core: getattr(row, framework) for row in METRIC_NAMES if getattr(row, framework) is not None}


def markdown_table() -> str:
    """The table as Markdown (with ``NOTES`` below it), for the docs."""
    lines = ["| core metric | meaning | TRL | verl | OpenRLHF | SkyRL | AReaL |", "|---|---|---|---|---|---|---|"]
    for row in METRIC_NAMES:
        keys = (f"`{getattr(row, fw)}`" if getattr(row, fw) is not None else "—" for fw in FRAMEWORKS)
        meaning = row.meaning.replace("|", "\\|")  # a bare | would end the cell
        lines.append(f"| `{row.core}` | {meaning} | " + " | ".join(keys) + " |")
    return "\n".join(lines) + "\n\n" + "".join(f"- {note}\n" for note in NOTES)
