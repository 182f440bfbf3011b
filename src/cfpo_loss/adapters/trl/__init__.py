"""TRL adapter: ``CFPOTrainer`` / ``CFPOConfig``, a one-line drop-in for TRL's ``GRPOTrainer`` / ``GRPOConfig``, and
``CFPORLOOTrainer`` / ``CFPORLOOConfig`` for ``RLOOTrainer`` / ``RLOOConfig``.

    from cfpo_loss.adapters.trl import CFPOTrainer, CFPOConfig
    trainer = CFPOTrainer(model=..., reward_funcs=..., args=CFPOConfig(..., policy_objective="cfpo"))

``policy_objective`` is ``"cfpo"`` (default; the clipping-free quadratic objective) or ``"clip"`` (the
PPO/GRPO clipped objective, reproducing TRL's own loss). ``epsilon`` / ``epsilon_high`` are eps_low /
eps_high for both objectives. ``loss_type`` keeps choosing the *aggregation* exactly as in TRL ("grpo",
"bnpo", "dr_grpo", "dapo", "luspo"); TRL's loss types that are other objectives ("cispo", "sapo",
"vespo") are rejected at construction. A plain ``GRPOConfig`` is accepted too (objective "cfpo" then).
``CFPORLOOTrainer`` is the same swap on RLOO's own sequence ratio and mean over sequences (a plain ``RLOOConfig``
is accepted too); ``CFPORLOOConfig(sequence_ratio="mean")`` opts into GSPO's length-normalised ratio, which cfpo needs
beyond a few tokens (a UserWarning at construction says so). CFPO only differs from GRPO / RLOO when the ratio
departs from 1: ``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps`` (or off-policy data).

How it hooks into TRL, module by module
---------------------------------------
TRL 1.16.0 computes each loss in one monolithic method, ``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss``,
with the objective built inline between the log-prob / ratio code above it and the aggregation / metrics code below
it: there is no smaller hook. Each trainer's ``_compute_loss`` is therefore a copy of TRL's text in which only the
objective changes (every departure marked ``# CFPO:``):

    _guard.py         import guard: TRL's version in SUPPORTED_TRL and both mirrored methods' sha256 (runs first)
    _grpo_mirror.py   GRPOTrainer._compute_loss, mirrored (alone in its module)   = mirror/GRPOTrainer._compute_loss.txt
    _rloo_mirror.py   RLOOTrainer._compute_loss, mirrored (alone in its module)   + mirror/<Class>._compute_loss.patch
    _grpo.py          CFPOTrainer: the core's objective, TRL's metric lines shared with the fused path
    _rloo.py          CFPORLOOTrainer: the core's objective on RLOO's sequence ratio
    _fused.py         use_fused_loss=True: LM head + objective + aggregation in one chunked pass of the core
    _metrics.py       the cfpo/* statistics both trainers log (the core's ratio_sums, reduced over ranks)
    _config.py        CFPOConfig / CFPORLOOConfig and the checks both trainers run, by name, before loading a model
    mirror/           the exact TRL texts mirrored, and the patch from each to our copy

``mirror/<Class>._compute_loss.patch`` is the unified diff from TRL's text to our method; a test holds TRL's text plus
that patch to the method (tests/trl/test_trl_check.py), so a reviewer sees our lines at a glance and a TRL bump is
"re-apply the patch". The tests (tests/trl) prove that with ``policy_objective="clip"`` loss, gradients and metrics
equal TRL's own methods (RLOO: a real ``train()`` bit for bit) and that cfpo is the paper's equation.

Version guard (``_guard.py``): importing this package checks that TRL's version lies in ``SUPPORTED_TRL`` and that the
sources of both mirrored methods hash to the texts copied, and raises ``ImportError`` otherwise (one guard for the
package: a changed RLOO method also stops ``CFPOTrainer``'s import). ``CFPO_LOSS_ALLOW_UNSUPPORTED_TRL=1`` turns that
error into a warning, at your own risk.

Bumping TRL (re-apply the patch, not a re-copy)
-----------------------------------------------
1. ``python -m cfpo_loss.adapters.trl_check --source path/to/new/trl`` (the unpacked wheel's ``trl/`` folder, or one of
   its ``trainer/grpo_trainer.py`` / ``rloo_trainer.py``; with the new trl installed, no argument) says MATCH or
   DIFFERS per method and prints the unified diff from the mirrored text to the new one. MATCH for both: only the
   version range (step 4) and the tests (step 5) are left.
2. ``python -m cfpo_loss.adapters.trl_check --source path/to/new/trl --apply`` prints, per method, the new TRL text with
   our patch applied (each hunk found by its lines, as ``patch`` does, without fuzz), or names the hunk that no longer
   applies. Put that text in ``_grpo_mirror.py`` / ``_rloo_mirror.py`` (a failing hunk: merge it by hand, keeping its
   ``# CFPO:`` lines); a GRPO hunk inside the removed ``loss_type`` switch or metrics block goes to
   ``CFPOTrainer._policy_objective`` / ``_log_trust_region_metrics`` / ``_metric_reducers``; one touching what the
   fused path mirrors (normalisers, metrics) goes to ``_fused.py`` too. Update the TRL line numbers quoted.
3. With the new trl installed: ``python -m cfpo_loss.adapters.trl_check --update`` stores both texts and both patches
   (re-derived from the code) and prints the new sha256 values: set them in ``_guard.MIRRORED_SHA256``, and
   ``MIRRORED_TRL_VERSION`` in ``trl_check.py``.
4. ``adapters/_support.py``: the ``trl`` rows of ``SUPPORTED`` and ``TESTED`` (``noxfile.py`` reads its pin from
   ``TESTED``); the ``trl`` extra in ``pyproject.toml``.
5. ``nox -s trl``: the conformance tests decide; ``tests/trl/test_trl_check.py`` runs the check itself.
"""

from __future__ import annotations

try:
    import trl  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("cfpo_loss.adapters.trl needs TRL: pip install 'cfpo-loss[trl]' (trl==1.16.0)") from exc

from ._guard import SUPPORTED_TRL, check_trl_version

check_trl_version()  # before any module that copies TRL's methods is imported

from ._config import (  # noqa: E402
    AGGREGATION_LOSS_TYPES,
    POLICY_OBJECTIVES,
    SEQUENCE_RATIOS,
    SUM_RATIO_MAX_LENGTH,
    CFPOConfig,
    CFPORLOOConfig,
)
from ._grpo import CFPOTrainer  # noqa: E402
from ._rloo import CFPORLOOTrainer  # noqa: E402

__all__ = [
    "CFPOConfig",
    "CFPOTrainer",
    "CFPORLOOConfig",
    "CFPORLOOTrainer",
    "SUPPORTED_TRL",
    "AGGREGATION_LOSS_TYPES",
    "POLICY_OBJECTIVES",
    "SEQUENCE_RATIOS",
    "SUM_RATIO_MAX_LENGTH",
]
