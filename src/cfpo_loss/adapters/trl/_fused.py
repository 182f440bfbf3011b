"""``use_fused_loss=True``: LM head, log-probs, objective, KL and aggregation in one chunked pass of the core
(``cfpo_loss.fused_linear_policy_loss``), gradients computed in the forward, never the logits.

``compute_loss_fused`` maps ``loss_type`` to the core's aggregation with TRL's normalisers (the ``loss_type`` branches
of trl 1.16.0's ``GRPOTrainer._compute_loss``), calls the (wrapped) model, whose forward ``add_fused_policy_loss``
patches to run the backbone and the fused pass when given ``cfpo_fused_loss=...`` (TRL's own ``add_fused_lm_head``
pattern, so DDP's reducer and FSDP2's reduce-scatter synchronise the gradients), and logs the same metrics as the
unfused path. It supports a subset of TRL's options (one process, DDP or FSDP2; no FSDP1 / DeepSpeed / tensor
parallelism, no PEFT / MoE aux loss / logit softcapping or scaling / multimodal inputs, no entropy bonus, entropy mask,
off-policy mask or vLLM IS correction, and KL only with ``use_bias_correction_kl=False``), and refuses the rest by name:
``check_fused_args`` at configuration, ``check_fused_model`` after the trainer is built (an FSDP2 layout with the LM
head in a unit of its own, on the first step). The contract: the unfused path's loss and gradients (in clip mode, TRL
GRPOTrainer's), under DDP its trajectory with identical parameters on every rank, under FSDP2 the gradients of an
unsharded copy (tests/trl/test_trl_fused.py, tests/trl/test_distributed.py).
"""

from __future__ import annotations

import functools
import os
import types

import torch
from accelerate.utils import is_peft_model

try:  # FSDP2's sharded parameters (torch builds without torch.distributed have none)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

from ...fused import fused_linear_policy_loss

# inputs the fused path cannot take (vision-language models) and config logit transforms it does not apply
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_tiles",
    "num_images",
)
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
# use_fused_loss=True under several processes: accelerate's distributed types that wrap the model in plain DDP
# (tested on CPU with gloo, tests/trl/test_distributed.py), and FSDP2; every other one is refused at construction.
_DDP_TYPES = (
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_XPU",
    "MULTI_NPU",
    "MULTI_MLU",
    "MULTI_SDAA",
    "MULTI_MUSA",
    "MULTI_HPU",
    "MULTI_NEURON",
)
_FSDP1_REASON = (
    "FSDP1 flattens parameters into FlatParameters and is not tested with the fused pass; FSDP2, "
    "fsdp_config={'version': 2} (TrainingArguments' default), is"
)
_DEEPSPEED_REASON = (
    "ZeRO-3 partitions the LM head to numel 0 outside its module's forward, so the fused pass "
    "would read an empty weight unless gathered (TRL's maybe_gather_lm_head_ctx); DeepSpeed is not "
    "installable in the test environment, so no ZeRO stage is tested with the fused pass"
)


def check_fused_args(args) -> None:
    """use_fused_loss=True runs LM head + objective + aggregation in one chunked pass (cfpo_loss.fused), so it can
    only honour the parts of TRL's loss that act on that pass's inputs. Everything else is refused, by name."""
    refused = []
    if args.beta != 0.0 and args.use_bias_correction_kl:
        refused.append(
            "beta > 0 with use_bias_correction_kl=True (the fused pass adds the plain k3 KL; set "
            "use_bias_correction_kl=False)"
        )
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
        refused.append(
            "parallelism_config with tensor / context / sequence parallelism or dp_shard_size > 1 "
            "(the LM head or the sequence is split across processes; untested with the fused pass)"
        )
    if refused:
        raise ValueError(
            "use_fused_loss=True does not support " + "; ".join(refused) + ". Use use_fused_loss=False "
            "(TRL's own chunked log-prob kernel with the same objective) for these options."
        )


def _requested_fsdp_version(args) -> int | None:
    """The FSDP version the arguments (or `accelerate launch`'s environment) ask for; None without FSDP."""
    if args.fsdp:  # TrainingArguments: fsdp_config's "version", default 2 (transformers' _process_fsdp_args)
        return int((args.fsdp_config or {}).get("version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's FullyShardedDataParallelPlugin default
    return None


def check_fused_model(trainer) -> None:
    """After construction: refuse what accelerate made of the arguments and the launcher's environment (FSDP1 /
    DeepSpeed / TP are refused from the arguments already; this catches the rest, e.g. an accelerate config file's
    XLA or Megatron-LM), and a model the fused pass cannot compute (PEFT, MoE aux loss, logit transforms)."""
    kind = trainer.accelerator.distributed_type
    fsdp_version = getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None)
    if kind.name == "FSDP" and fsdp_version == 2:
        pass
    elif trainer.is_deepspeed_enabled or kind.name not in _DDP_TYPES:
        reason = {"FSDP": _FSDP1_REASON, "DEEPSPEED": _DEEPSPEED_REASON}.get(kind.name, "untested")
        raise ValueError(
            f"use_fused_loss=True runs under one process, DDP or FSDP2 only; accelerate's distributed type is "
            f"{kind.name} ({reason}). Use use_fused_loss=False (TRL's own chunked log-prob kernel, same objective)."
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        raise ValueError("use_fused_loss=True does not support PEFT models yet; use use_fused_loss=False")
    if trainer.aux_loss_enabled:
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


def add_fused_policy_loss(model) -> None:
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


def compute_loss_fused(trainer, model, inputs):
    """The loss of ``_compute_loss`` in one chunked pass: backbone hidden states -> fused_linear_policy_loss
    (LM head, log-probs, objective, KL, aggregation; never the (tokens x vocabulary) logits), then TRL's
    normalisation and metrics. Same inputs, loss and gradients as the unfused path."""
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
    mode = "train" if trainer.model.training else "eval"
    agg, accumulation = _aggregation(trainer, inputs, mode, batch=completion_ids.size(0))
    spec = dict(
        logits_to_keep=logits_to_keep,
        cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32,
        target_ids=completion_ids,
        old_log_prob=inputs.get("old_per_token_logps"),  # None: on-policy, r = 1 (TRL's per_token_logps.detach())
        advantages=advantages,
        mask=mask,
        objective=trainer.policy_objective,
        eps_low=trainer.epsilon_low,
        eps_high=trainer.epsilon_high,
        dual_clip=trainer._dual_clip,
        ratio_level=trainer.importance_sampling_level,
        temperature=trainer.temperature,
        ref_log_prob=inputs.get("ref_per_token_logps") if trainer.beta != 0.0 else None,
        beta=trainer.beta,
        compute_entropy=True,
        check_finite=False,  # TRL does not check either; a NaN loss shows in the logs
        **agg,
    )
    # Through `model`, the wrapped one (DDP under several processes): its forward arms the gradient all-reduce
    # (and, in an accumulation step, accelerate's no_sync keeps it local), see add_fused_policy_loss.
    with trainer.accelerator.autocast():
        out = model(input_ids=input_ids, attention_mask=attention_mask, cfpo_fused_loss=spec)
    _log_metrics(trainer, mode, out, advantages, mask)
    return out["loss"] / accumulation


def _aggregation(trainer, inputs, mode, batch) -> tuple[dict, float]:
    """TRL's loss_type aggregations (trl 1.16.0 ``GRPOTrainer._compute_loss``) as the core's verl-style modes: the
    aggregation keywords of the fused pass, and what its loss is divided by for gradient accumulation."""
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if trainer.loss_type == "dapo":
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return dict(agg="token-mean", batch_num_tokens=normalizer), 1.0
    if trainer.loss_type == "bnpo":
        return dict(agg="token-mean"), accumulation
    if trainer.loss_type == "grpo":
        return dict(agg="seq-mean-token-mean", global_batch_size=batch), accumulation
    if trainer.loss_type == "dr_grpo":
        return dict(agg="seq-mean-token-sum-norm", global_batch_size=batch,
                    loss_scale_factor=trainer.max_completion_length), accumulation  # fmt: skip
    return dict(agg="seq-mean-token-sum", global_batch_size=batch), accumulation  # luspo


def _log_metrics(trainer, mode, out, advantages, mask) -> None:
    """The metrics the unfused path logs (kl, entropy, clip_ratio/*, cfpo/*), from the fused pass's outputs."""
    n_valid = mask.sum().float()
    for key in (["kl"] if trainer.beta != 0.0 else []) + ["entropy"]:
        totals = trainer.accelerator.reduce(torch.stack([out["metrics"][key] * n_valid, n_valid]), reduction="sum")
        trainer._metrics[mode][key].append((totals[0] / totals[1].clamp(min=1.0)).item())
    ratio = out["ratio"]
    if trainer.importance_sampling_level == "sequence":  # one ratio per sequence, as TRL's coef_1 (B, 1)
        valid = mask.bool()
        per_row = torch.where(valid, ratio, 0.0).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
        ratio = torch.where(valid.any(-1, keepdim=True), per_row, torch.ones_like(per_row))
    trainer._log_trust_region_metrics(mode, ratio, advantages, mask)
