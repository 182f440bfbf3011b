"""OpenRLHF adapter: ``PolicyLoss(policy_loss_type="cfpo")`` and ``"cfpo_seq"`` in OpenRLHF 0.10.4 - 0.11.x.

``install()`` patches the class ``openrlhf.models.loss.PolicyLoss`` itself (its ``__init__`` and
``forward``), so every reference to it sees the new types, also ``PolicyLoss`` names imported before
``install()`` ran (``openrlhf.trainer.ray.ppo_actor`` imports it by name from ``openrlhf.models``).
``"ppo"`` and ``"gspo"`` keep running OpenRLHF's own, unchanged ``forward``. Calling it twice is harmless.

OpenRLHF builds ``PolicyLoss`` inside Ray actors, so the patch must reach every Ray worker: the
launcher ``python -m cfpo_loss.adapters.openrlhf.train_ppo_ray`` (console script
``cfpo-openrlhf-train-ppo-ray``) sets ``install_on_import`` as Ray's ``worker_process_setup_hook``,
which patches the class when a worker imports ``openrlhf.models.loss``.

What the new types do (the per-token math is the core's, ``cfpo_loss.compute_policy_loss``):

    OpenRLHF                              here
    policy_loss_type "cfpo"               objective "cfpo", token-level ratio (as "ppo")
    policy_loss_type "cfpo_seq"           objective "cfpo", GSPO sequence ratio exp(mean_t log r) (as
                                          "gspo": per-sample aggregation forced, and with the
                                          is-correction on, the ratio is taken against the rollout
                                          log-probs and no IS weight is applied - exactly gspo's rules)
    clip_eps_low / clip_eps_high          eps_low / eps_high (the trust-region half-widths)
    dual_clip                             no effect (CFPO clips nothing; a RuntimeWarning says so)
    token_level_loss, dp_size,            OpenRLHF's own ``aggregate_loss`` applied to the core's
    batch_num_tokens, global_batch_size   per-token loss, so the aggregation is OpenRLHF's by construction
    is_correction_level/mode/gating/      OpenRLHF's train/rollout IS correction (TIS, ICEPOP, seq-mask-tis,
    threshold                             binary_kl / tv trust regions), the same coefficients multiplied
                                          onto the per-token loss (core ``weights``)

Two PolicyLoss APIs, told apart by ``PolicyLoss.__init__``'s parameters (not by version number):

    OpenRLHF 0.11.2                       is_correction_level / _mode / _gating / _threshold; forward
                                          returns 5 values (the last: is_filter_ratio)
    OpenRLHF 0.10.4, 0.11.0, 0.11.1       enable_vllm_is_correction, vllm_is_truncated_threshold,
                                          vllm_is_correction_type in {tis, icepop, seq-mask-tis}; forward
                                          returns 4 values. The three types are the newer API's
                                          (token, clip, ratio), (token, mask, ratio), (seq, mask, ratio):
                                          the same coefficients, so one implementation serves both

A PolicyLoss with neither API is refused by name (``RuntimeError`` listing the missing parameters).

The return contract is kept: ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` (0.11.2) or its
first four (older), where
``clip_ratio`` is the trust-region exit fraction (A>0 & r>1+eps_high, or A<0 & r<1-eps_low), which is
exactly what OpenRLHF's ``clip_ratio`` counts for "ppo" - CFPO clips nothing but reports the same
statistic so runs compare side by side; ``ppo_kl`` is OpenRLHF's masked mean of (old - new) log-prob;
``vllm_kl`` / ``is_filter_ratio`` as OpenRLHF computes them (None when the correction is off). All
core metrics of the last call (ratio_mean, ratio_dev, tr_exit_low/high, approx_kl_k3, penalty, ...)
are kept on the module as ``loss_fn.cfpo_metrics``.

Environment: ``CFPO_CHECK_FINITE=0`` turns off the core's NaN/inf check at valid positions (it costs
one device sync per call).
"""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import os
import sys
import warnings
from typing import Any

import torch

from ... import compute_policy_loss
from ..._checks import check_eps
from .._metric_names import framework_keys
from .._support import installed_version, supported_range, tested_versions, warn_if_unsupported

__all__ = [
    "CFPO_LOSS_TYPES",
    "LOSS_TYPES",
    "cfpo_policy_loss_forward",
    "install",
    "install_on_import",
    "is_installed",
    "patch_policy_loss_class",
]

#: the policy_loss_type values this adapter adds -> the core's (objective, ratio_level): the one table of both
LOSS_TYPES = {"cfpo": ("cfpo", "token"), "cfpo_seq": ("cfpo", "sequence")}
#: the policy_loss_type values this adapter adds -> the core's ratio_level (LOSS_TYPES without the objective)
CFPO_LOSS_TYPES = {loss_type: ratio_level for loss_type, (_, ratio_level) in LOSS_TYPES.items()}

#: core metric -> the name of the PolicyLoss.forward return value that carries it (the adapters' one table)
_RETURN_VALUES = framework_keys("openrlhf")
_MARK = "__cfpo_loss_patch__"
# PolicyLoss's parameters this adapter reads; a PolicyLoss without them is a different OpenRLHF API
_INIT_PARAMS = ("clip_eps_low", "clip_eps_high", "dual_clip", "token_level_loss", "policy_loss_type")
#: the IS-correction parameters of each PolicyLoss API (see the module docstring)
_API_PARAMS = {
    "is_correction": ("is_correction_level", "is_correction_mode", "is_correction_gating", "is_correction_threshold"),
    "vllm_is": ("enable_vllm_is_correction", "vllm_is_truncated_threshold", "vllm_is_correction_type"),
}
#: OpenRLHF < 0.11.2's vllm_is_correction_type -> (level, mode, gating) of the newer API
_LEGACY_IS_TYPES = {
    "tis": ("token", "clip", "ratio"),
    "icepop": ("token", "mask", "ratio"),
    "seq-mask-tis": ("seq", "mask", "ratio"),
}
_FORWARD_PARAMS = (
    "log_probs",
    "old_log_probs",
    "advantages",
    "action_mask",
    "rollout_log_probs",
    "dp_size",
    "batch_num_tokens",
    "global_batch_size",
)


def install() -> None:
    """Make ``openrlhf.models.loss.PolicyLoss`` accept policy_loss_type "cfpo" / "cfpo_seq". Idempotent.

    Imports ``openrlhf.models`` (and so DeepSpeed) now; ``install_on_import()`` waits for that import.
    """
    warn_if_unsupported(
        "openrlhf", installed_version("openrlhf"), "PolicyLoss's signature is checked, its semantics are not"
    )
    from openrlhf.models import loss as loss_module

    patch_policy_loss_class(loss_module.PolicyLoss)


def install_on_import() -> None:
    """Patch ``PolicyLoss`` as soon as ``openrlhf.models.loss`` is imported in this process (now, if it
    already is). Idempotent. This is the Ray ``worker_process_setup_hook`` the launcher sets: it imports
    neither OpenRLHF nor DeepSpeed into workers that never use the loss (OpenRLHF keeps DeepSpeed out
    of its vLLM engine processes), and patches the PPO actors' import of ``openrlhf.models``."""
    if _LOSS_MODULE in sys.modules:
        install()
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


_LOSS_MODULE = "openrlhf.models.loss"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``openrlhf.models.loss`` through the other finders and patches it right after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _LOSS_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        patch_policy_loss_class(module.PolicyLoss)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... of the real loader
        return getattr(self._loader, name)


def is_installed() -> bool:
    """True when ``openrlhf.models.loss.PolicyLoss`` is patched in this process."""
    mod = sys.modules.get("openrlhf.models.loss")
    return mod is not None and _MARK in vars(mod.PolicyLoss)


def patch_policy_loss_class(cls: type) -> type:
    """Patch ``cls`` (OpenRLHF's PolicyLoss, or a copy of its module's class) in place. Idempotent.

    ``install()`` applies it to ``openrlhf.models.loss.PolicyLoss``. The patched ``forward`` takes
    ``aggregate_loss`` from ``cls``'s own module, so it also works on a copy loaded from the source file
    (OpenRLHF's own tests load ``models/loss.py`` that way).
    """
    if _MARK in vars(cls):
        return cls
    api = _check_api(cls)
    native_init = cls.__init__
    native_forward = cls.forward
    init_sig = inspect.signature(native_init)
    module = sys.modules[cls.__module__]

    @functools.wraps(native_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = init_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        loss_type = bound.arguments["policy_loss_type"]
        if loss_type not in CFPO_LOSS_TYPES:
            native_init(self, *args, **kwargs)  # "ppo", "gspo" and OpenRLHF's own errors, untouched
            return
        # OpenRLHF's own validation of every other option (is-correction, dual_clip) runs as for "ppo"
        bound.arguments["policy_loss_type"] = "ppo"
        native_init(*bound.args, **bound.kwargs)
        self.policy_loss_type = loss_type
        check_eps(self.clip_eps_low, self.clip_eps_high)
        if loss_type == "cfpo_seq":
            self.token_level_loss = False  # as OpenRLHF does for "gspo" (GSPO is a per-sample loss)
        if self.dual_clip is not None:
            warnings.warn(
                f"PolicyLoss(policy_loss_type={loss_type!r}): dual_clip={self.dual_clip} has no effect; "
                "CFPO has no clip to bound",
                RuntimeWarning,
                stacklevel=2,
            )
        self.cfpo_metrics = {}

    @functools.wraps(native_forward)
    def forward(self, *args: Any, **kwargs: Any):
        loss_type = getattr(self, "policy_loss_type", None)
        if loss_type not in CFPO_LOSS_TYPES:
            return native_forward(self, *args, **kwargs)
        return cfpo_policy_loss_forward(self, *args, **kwargs)  # the objective of its loss type (LOSS_TYPES)

    cls.__init__ = __init__
    cls.forward = forward
    setattr(cls, _MARK, {"native_init": native_init, "native_forward": native_forward, "module": module, "api": api})
    return cls


def cfpo_policy_loss_forward(
    loss_fn: torch.nn.Module,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    *,
    objective: str | None = None,
):
    """The patched ``forward`` for a PolicyLoss built with a cfpo type; returns OpenRLHF's 5-tuple.

    ``objective`` None runs the loss type's own objective (``LOSS_TYPES``); ``objective="clip"`` runs the same
    translation with the clipped objective, which shows that everything around the objective (ratio, aggregation,
    IS correction, metrics) is OpenRLHF's.
    """
    loss_type = loss_fn.policy_loss_type
    if loss_type not in CFPO_LOSS_TYPES:
        raise ValueError(f"policy_loss_type must be one of {sorted(CFPO_LOSS_TYPES)}, got {loss_type!r}")
    info = _patch_info(type(loss_fn))
    module = info["module"]
    type_objective, ratio_level = LOSS_TYPES[loss_type]
    objective = type_objective if objective is None else objective
    if action_mask is None:
        action_mask = torch.ones_like(log_probs, dtype=torch.bool)
    mask = action_mask.bool()
    is_settings = _is_settings(loss_fn, info["api"])
    correction = is_settings is not None
    if correction and rollout_log_probs is None:
        raise ValueError(
            f"rollout_log_probs is required with the IS correction on ({_describe_is(loss_fn, info['api'])})"
        )

    # The ratio's denominator: OpenRLHF's gspo takes it against the rollout log-probs when correcting.
    denominator = rollout_log_probs if (ratio_level == "sequence" and correction) else old_log_probs
    weights = vllm_kl = is_filter_ratio = None
    if correction and ratio_level == "token":
        weights, is_filter_ratio = _is_correction(*is_settings, old_log_probs, rollout_log_probs, mask)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)

    out = compute_policy_loss(
        log_probs,
        denominator,
        advantages,
        mask,
        objective=objective,
        eps_low=loss_fn.clip_eps_low,
        eps_high=loss_fn.clip_eps_high,
        dual_clip=loss_fn.dual_clip,
        ratio_level=ratio_level,
        weights=weights,
        check_finite=os.environ.get("CFPO_CHECK_FINITE", "1") != "0",
    )
    # OpenRLHF's own aggregation (token_level_loss, dp_size, batch_num_tokens, global_batch_size) on the
    # core's per-token loss, which is exactly 0 at masked positions.
    loss = module.aggregate_loss(
        out.per_token_loss,
        action_mask,
        token_level_loss=loss_fn.token_level_loss,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
    )
    returned = {key: out.metrics[name] for name, key in _RETURN_VALUES.items()}
    clip_ratio = returned["clip_ratio"]
    ppo_kl = _masked_mean((old_log_probs - log_probs).detach().float(), mask)
    loss_fn.cfpo_metrics = dict(out.metrics)
    if info["api"] == "vllm_is":  # OpenRLHF < 0.11.2 returns four values
        return loss, clip_ratio, ppo_kl, vllm_kl
    return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


def _is_settings(loss_fn, api: str):
    """(level, mode, gating, (low, high)) of the IS correction, or None when it is off, for either API."""
    if api == "is_correction":
        if loss_fn.is_correction_level == "off":
            return None
        return (loss_fn.is_correction_level, loss_fn.is_correction_mode, loss_fn.is_correction_gating,
                loss_fn.is_correction_threshold)  # fmt: skip
    if not loss_fn.enable_vllm_is_correction:
        return None
    # may be None: only the token-level correction reads it (gspo-style cfpo_seq does not, as in OpenRLHF)
    return (*_LEGACY_IS_TYPES[loss_fn.vllm_is_correction_type], loss_fn.vllm_is_truncated_threshold)


def _describe_is(loss_fn, api: str) -> str:
    if api == "is_correction":
        return f"is_correction_level={loss_fn.is_correction_level!r}"
    return f"enable_vllm_is_correction=True, vllm_is_correction_type={loss_fn.vllm_is_correction_type!r}"


def _is_correction(level, mode, gating, threshold, old_log_probs, rollout_log_probs, mask):
    """OpenRLHF's train/rollout IS correction (PolicyLoss.forward, 0.11.2's form; the older API's three types
    are special cases): the per-token coefficient that multiplies the per-token loss, and the filtered
    fraction at the unit's own granularity."""
    if threshold is None or len(threshold) != 2:
        raise ValueError(
            f"the IS correction needs a [low, high] threshold (vllm_is_truncated_threshold), got {threshold!r}"
        )
    low, high = threshold
    seq_level = level == "seq"
    is_log_ratio = (old_log_probs - rollout_log_probs).detach()  # log(pi_train / pi_rollout)
    token_is = is_log_ratio.exp()
    if gating == "ratio":
        stat = _masked_mean(is_log_ratio, mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
        stat = stat.exp()
    else:
        p = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
        q = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
        if gating == "binary_kl":
            stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        else:  # tv
            stat = (p - q).abs()
        if seq_level:
            stat = _masked_mean(stat, mask, dim=-1).unsqueeze(-1)
    if mode == "clip":
        coef = stat.clamp(min=low, max=high)
        filtered = (stat < low) | (stat > high)
    else:  # mask: drop out-of-band units, survivors keep their per-token IS weight
        keep = (stat >= low) & (stat <= high)
        coef = torch.where(keep, token_is, 0.0)
        filtered = ~keep
    if seq_level:
        is_filter_ratio = filtered.float().mean()
    else:
        is_filter_ratio = _masked_mean(filtered.float(), mask)
    return coef.expand_as(old_log_probs), is_filter_ratio


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """OpenRLHF's masked_mean (sum over valid / count of valid), selecting instead of multiplying."""
    selected = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return selected.sum() / mask.sum()
    return selected.sum(dim=dim) / mask.sum(dim=dim)


def _patch_info(cls: type) -> dict:
    for klass in cls.__mro__:
        if _MARK in vars(klass):
            return vars(klass)[_MARK]
    raise RuntimeError(f"{cls.__qualname__} is not patched; call cfpo_loss.adapters.openrlhf.install() first")


def _check_api(cls: type) -> str:
    """Which PolicyLoss API ``cls`` has ("is_correction": 0.11.2; "vllm_is": 0.10.4 - 0.11.1); raise otherwise."""
    init_params = inspect.signature(cls.__init__).parameters
    forward_params = inspect.signature(cls.forward).parameters
    apis = [api for api, names in _API_PARAMS.items() if all(p in init_params for p in names)]
    missing = [p for p in _INIT_PARAMS if p not in init_params] + [
        p for p in _FORWARD_PARAMS if p not in forward_params
    ]
    if not apis:
        missing.append(" or ".join("(" + ", ".join(names) + ")" for names in _API_PARAMS.values()))
    if missing or not hasattr(sys.modules[cls.__module__], "aggregate_loss"):
        raise RuntimeError(
            f"{cls.__module__}.{cls.__qualname__} is not the PolicyLoss of an openrlhf{supported_range('openrlhf')} "
            f"that this adapter patches (missing: {'; '.join(missing) or 'aggregate_loss'}); installed openrlhf "
            f"{installed_version('openrlhf')} (tested: {tested_versions('openrlhf')})"
        )
    return apis[0]
