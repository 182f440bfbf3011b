"""TRL adapter: ``CFPOTrainer`` / ``CFPOConfig``, a one-line drop-in for TRL's ``GRPOTrainer`` / ``GRPOConfig``.

    from cfpo_loss.adapters.trl import CFPOTrainer, CFPOConfig
    trainer = CFPOTrainer(model=..., reward_funcs=..., args=CFPOConfig(..., policy_objective="cfpo"))

``policy_objective`` is ``"cfpo"`` (default; the clipping-free quadratic objective) or ``"clip"`` (the
PPO/GRPO clipped objective, reproducing TRL's own loss). ``epsilon`` / ``epsilon_high`` are eps_low /
eps_high for both objectives. ``loss_type`` keeps choosing the *aggregation* exactly as in TRL ("grpo",
"bnpo", "dr_grpo", "dapo", "luspo"); TRL's loss types that are other objectives ("cispo", "sapo",
"vespo") are rejected at construction. A plain ``GRPOConfig`` is accepted too (objective "cfpo" then).

``CFPORLOOTrainer`` / ``CFPORLOOConfig`` are the same swap for TRL's ``RLOOTrainer`` / ``RLOOConfig``
(``policy_objective`` "cfpo" or "clip", the same ``epsilon`` / ``epsilon_high``; RLOO's own sequence ratio and
mean over sequences; see "RLOOTrainer" below). A plain ``RLOOConfig`` is accepted too (objective "cfpo" then).

Supported TRL: ``SUPPORTED_TRL`` (1.16.x). CFPO only differs from GRPO / RLOO when the ratio departs from 1:
``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps`` (or off-policy data).

How it hooks into TRL, and which TRL lines it mirrors
-----------------------------------------------------
TRL 1.16.0 computes the GRPO loss in one monolithic method, ``GRPOTrainer._compute_loss(model, inputs)``
(``trl/trainer/grpo_trainer.py``, lines 3020-3290 of trl==1.16.0). The objective is built inline from
``coef_1`` / ``coef_2`` with ``torch.clamp`` / ``torch.min`` (lines 3109-3138), between the log-prob /
ratio / KL code above it and the masks / aggregation / entropy / metrics code below it, so there is no
smaller hook to override. ``CFPOTrainer._compute_loss`` is therefore a copy of that method in which:

* lines 3109-3138 (the ``loss_type`` switch that builds ``per_token_loss``) are replaced by
  ``per_token_loss = -J(coef_1, advantages)``, with J the core's ``cfpo_surrogate`` or
  ``clipped_surrogate`` (TRL's two-sided-clipping ``delta`` is the core's ``dual_clip``; equal to TRL's
  clamp of ``coef_1`` whenever ``delta > 1 + epsilon_high``, which is enforced);
* TRL's two metric closures (lines 3254-3265) and its ``clip_ratio/*`` block (lines 3272-3283) move, verbatim,
  into ``_metric_reducers`` / ``_log_trust_region_metrics`` (shared with the fused path), which also log
  ``cfpo/ratio_dev``, ``cfpo/ratio_max``, ``cfpo/ratio_min`` and (cfpo only) ``cfpo/penalty``; the cispo / vespo metric branches
  (lines 3284-3290) go with those loss types;
* the first line hands over to ``_compute_loss_fused`` when ``use_fused_loss=True`` (below).

Every other line is TRL's text verbatim, and every departure is marked ``# CFPO:``: log-probs and
entropies through TRL's own ``_get_per_token_logps_and_entropies`` (its chunked LM-head kernel), the
on-policy ``old_per_token_logps`` fallback, token / sequence importance sampling, KL to the reference
with its bias correction, top-entropy mask, off-policy sequence mask, vLLM importance-sampling
correction, the loss_type aggregations with gradient-accumulation and ``steps_per_generation``
normalisation, entropy bonus (static and adaptive), MoE aux loss, eval mode, and all of TRL's metrics.
``clip_ratio/low_mean``, ``high_mean``, ``region_mean``, ``low_min``, ``high_max`` keep TRL's meaning for
both objectives (fraction of tokens whose ratio left the trust region in the direction the advantage
pushes): for CFPO nothing is clipped, but the statistic is the same one, so runs compare in one dashboard.
The tests (tests/trl) prove that with ``policy_objective="clip"`` loss and parameter gradients equal
TRL's own ``GRPOTrainer._compute_loss``.

``use_fused_loss=True`` (opt-in) replaces TRL's log-prob kernel + objective + aggregation by one chunked pass of
the core (``cfpo_loss.fused_linear_policy_loss``: LM head, log-probs, objective, KL and aggregation, gradients
computed in the forward, never the logits): ``_compute_loss_fused`` maps ``loss_type`` to the core's aggregation
with TRL's normalisers (lines 3153-3182), calls the (wrapped) model, whose forward ``_add_fused_policy_loss`` patches
to run the backbone and the fused pass when given ``cfpo_fused_loss=...`` (TRL's own ``add_fused_lm_head`` pattern,
so DDP's reducer and FSDP2's reduce-scatter synchronise the gradients), and logs the same metrics. It supports a subset
of TRL's options (one process, DDP or FSDP2; no FSDP1 / DeepSpeed / tensor parallelism, no PEFT / MoE aux loss /
logit softcapping or scaling / multimodal inputs, no entropy bonus, entropy mask, off-policy mask or vLLM IS
correction, and KL only with ``use_bias_correction_kl=False``), and refuses the rest by name at construction (an
FSDP2 layout with the LM head in a unit of its own, on the first step). Tests: same loss and gradients as
the unfused path (fp32 within 1e-5) and, in clip mode, as TRL's GRPOTrainer; under 2-process DDP the same trajectory
as the unfused path and identical parameters on both ranks; under 2-process FSDP2 (accelerate's unit layout, applied
by hand) the same gradients as an unsharded copy reduced by hand (tests/trl/test_distributed.py).

RLOOTrainer
-----------
TRL 1.16.0's ``RLOOTrainer`` (``trl/trainer/rloo_trainer.py``) subclasses ``_BaseTrainer``, not ``GRPOTrainer``, and
has its own ``_compute_loss`` (lines 1794-1863): per-token log-probs through the same kernel, ONE ratio per sequence,
r = exp(Σ_t m_t log π_θ − old_logps) with ``old_logps`` the rollout policy's Σ_t m_t log π_old (the sum, not GSPO's
length-normalised mean; ``_generate_and_score_completions`` always computes it), the clipped objective on r, and the
plain mean over sequences; KL to the reference (``beta``) is subtracted from the *reward* before the leave-one-out
advantages, so it never reaches the loss. ``CFPORLOOTrainer._compute_loss`` copies that method with three departures,
each marked ``# CFPO:`` and stored as ``trl_mirror/RLOOTrainer._compute_loss.patch`` (a test holds the patch to the
code): a docstring; lines 1829-1832 (``coef_2`` and the ``-torch.min``) replaced by ``-J(coef_1, advantages)`` with J
the core's objective record (``cfpo_terms`` / ``clipped_terms``, which also give ``cfpo_surrogate`` /
``clipped_surrogate`` their values: the core takes the ratio as given, so no new entry point was needed); and, after
TRL's ``clip_ratio/*`` block (verbatim, per sequence), ``cfpo/ratio_dev``, ``cfpo/ratio_max``, ``cfpo/ratio_min`` and
(cfpo only) ``cfpo/penalty`` per sequence, through the same ``_log_ratio_metrics`` as ``CFPOTrainer``. The tests
(tests/trl/test_rloo.py) prove that with ``policy_objective="clip"`` a real ``train()`` gives ``RLOOTrainer``'s logged
trajectory and parameters bit for bit, and that cfpo is the paper's equation on that ratio (loss, gradient, metrics).
RLOOConfig has no loss-type, two-sided-clip or importance-sampling switch; ``epsilon >= 1`` and ``epsilon_high = inf``
(which RLOOTrainer reads as "no lower / upper clip") have no CFPO meaning and are refused by name.

Version guard: importing this module checks that TRL's version lies in ``SUPPORTED_TRL`` *and* that the
sources of ``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss`` hash to ``_MIRRORED_SHA256`` /
``_RLOO_MIRRORED_SHA256`` (the texts these copies mirror), and raises ``ImportError`` otherwise: a silently changed
TRL loss would otherwise be replaced by a stale copy. (One guard for the module: a changed RLOO method also stops
``CFPOTrainer``'s import, unless the variable below is set.)
Set ``CFPO_LOSS_ALLOW_UNSUPPORTED_TRL=1`` to turn that error into a warning, at your own risk.
Only versions whose ``GRPOTrainer`` can be tested here are supported: TRL 1.15.0's ``_compute_loss`` is the
same text, but its trainer cannot run on a CPU (its chunked log-prob kernel is ``None`` without Triton), so
no test could hold it to TRL's own loss.

Bumping TRL (a reviewed diff, not a re-copy)
--------------------------------------------
The exact TRL texts mirrored here are stored in ``trl_mirror/GRPOTrainer._compute_loss.txt`` and
``trl_mirror/RLOOTrainer._compute_loss.txt`` (their sha256 are ``_MIRRORED_SHA256`` / ``_RLOO_MIRRORED_SHA256``; a
test holds them together). For a new TRL release:

1. ``python -m cfpo_loss.adapters.trl_check --source path/to/new/trl`` (the unpacked wheel's ``trl/`` folder, or one
   of its ``trainer/grpo_trainer.py`` / ``rloo_trainer.py``; with the new trl installed, no argument) says MATCH or
   DIFFERS per method and prints the unified diff from the mirrored text to the new one. MATCH for both: only the
   version range (step 4) and the tests (step 5) are left.
2. Apply each diff, hunk by hunk, to ``CFPOTrainer._compute_loss`` / ``CFPORLOOTrainer._compute_loss`` below,
   keeping every ``# CFPO:`` departure; a GRPO hunk inside the replaced ``loss_type`` switch or the metrics block
   goes to ``_policy_objective`` / ``_log_trust_region_metrics`` / ``_metric_reducers``; a hunk touching what the
   fused path mirrors (normalisers, metrics) goes to ``_compute_loss_fused`` too. Update the TRL line numbers
   quoted above.
3. With the new trl installed: ``python -m cfpo_loss.adapters.trl_check --update`` stores both texts, rewrites the
   RLOO departures patch from this file, and prints the new sha256 values: set ``_MIRRORED_SHA256`` /
   ``_RLOO_MIRRORED_SHA256`` to them and ``MIRRORED_TRL_VERSION`` in ``trl_check.py``.
4. ``adapters/_support.py``: the ``trl`` rows of ``SUPPORTED`` and ``TESTED``; the ``trl`` extra in
   ``pyproject.toml`` and ``TRL`` in ``noxfile.py``.
5. ``nox -s trl``: the conformance tests (clip mode == TRL's own ``GRPOTrainer._compute_loss``, loss and
   gradients, every loss_type; clip mode == ``RLOOTrainer``'s trajectory) decide; ``tests/trl/test_trl_check.py``
   runs the check itself.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
import types
import warnings
from dataclasses import dataclass, field

import torch

try:  # FSDP2's sharded parameters (torch builds without torch.distributed have none)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

try:
    import trl
    from packaging.version import InvalidVersion, Version
    from accelerate.utils import is_peft_model
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "cfpo_loss.adapters.trl needs TRL: pip install 'cfpo-loss[trl]' (trl==1.16.0)"
    ) from exc

from cfpo_loss.adapters._support import SUPPORTED as _SUPPORTED
from cfpo_loss.fused import fused_linear_policy_loss
from cfpo_loss.surrogates import OBJECTIVES, get_objective

__all__ = ["CFPOConfig", "CFPOTrainer", "CFPORLOOConfig", "CFPORLOOTrainer", "SUPPORTED_TRL", "AGGREGATION_LOSS_TYPES",
           "POLICY_OBJECTIVES"]

#: TRL versions this adapter is written and tested against (half-open range; one table for all adapters).
SUPPORTED_TRL = (f">={_SUPPORTED['trl'][0]}", f"<{_SUPPORTED['trl'][1]}")
#: sha256 of ``inspect.getsource(trl.GRPOTrainer._compute_loss)`` in trl==1.16.0, the text mirrored below.
_MIRRORED_SHA256 = "80295546bbdbf6f711acce7f6e69b0100ab40aa8f23ed8052cc564ff024e3e40"
#: sha256 of ``inspect.getsource(trl.RLOOTrainer._compute_loss)`` in trl==1.16.0, the text CFPORLOOTrainer mirrors.
_RLOO_MIRRORED_SHA256 = "c1f9fa0cd5a6948ce73ab66dc76896449797e22531d5237606c3f66963b29311"
_ALLOW_ENV = "CFPO_LOSS_ALLOW_UNSUPPORTED_TRL"

#: TRL loss types that only choose the aggregation of the clipped objective (usable with either objective).
AGGREGATION_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: TRL loss types that are a different policy objective (not an aggregation): rejected.
_OTHER_OBJECTIVE_LOSS_TYPES = ("cispo", "sapo", "vespo")
POLICY_OBJECTIVES = tuple(OBJECTIVES)  # the core's registry: "cfpo", "clip"
# inputs the fused path cannot take (vision-language models) and config logit transforms it does not apply
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_tiles", "num_images")
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
# use_fused_loss=True under several processes: accelerate's distributed types that wrap the model in plain DDP
# (tested on CPU with gloo, tests/trl/test_distributed.py), and FSDP2; every other one is refused at construction.
_DDP_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
              "MULTI_HPU", "MULTI_NEURON")
_FSDP1_REASON = ("FSDP1 flattens parameters into FlatParameters and is not tested with the fused pass; FSDP2, "
                 "fsdp_config={'version': 2} (TrainingArguments' default), is")
_DEEPSPEED_REASON = ("ZeRO-3 partitions the LM head to numel 0 outside its module's forward, so the fused pass "
                     "would read an empty weight unless gathered (TRL's maybe_gather_lm_head_ctx); DeepSpeed is not "
                     "installable in the test environment, so no ZeRO stage is tested with the fused pass")


def _check_trl_version() -> None:
    problems = []
    try:
        v = Version(trl.__version__)
        lo, hi = Version(SUPPORTED_TRL[0][2:]), Version(SUPPORTED_TRL[1][1:])
        if not lo <= v < hi:
            problems.append(f"trl=={trl.__version__} is outside the supported range {','.join(SUPPORTED_TRL)}")
    except InvalidVersion:
        problems.append(f"trl version {trl.__version__!r} cannot be parsed")
    # each mirrored TRL method, the sha256 of the text copied here, and the class that copies it
    for trl_cls, pinned, ours in ((GRPOTrainer, _MIRRORED_SHA256, "CFPOTrainer"),
                                  (RLOOTrainer, _RLOO_MIRRORED_SHA256, "CFPORLOOTrainer")):
        method = f"{trl_cls.__name__}._compute_loss"
        try:
            src = inspect.getsource(trl_cls._compute_loss)
        except (OSError, TypeError):  # no source shipped (zipapp, frozen): fall back to the version check alone
            src = None
            warnings.warn(
                f"cfpo_loss.adapters.trl: cannot read the source of trl.{method} to check that it is the version "
                f"mirrored by {ours}; relying on the version check only.",
                RuntimeWarning,
                stacklevel=3,
            )
        if src is not None and hashlib.sha256(src.encode()).hexdigest() != pinned:
            problems.append(f"trl.{method} differs from the trl==1.16.0 text that {ours}._compute_loss mirrors")
    if not problems:
        return
    msg = (
        "cfpo_loss.adapters.trl: " + "; ".join(problems) + ". CFPOTrainer and CFPORLOOTrainer copy TRL's loss methods "
        "with only the objective swapped, so on another TRL they could silently compute a wrong loss. Install trl"
        f"{','.join(SUPPORTED_TRL)} (pip install 'cfpo-loss[trl]'), or set {_ALLOW_ENV}=1 to proceed anyway at "
        "your own risk. `python -m cfpo_loss.adapters.trl_check` shows how the installed TRL's methods differ."
    )
    if os.environ.get(_ALLOW_ENV, "") not in ("", "0"):
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        raise ImportError(msg)


_check_trl_version()


def _validate(args, policy_objective, use_fused_loss) -> None:
    """Raise a clear error for a configuration CFPOTrainer cannot honour. Runs for CFPOConfig and GRPOConfig."""
    if not isinstance(policy_objective, str) or policy_objective not in POLICY_OBJECTIVES:
        raise ValueError(f"policy_objective must be one of {POLICY_OBJECTIVES}, got {policy_objective!r}")
    if not isinstance(use_fused_loss, bool):
        raise TypeError(f"use_fused_loss must be a bool, got {type(use_fused_loss).__name__} {use_fused_loss!r}")
    if use_fused_loss:
        _validate_fused(args)
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
    eps_high = _validate_epsilons(args)
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


def _validate_epsilons(args) -> float:
    """``epsilon`` / ``epsilon_high`` (GRPOConfig and RLOOConfig alike) as eps_low / eps_high; returns eps_high."""
    eps_low = args.epsilon
    if isinstance(eps_low, bool) or not isinstance(eps_low, (int, float)) or not 0.0 < eps_low < 1.0:
        raise ValueError(f"epsilon (eps_low) must be a float in (0, 1), got {eps_low!r}")
    eps_high = eps_low if args.epsilon_high is None else args.epsilon_high
    if isinstance(eps_high, bool) or not isinstance(eps_high, (int, float)) or not (0.0 < eps_high < math.inf):
        raise ValueError(f"epsilon_high (eps_high) must be a finite float > 0, got {args.epsilon_high!r}")
    return eps_high


def _validate_fused(args) -> None:
    """use_fused_loss=True runs LM head + objective + aggregation in one chunked pass (cfpo_loss.fused), so it can
    only honour the parts of TRL's loss that act on that pass's inputs. Everything else is refused, by name."""
    refused = []
    if args.beta != 0.0 and args.use_bias_correction_kl:
        refused.append("beta > 0 with use_bias_correction_kl=True (the fused pass adds the plain k3 KL; set "
                       "use_bias_correction_kl=False)")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        refused.append("an entropy bonus (entropy_coef / use_adaptive_entropy: needs the entropy's gradient)")
    if args.top_entropy_quantile < 1.0:
        refused.append("top_entropy_quantile < 1 (needs the entropies before the loss)")
    if args.off_policy_mask_threshold is not None:
        refused.append("off_policy_mask_threshold (needs the log-probs before the loss)")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        refused.append("vLLM importance-sampling correction (not tested with the fused pass)")
    # Multi-process: DDP (accelerate's MULTI_CPU / MULTI_GPU / ...) and FSDP2 are supported and tested (the fused pass
    # runs inside the wrapped model's forward, so DDP's reducer / FSDP2's reduce-scatter see it). FSDP1, DeepSpeed and
    # tensor parallelism are refused here, by the arguments that ask for them, and again after construction by
    # accelerate's distributed type.
    fsdp_version = _requested_fsdp_version(args)
    if fsdp_version is not None and fsdp_version != 2:
        refused.append(f"FSDP version {fsdp_version} ({_FSDP1_REASON})")
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        refused.append(f"DeepSpeed ({_DEEPSPEED_REASON})")
    pc = getattr(args, "parallelism_config", None)
    if pc is not None and any(getattr(pc, f"{k}_size", 1) > 1 for k in ("tp", "cp", "sp", "dp_shard")):
        refused.append("parallelism_config with tensor / context / sequence parallelism or dp_shard_size > 1 "
                       "(the LM head or the sequence is split across processes; untested with the fused pass)")
    if refused:
        raise ValueError("use_fused_loss=True does not support " + "; ".join(refused) + ". Use use_fused_loss=False "
                         "(TRL's own chunked log-prob kernel with the same objective) for these options.")


def _requested_fsdp_version(args) -> int | None:
    """The FSDP version the arguments (or `accelerate launch`'s environment) ask for; None without FSDP."""
    if args.fsdp:  # TrainingArguments: fsdp_config's "version", default 2 (transformers' _process_fsdp_args)
        return int((args.fsdp_config or {}).get("version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's FullyShardedDataParallelPlugin default
    return None


def _add_fused_policy_loss(model) -> None:
    """Patch ``model.forward`` (TRL's, itself patched by ``add_fused_lm_head``) to accept ``cfpo_fused_loss=spec``:
    then the forward runs the backbone and ``fused_linear_policy_loss`` and returns a dict of tensors (``loss``,
    ``ratio``, ``metrics``) instead of logits. Without that keyword the forward is the one it wraps (generation and
    TRL's log-prob calls are unchanged).

    Why inside the forward: the trainer calls the *wrapped* model (``DistributedDataParallel``), whose forward prepares
    the reducer for the backward (and, with ``find_unused_parameters=True``, walks the graph from the returned tensors;
    with ``static_graph=True`` hooks its first backward on them). Calling the backbone and reading the LM head outside
    that forward, as a single-process fused pass may, leaves DDP's gradient hooks disarmed: each rank would step on its
    own gradient with no error. This is TRL's own pattern (``trl.trainer.utils.add_fused_lm_head``): the fused pass
    computes the LM head's gradient in its forward and hands it back in backward, where it accumulates into the
    parameter's ``.grad`` like any other, so the reducer all-reduces it with the rest. Under FSDP2 the same call runs
    inside the root unit's forward, after the backbone has unsharded the [final norm, LM head] unit (accelerate's
    layout), so the head is a plain tensor whose gradient that unit reduce-scatters in backward."""
    inner_forward = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates its kwargs against it
    def _cfpo_forward(self, *args, cfpo_fused_loss=None, **kwargs):
        if cfpo_fused_loss is None:
            return inner_forward(*args, **kwargs)
        spec = dict(cfpo_fused_loss)
        logits_to_keep = spec.pop("logits_to_keep")
        cast_lm_head_to_fp32 = spec.pop("cast_lm_head_to_fp32")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        # Read the head only now: under FSDP2 as accelerate lays it out, the LM head shares a unit with the final
        # norm (reshard_after_forward=False), so the backbone's forward has just unsharded it into a plain tensor,
        # whose gradient FSDP2 reduce-scatters in backward. Still a DTensor means a unit of its own that never ran.
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):
            raise RuntimeError(
                "use_fused_loss=True under FSDP2: the LM head weight is still sharded (a DTensor) after the "
                "backbone's forward, so FSDP2 wrapped the LM head in a unit of its own whose forward never runs. Shard "
                "it together with the final norm, as accelerate does (fully_shard([norm, lm_head], "
                "reshard_after_forward=False)), or leave it in the root unit."
            )
        device_type = weight.device.type
        # The LM head's precision, as TRL's kernel picks it: the autocast dtype when mixed precision is on (each
        # logits tile in that dtype, everything after it in fp32), else the weight's; fp32 with cast_lm_head_to_fp32.
        # The fused pass itself runs outside autocast, on explicitly cast inputs.
        autocast_on = torch.is_autocast_enabled(device_type)
        head_dtype = torch.get_autocast_dtype(device_type) if autocast_on else weight.dtype
        if cast_lm_head_to_fp32:
            head_dtype = torch.float32
        # the state at position t predicts token t + 1: the completion is scored by the states just before it
        hidden = hidden[:, -logits_to_keep - 1 : -1].to(head_dtype)
        with torch.autocast(device_type, enabled=False):
            out = fused_linear_policy_loss(
                hidden,
                weight.to(head_dtype),
                lm_head_bias=None if bias is None else bias.to(head_dtype),
                **spec,
            )
        # a dict of tensors, so DDP finds the loss (find_unused_parameters / static_graph) and accelerate's fp32
        # output conversion can walk it
        return {"loss": out.loss, "ratio": out.ratio, "metrics": dict(out.metrics)}

    model.forward = types.MethodType(_cfpo_forward, model)


def _log_ratio_metrics(trainer, mode, ratio, advantages, valid) -> None:
    """``cfpo/ratio_dev`` (mean |r - 1|), ``cfpo/ratio_max``, ``cfpo/ratio_min`` and, for an objective with a penalty
    (cfpo), ``cfpo/penalty`` (mean |A| / (2 eps) * (r - 1)^2, from the core's terms) over the ``valid`` entries of
    ``ratio`` on every rank, into ``trainer._metrics[mode]``. ``ratio`` (detached), ``advantages`` and ``valid``
    broadcast together: (B, T) per token, or (B, 1) per sequence. Shared by CFPOTrainer and CFPORLOOTrainer.

    All of them in ONE collective and ONE device sync (TRL's own clip_ratio block costs five of each; this one is what
    the adapters add to TRL's step)."""
    local = [torch.where(valid, (ratio - 1.0).abs(), 0.0).sum(), valid.sum(),
             torch.where(valid, ratio, -torch.inf).amax(), torch.where(valid, -ratio, -torch.inf).amax()]
    if trainer._objective.has_penalty:
        penalty = trainer._objective_terms(ratio, advantages.detach()).penalty
        local.append(torch.where(valid, penalty, 0.0).sum())
    per_rank = trainer.accelerator.gather(torch.stack(local).float()[None]).reshape(-1, len(local)).tolist()
    sums = [sum(col) for col in zip(*per_rank)]
    count = max(sums[1], 1.0)
    top, neg_bottom = (max(col) for col in list(zip(*per_rank))[2:4])  # -inf where no rank had a valid token
    metrics = trainer._metrics[mode]
    metrics["cfpo/ratio_dev"].append(sums[0] / count)
    metrics["cfpo/ratio_max"].append(top if top > -math.inf else math.nan)
    # the min shows ratios collapsing towards 0 on negative-advantage tokens, which the max cannot
    metrics["cfpo/ratio_min"].append(-neg_bottom if neg_bottom > -math.inf else math.nan)
    if trainer._objective.has_penalty:
        metrics["cfpo/penalty"].append(sums[4] / count)


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
        _validate(self, self.policy_objective, self.use_fused_loss)


class CFPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the policy objective taken from cfpo_loss (CFPO or clipped); everything else is TRL's.

    Accepts a ``CFPOConfig`` or a plain ``GRPOConfig`` (objective "cfpo" then). See the module docstring.
    """

    _tag_names = ["trl", "grpo", "cfpo"]
    _name = "CFPO"

    def __init__(self, model, reward_funcs=None, args=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = CFPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-CFPO")
        elif not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a CFPOConfig or GRPOConfig, got {type(args).__name__}")
        policy_objective = getattr(args, "policy_objective", "cfpo")
        _validate(args, policy_objective, getattr(args, "use_fused_loss", False))  # before loading any model
        self.policy_objective = policy_objective
        self._objective = get_objective(policy_objective)  # the core's record: terms, takes_dual_clip, has_penalty
        self.use_fused_loss = getattr(args, "use_fused_loss", False)
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        if self.use_fused_loss:
            self._check_fused_model()
            _add_fused_policy_loss(self.accelerator.unwrap_model(self.model))

    # ---- use_fused_loss=True --------------------------------------------------------------------------------

    def _check_fused_model(self) -> None:
        # what accelerate made of the arguments and the launcher's environment (FSDP1 / DeepSpeed / TP are refused
        # from the arguments already; this catches the rest, e.g. an accelerate config file's XLA or Megatron-LM)
        kind = self.accelerator.distributed_type
        fsdp_version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", None)
        if kind.name == "FSDP" and fsdp_version == 2:
            pass
        elif self.is_deepspeed_enabled or kind.name not in _DDP_TYPES:
            reason = {"FSDP": _FSDP1_REASON, "DEEPSPEED": _DEEPSPEED_REASON}.get(kind.name, "untested")
            raise ValueError(
                f"use_fused_loss=True runs under one process, DDP or FSDP2 only; accelerate's distributed type is "
                f"{kind.name} ({reason}). Use use_fused_loss=False (TRL's own chunked log-prob kernel, same objective)."
            )
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            raise ValueError("use_fused_loss=True does not support PEFT models yet; use use_fused_loss=False")
        if self.aux_loss_enabled:
            raise ValueError("use_fused_loss=True does not support the MoE router aux loss; use use_fused_loss=False")
        text_config = model.config.get_text_config()
        for attr in _LOGIT_TRANSFORMS:
            value = getattr(text_config, attr, None)
            if value is not None and value != 1.0:
                raise ValueError(
                    f"use_fused_loss=True: the model config sets {attr}={value!r}, a logit transform the fused pass "
                    "does not apply (it computes logits = hidden @ lm_head.weight.T / temperature); use "
                    "use_fused_loss=False"
                )
        if model.get_output_embeddings() is None or not hasattr(model, "base_model"):
            raise ValueError("use_fused_loss=True needs a causal LM with an output embedding and a base_model")

    def _compute_loss_fused(self, model, inputs):
        """The loss of `_compute_loss` in one chunked pass: backbone hidden states -> fused_linear_policy_loss
        (LM head, log-probs, objective, KL, aggregation; never the (tokens x vocabulary) logits), then TRL's
        normalisation and metrics. Same inputs, loss and gradients as the unfused path (checked in the tests)."""
        extra = sorted(k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None)
        if extra:
            raise ValueError(f"use_fused_loss=True does not support multimodal inputs ({', '.join(extra)})")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        batch = completion_ids.size(0)
        # TRL's loss_type aggregations (trl 1.16.0 lines 3153-3182) as the core's verl-style modes
        if self.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            agg, accumulation = dict(agg="token-mean", batch_num_tokens=normalizer), 1.0
        elif self.loss_type == "bnpo":
            agg = dict(agg="token-mean")
        elif self.loss_type == "grpo":
            agg = dict(agg="seq-mean-token-mean", global_batch_size=batch)
        elif self.loss_type == "dr_grpo":
            agg = dict(
                agg="seq-mean-token-sum-norm", global_batch_size=batch, loss_scale_factor=self.max_completion_length
            )
        else:  # luspo
            agg = dict(agg="seq-mean-token-sum", global_batch_size=batch)

        spec = dict(
            logits_to_keep=logits_to_keep,
            cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
            target_ids=completion_ids,
            old_log_prob=inputs.get("old_per_token_logps"),  # None: on-policy, r = 1 (TRL's per_token_logps.detach())
            advantages=advantages,
            mask=mask,
            objective=self.policy_objective,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            dual_clip=self._dual_clip,
            ratio_level=self.importance_sampling_level,
            temperature=self.temperature,
            ref_log_prob=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            beta=self.beta,
            compute_entropy=True,
            check_finite=False,  # TRL does not check either; a NaN loss shows in the logs
            **agg,
        )
        # Through `model`, the wrapped one (DDP under several processes): its forward arms the gradient all-reduce
        # (and, in an accumulation step, accelerate's no_sync keeps it local), see _add_fused_policy_loss.
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, cfpo_fused_loss=spec)
        loss = out["loss"] / accumulation

        # Metrics, as the unfused path logs them
        _, global_masked_mean = self._metric_reducers(mask)
        n_valid = mask.sum().float()
        for key in (["kl"] if self.beta != 0.0 else []) + ["entropy"]:
            totals = self.accelerator.reduce(torch.stack([out["metrics"][key] * n_valid, n_valid]), reduction="sum")
            self._metrics[mode][key].append((totals[0] / totals[1].clamp(min=1.0)).item())
        ratio = out["ratio"]
        if self.importance_sampling_level == "sequence":  # one ratio per sequence, as TRL's coef_1 (B, 1)
            valid = mask.bool()
            per_row = torch.where(valid, ratio, 0.0).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
            ratio = torch.where(valid.any(-1, keepdim=True), per_row, torch.ones_like(per_row))
        self._log_trust_region_metrics(mode, ratio, advantages, mask)
        return loss

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

    def _metric_reducers(self, mask):
        """TRL 1.16.0's metric closures from `_compute_loss` (grpo_trainer.py lines 3254-3265), verbatim."""

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

        return masked_seq_mean, global_masked_mean

    def _log_trust_region_metrics(self, mode, coef_1, advantages, mask):
        """TRL's clip_ratio/* metrics (trl 1.16.0 grpo_trainer.py lines 3272-3283, verbatim: same meaning for both
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
        _log_ratio_metrics(self, mode, ratio, advantages, valid)

    def _compute_loss(self, model, inputs):
        """trl==1.16.0 GRPOTrainer._compute_loss with the objective from cfpo_loss. Departures are marked `# CFPO:`."""
        if self.use_fused_loss:  # CFPO: opt-in one-pass path (LM head + objective + aggregation)
            return self._compute_loss_fused(model, inputs)
        # Compute the per-token log probabilities for the model
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)  # we only need to compute the logits for the completion tokens
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

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

        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        else:
            entropy_mask = None

        # Compute the loss
        advantages = inputs["advantages"]
        # In the base GRPO implementation, advantages are expected to have shape (B,). To support subclasses that
        # provide advantages with shape (B, T), we *conditionally* unsqueeze the tensor.
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        # When num_iterations == 1 and steps_per_generation <= gradient_accumulation_steps,
        # old_per_token_logps == per_token_logps. In this case we can skip its computation
        # (see _generate_and_score_completions) and instead use per_token_logps.detach().
        # The exception is when using vLLM, where we always compute old_per_token_logps
        # for importance sampling
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps

        if self.off_policy_mask_threshold is not None:
            # OPSM should use inference-time logprobs to detect both sources of off-policyness:
            # 1. Drift from gradient updates (always present)
            # 2. Drift from training-inference mismatch (when using vLLM)
            # When using vLLM, prioritize sampling_per_token_logps, otherwise use old_per_token_logps
            sampling_per_token_logps = inputs.get("sampling_per_token_logps", old_per_token_logps)

            off_policy_mask = self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=sampling_per_token_logps,
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )

        log_ratio = per_token_logps - old_per_token_logps
        if self.importance_sampling_level == "token":
            log_importance_weights = log_ratio
        elif self.importance_sampling_level == "sequence":
            log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            log_importance_weights = log_importance_weights.unsqueeze(-1)
        else:
            raise ValueError(
                f"Unknown importance sampling level: {self.importance_sampling_level}. Possible values are 'token' "
                "and 'sequence'."
            )

        coef_1 = torch.exp(log_importance_weights)

        # Compute the KL divergence between the model and the reference model
        if self.beta != 0.0:
            ref_per_token_logps = inputs["ref_per_token_logps"]
            per_token_kl = (
                torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
            )
            # Importance sampling correction for the KL divergence
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1

        # From here, log_importance_weights (and all subsequent tensors, coef_1, coef_2, etc.) shape depends on
        # importance_sampling_level: "token" level: (B, T); "sequence" level: (B, 1)
        # CFPO: TRL's loss_type switch (cispo / clipped / sapo / vespo, trl 1.16.0 lines 3109-3138) is replaced by the
        # core's per-token objective. loss_type is an aggregation here (checked at construction); coef_1 keeps its
        # (B, T) or (B, 1) shape, so everything below broadcasts exactly as in TRL. TRL's `delta` clamp of coef_1 is
        # the core's dual_clip (delta > 1 + epsilon_high is enforced, where both agree).
        per_token_loss = -self._policy_objective(coef_1, advantages)

        if self.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * off_policy_mask

        if entropy_mask is not None:
            per_token_loss = per_token_loss * entropy_mask

        if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]

        if self.beta != 0.0:
            per_token_loss = per_token_loss + self.beta * per_token_kl

        mode = "train" if self.model.training else "eval"
        if self.loss_type in ["grpo", "sapo"]:
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # no accum in eval
            policy_loss = loss.detach()
            loss = loss / normalizer
        elif self.loss_type == "bnpo":
            loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # no accum in eval
            policy_loss = loss.detach()
            loss = loss / normalizer
        elif self.loss_type == "dr_grpo":
            loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # no accum in eval
            policy_loss = loss.detach()
            loss = loss / normalizer
        elif self.loss_type in ["cispo", "dapo", "vespo"]:
            # `num_items_in_batch` spans the generation batch, so rescale it to one accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":  # in eval, the batch is neither split across steps nor accumulated
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = (per_token_loss * mask).sum() / normalizer
            policy_loss = loss.detach()
        elif self.loss_type == "luspo":
            # `per_token_loss` is (B, 1) only in the recommended sequence-level setup; importance_sampling_level=
            # "token" (the config default), the KL term, token-level vLLM IS ratios, and the entropy mask all
            # broadcast it to (B, T), so mask before aggregating.
            loss = (per_token_loss * mask).sum(-1).mean()
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            policy_loss = loss.detach()
            loss = loss / normalizer
        else:
            raise ValueError(f"Unknown loss type: {self.loss_type}")

        # Entropy bonus: add entropy regularization to encourage exploration. _entropy_bonus_enabled is set
        # whenever a non-zero static coef is set OR adaptive mode is enabled (adaptive stays enabled even when
        # entropy_coef has been decremented to entropy_coef_min so it can recover once entropy drops again).
        if self._entropy_bonus_enabled:
            # When top_entropy_quantile < 1.0, entropy_mask restricts policy gradients to high-entropy
            # tokens. Use the same effective mask for the entropy bonus so it acts on the same tokens.
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            # Entropy bonus = mean per-token entropy H (the documented objective L = L_policy - coef * H), so
            # H does not depend on how each loss type normalizes its policy term. The bonus is a mean over the
            # tokens it acts on (effective_mask), scaled only for gradient accumulation, never by a loss-type-
            # specific policy normalizer. (The adaptive controller below tracks a window-global token-weighted mean,
            # which can differ from this per-micro-batch mean when token counts vary across micro-batches.)
            accumulation_factor = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            entropy_loss = (
                (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_factor
            )

            # Apply the coefficient and gating from the end of the previous optimizer step, so that every
            # micro-batch in the current accumulation window applies the same entropy bonus. The adaptive
            # update below only takes effect on the next step.
            if self.use_adaptive_entropy:
                apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            else:
                apply_coef = self.entropy_coef

            loss = loss - apply_coef * entropy_loss

            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())

            # Adaptive update. Gated on train mode so evaluation cannot mutate the entropy controller state.
            if self.use_adaptive_entropy and mode == "train":
                # Accumulate the entropy sum and active-token count of every micro-batch into a running window
                # buffer, so the controller measures the exact window-global entropy rather than just the last
                # micro-batch (which would be a 1 / gradient_accumulation_steps subsample).
                stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
                if self._entropy_window_stats is None:
                    self._entropy_window_stats = stats
                else:
                    self._entropy_window_stats = self._entropy_window_stats + stats
                # At the optimizer-step boundary, reduce the window totals across ranks (sum and token count
                # jointly, for a true global mean unbiased when ranks have different completion lengths),
                # update the coefficient for the next step, then reset the window buffer.
                if self.accelerator.sync_gradients:
                    window_stats = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                    world_entropy = (window_stats[0] / window_stats[1].clamp(min=1.0)).item()
                    if world_entropy <= self.args.entropy_target:
                        self.entropy_coef = min(
                            self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max
                        )
                    else:
                        self.entropy_coef = max(
                            self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min
                        )
                    self._last_world_entropy = world_entropy
                    self._entropy_window_stats = None

            # Log entropy_coef on train optimizer-step boundaries (constant for static control; updated just
            # above for adaptive control). sync_gradients is always True in eval (no accumulation context).
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        # The policy loss above is scaled for gradient accumulation (HF auto-scaling is off here), so scale aux too
        if self.aux_loss_enabled:
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        # Log the metrics
        # CFPO: TRL's two closures masked_seq_mean / global_masked_mean, verbatim, moved to _metric_reducers so that
        # the fused path logs through the very same code.
        masked_seq_mean, global_masked_mean = self._metric_reducers(mask)

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl))

        self._metrics[mode]["entropy"].append(global_masked_mean(entropies))

        # CFPO: TRL's clip_ratio/* block (verbatim) and the cfpo/* metrics, in _log_trust_region_metrics.
        self._log_trust_region_metrics(mode, coef_1, advantages, mask)

        return loss


# ---- RLOOTrainer ----------------------------------------------------------------------------------------------------


def _validate_rloo(args, policy_objective) -> None:
    """Raise a clear error for an RLOO configuration CFPORLOOTrainer cannot honour (CFPORLOOConfig and RLOOConfig)."""
    if not isinstance(policy_objective, str) or policy_objective not in POLICY_OBJECTIVES:
        raise ValueError(f"policy_objective must be one of {POLICY_OBJECTIVES}, got {policy_objective!r}")
    # RLOOTrainer itself accepts epsilon >= 1 (no lower clip) and epsilon_high = inf (no upper clip); for CFPO eps is
    # the trust region's half-width (the penalty |A| / (2 eps) * (r - 1)^2 vanishes at eps = inf, and r* = 1 - eps must
    # be a ratio), so those are refused by name, for both objectives as in CFPOTrainer.
    _validate_epsilons(args)


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
        _validate_rloo(self, self.policy_objective)


class CFPORLOOTrainer(RLOOTrainer):
    """``RLOOTrainer`` with the policy objective taken from cfpo_loss (CFPO or clipped); everything else is TRL's.

    RLOO's ratio is one per sequence, r = exp(Σ_t log π_θ(y_t) − Σ_t log π_old(y_t)) over the completion's valid
    tokens (TRL's, not GSPO's length-normalised mean), and its loss is the mean over sequences of −J(r, A); only J
    changes. Accepts a ``CFPORLOOConfig`` or a plain ``RLOOConfig`` (objective "cfpo" then). See the module docstring.
    """

    _tag_names = ["trl", "rloo", "cfpo"]
    _name = "CFPO-RLOO"

    def __init__(self, model, reward_funcs, args=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = CFPORLOOConfig(f"{str(name).rstrip('/').split('/')[-1]}-CFPO-RLOO")
        elif not isinstance(args, RLOOConfig):
            raise TypeError(f"args must be a CFPORLOOConfig or RLOOConfig, got {type(args).__name__}")
        policy_objective = getattr(args, "policy_objective", "cfpo")
        _validate_rloo(args, policy_objective)  # before loading any model
        self.policy_objective = policy_objective
        self._objective = get_objective(policy_objective)  # the core's record: terms, has_penalty
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)

    def _objective_terms(self, ratio: torch.Tensor, advantages: torch.Tensor):
        """The core's terms of the objective (J to maximise, dJ/dr, penalty or None) on RLOO's sequence ratio, the very
        function cfpo_surrogate / clipped_surrogate return the value of. RLOO has no dual clip."""
        return self._objective.terms(ratio, advantages, self.epsilon_low, self.epsilon_high, None)

    def _policy_objective(self, ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """Per-sequence objective J(r, A) to maximise, from the core."""
        return self._objective_terms(ratio, advantages).objective

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
        _log_ratio_metrics(self, mode, ratio, advantages[:, None], torch.ones_like(ratio, dtype=torch.bool))
        return loss
