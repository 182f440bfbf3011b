"""verl plugin: registers the ``cfpo`` and ``cfpo_seq`` policy losses in verl's POLICY_LOSS_REGISTRY.

Select the loss with::

    actor_rollout_ref.actor.policy_loss.loss_mode=cfpo        # token-level ratio
    actor_rollout_ref.actor.policy_loss.loss_mode=cfpo_seq    # GSPO sequence-level ratio

How verl finds this module (``python -m cfpo_loss`` says which mechanism is active):

* **verl 0.9.x**: nothing to do. ``pip install cfpo-loss`` declares this module under the entry-point
  group ``verl.plugins``; ``import verl`` loads every entry point of that group (``verl/__init__.py``,
  governed by ``VERL_USE_EXTERNAL_PLUGINS``: "auto" by default, "none" disables, or a comma list of
  entry-point names such as "cfpo_loss"), in the driver and in every Ray worker.
* **verl 0.8.0** has no entry-point group; its ``import verl`` imports the modules listed in
  ``VERL_USE_EXTERNAL_MODULES``. The one switch is that variable, set for every Ray worker through Ray's
  job-level ``runtime_env`` (which verl's ``main_ppo`` builds from ``ray_kwargs.ray_init``; Ray merges it
  into the per-worker ``env_vars`` verl's worker groups add)::

      +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=cfpo_loss.adapters.verl

  (``HYDRA_OVERRIDE`` below). Exporting ``VERL_USE_EXTERNAL_MODULES=cfpo_loss.adapters.verl`` in the
  launching shell as well registers the losses in the driver too (what ``python -m cfpo_loss`` checks);
  on its own it reaches only the workers of a Ray cluster that the driver starts itself.

The loss functions only translate between verl and the core (``cfpo_loss.compute_policy_loss``):

    verl                                    core
    clip_ratio_low / clip_ratio_high        eps_low / eps_high (each falls back to clip_ratio when None,
                                            exactly as verl's ``vanilla`` loss reads them)
    loss_agg_mode                           agg (verl ``agg_loss`` semantics; "token-sum" only on verl
                                            >= 0.9.0, where verl's agg_loss has it: on 0.8.0 it is refused
                                            by name, as verl's own losses refuse it)
    config.global_batch_info                dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    rollout_is_weights                      weights (multiplied onto the per-token loss, as vanilla does)

``cfpo_seq`` honours ``loss_agg_mode`` on every verl version, as verl 0.9.1's ``gspo`` does (verl 0.8.0 /
0.9.0's ``gspo`` ignores it and always aggregates "seq-mean-token-mean": set that mode to match them).

Metrics, with verl's meaning:
    actor/pg_clipfrac        fraction of valid tokens outside the trust region in the direction the
                             advantage pushes (A>0 & r>1+eps_high, or A<0 & r<1-eps_low). For the clip
                             objective this is exactly verl's clip fraction; for CFPO nothing is clipped,
                             but it is the same statistic, so runs compare side by side.
    actor/ppo_kl             masked mean of log pi_old - log pi (clamped log-ratio), as verl.
    actor/pg_clipfrac_lower  fraction of A<0 tokens where the dual-clip bound (clip_ratio_c) replaced the
                             loss. CFPO has no dual clip, so this is 0.0 (as verl's own ``gspo`` reports).
    actor/cfpo/<name>        every core metric (ratio_mean, ratio_min, ratio_max, ratio_dev, tr_exit_frac,
                             tr_exit_low, tr_exit_high, approx_kl_k1, approx_kl_k3, penalty).

If registration fails (e.g. an incompatible verl), a RuntimeWarning naming the cause is emitted and
logged at WARNING level - verl itself only logs plugin import errors at DEBUG, which would leave a
user with a bare "Unsupported loss mode: cfpo". A verl outside the supported range gets a
RuntimeWarning naming the range. ``plugin_status()`` (used by ``python -m cfpo_loss``) reports whether
a bare ``import verl`` registers the losses, and through which mechanism.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
import traceback
import warnings
from typing import Any, Callable

__all__ = [
    "LOSS_NAMES",
    "ENTRY_POINT_NAME",
    "make_policy_loss",
    "compute_policy_loss_cfpo",
    "compute_policy_loss_cfpo_seq",
    "register",
    "registration_error",
    "plugin_status",
    "loading_mechanism",
    "verl_loads_entry_points",
    "EXTERNAL_MODULES_ENV",
    "HYDRA_OVERRIDE",
]

_LOG = logging.getLogger(__name__)

#: the names this plugin registers (never a bare "spo": in verl that is Single-stream Policy Optimization)
LOSS_NAMES = ("cfpo", "cfpo_seq")
#: name of our entry point in the ``verl.plugins`` group (what VERL_USE_EXTERNAL_PLUGINS filters on)
ENTRY_POINT_NAME = "cfpo_loss"
ENTRY_POINT_GROUP = "verl.plugins"
#: verl's own import hook (every verl version): ``import verl`` imports the comma-separated modules listed here
EXTERNAL_MODULES_ENV = "VERL_USE_EXTERNAL_MODULES"
#: the verl 0.8.0 switch: this module in every Ray worker's VERL_USE_EXTERNAL_MODULES, via verl's ray_init
HYDRA_OVERRIDE = f"+ray_kwargs.ray_init.runtime_env.env_vars.{EXTERNAL_MODULES_ENV}={__name__}"

#: attribute set on our loss functions, so re-registration can tell ours from someone else's
_MARK = "__cfpo_loss_plugin__"
_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")

_state: dict[str, Any] = {"error": None}


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from an ActorConfig (dataclass) or a DictConfig / dict alike."""
    if isinstance(config, dict):
        return config.get(name, default)
    try:
        return getattr(config, name)
    except (AttributeError, KeyError):
        getter = getattr(config, "get", None)
        return getter(name, default) if callable(getter) else default


def _eps(config: Any) -> tuple[float, float]:
    clip_ratio = _cfg(config, "clip_ratio")
    low = _cfg(config, "clip_ratio_low")
    high = _cfg(config, "clip_ratio_high")
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    if low is None or high is None:
        raise ValueError(
            "config must set clip_ratio, or both clip_ratio_low and clip_ratio_high "
            f"(got clip_ratio={clip_ratio!r}, clip_ratio_low={low!r}, clip_ratio_high={high!r})"
        )
    return low, high


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = _cfg(config, "global_batch_info") or {}
    unknown = set(info) - set(_GLOBAL_BATCH_KEYS)
    if unknown:
        # verl's own losses pass global_batch_info to agg_loss(**info): unknown keys would fail there too
        raise ValueError(f"config.global_batch_info has unknown key(s) {sorted(unknown)}; known: {_GLOBAL_BATCH_KEYS}")
    return {k: info[k] for k in _GLOBAL_BATCH_KEYS if k in info}


def make_policy_loss(objective: str = "cfpo", ratio_level: str = "token", name: str | None = None) -> Callable:
    """Build a loss function with verl's PolicyLossFn signature around ``cfpo_loss.compute_policy_loss``.

    ``objective`` "cfpo" or "clip" (the latter, with dual_clip = config.clip_ratio_c, is the PPO/GRPO
    clip objective: the tests use it to prove this path equals verl's ``vanilla`` loss).
    ``ratio_level`` "token" or "sequence" (GSPO ratio). The returned function is not registered.
    """
    from cfpo_loss import compute_policy_loss, get_objective  # the math lives once, in the core

    record = get_objective(objective)  # an unknown name raises here, when the loss is built

    def policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights=None,
    ):
        if config is None:
            raise ValueError(f"policy loss {policy_loss.__name__!r}: config (verl ActorConfig) is required")
        if loss_agg_mode == "token-sum" and not _verl_has_token_sum():
            raise ValueError(
                f"loss_agg_mode='token-sum' is not an aggregation of verl {_verl_version()} (its agg_loss raises "
                "'Invalid loss_agg_mode'; verl added it in 0.9.0). Use token-mean, seq-mean-token-sum, "
                "seq-mean-token-mean or seq-mean-token-sum-norm."
            )
        eps_low, eps_high = _eps(config)
        dual_clip = _cfg(config, "clip_ratio_c", 3.0) if record.takes_dual_clip else None
        out = compute_policy_loss(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            objective=objective,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            agg=loss_agg_mode,
            ratio_level=ratio_level,
            weights=rollout_is_weights,
            **_global_batch_info(config),
        )
        # floats already on the host: the loss's one device sync (its finite check) brought them along
        # (verl's own losses call .item() on each)
        values = out.metric_floats()
        metrics = {
            "actor/pg_clipfrac": values["tr_exit_frac"],
            "actor/ppo_kl": values["approx_kl_k1"],
            "actor/pg_clipfrac_lower": values.get("dual_clip_frac", 0.0),
        }
        metrics.update({f"actor/cfpo/{k}": v for k, v in values.items()})
        return out.loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{name or objective}"
    policy_loss.__doc__ = (
        f"verl policy loss {name or objective!r}: cfpo_loss.compute_policy_loss(objective={objective!r}, "
        f"ratio_level={ratio_level!r}) with verl's signature, eps, loss_agg_mode, global_batch_info, "
        "rollout_is_weights and metric keys."
    )
    setattr(policy_loss, _MARK, (objective, ratio_level))
    return policy_loss


def _verl_version() -> str | None:
    try:
        return importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return None


def _verl_has_token_sum() -> bool:
    """verl's agg_loss knows "token-sum" from 0.9.0 on (0.8.0's raises 'Invalid loss_agg_mode')."""
    from ._support import version_key

    version = _verl_version()
    return version is None or version_key(version) >= (0, 9, 0)


compute_policy_loss_cfpo = make_policy_loss("cfpo", "token", name="cfpo")
compute_policy_loss_cfpo_seq = make_policy_loss("cfpo", "sequence", name="cfpo_seq")
_LOSSES = {"cfpo": compute_policy_loss_cfpo, "cfpo_seq": compute_policy_loss_cfpo_seq}


def _is_ours(fn: Any) -> bool:
    return getattr(fn, _MARK, None) is not None


def register(*, override: bool = False) -> tuple[str, ...]:
    """Register ``cfpo`` and ``cfpo_seq`` with verl's ``register_policy_loss``. Idempotent.

    A name already held by a loss from another package is left alone (with a warning) unless
    ``override``. Returns the names that now map to our losses. Raises if verl cannot be imported or
    lacks the registry (the module-level call turns that into a loud warning).
    """
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    done = []
    for name, fn in _LOSSES.items():
        existing = POLICY_LOSS_REGISTRY.get(name)
        if existing is fn:
            done.append(name)
            continue
        if existing is not None and not _is_ours(existing) and not override:
            msg = (
                f"cfpo_loss: verl policy loss {name!r} is already registered by "
                f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', existing)!s}; "
                f"leaving it in place (loss_mode={name} will NOT be CFPO). "
                "Call cfpo_loss.adapters.verl.register(override=True) to replace it."
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            _LOG.warning(msg)
            continue
        register_policy_loss(name)(fn)
        done.append(name)
    return tuple(done)


def registration_error() -> str | None:
    """The cause recorded when the import-time registration failed, else None."""
    return _state["error"]


def _register_at_import() -> None:
    from ._support import is_supported, supported_range, tested_versions

    version = _verl_version()
    if version is not None and not is_supported("verl", version):
        msg = (
            f"cfpo_loss: verl {version} is outside the range the verl adapter supports "
            f"(verl{supported_range('verl')}; tested: {tested_versions('verl')}); registering {LOSS_NAMES} anyway, "
            "but its loss signature and agg_loss are not known to match."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        _LOG.warning(msg)
    try:
        register()
        _state["error"] = None
    except Exception as exc:  # noqa: BLE001 - must never break `import verl`; report loudly instead
        _state["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        msg = (
            f"cfpo_loss: could not register the verl policy losses {LOSS_NAMES} "
            f"(loss_mode=cfpo will fail with 'Unsupported loss mode'): {_state['error']}. "
            f"The adapter supports verl{supported_range('verl')} (tested: {tested_versions('verl')}); "
            "run `python -m cfpo_loss` for a diagnosis."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        _LOG.warning(msg)


# ----------------------------------------------------------------------------------------- status
_PROBE = r"""
import json, sys
out = {}
try:
    import verl
    out["verl_version"] = getattr(verl, "__version__", "?")
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
    out["registered"] = {n: (getattr(POLICY_LOSS_REGISTRY.get(n), "__module__", None)) for n in %r}
    mod = sys.modules.get("cfpo_loss.adapters.verl")
    out["error"] = mod.registration_error() if mod is not None else None
except Exception as e:
    out["exception"] = "%%s: %%s" %% (type(e).__name__, e)
print("CFPO_PROBE " + json.dumps(out))
""" % (LOSS_NAMES,)


def _entry_points() -> list:
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10 API, kept for completeness
        eps = importlib.metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return [ep for ep in eps if ep.value.split(":")[0] == __name__]


def verl_loads_entry_points() -> bool | None:
    """Does the installed verl's ``import verl`` load the ``verl.plugins`` entry-point group (verl >= 0.9.0)?

    Read from ``verl/__init__.py`` without importing verl; None when verl is not installed.
    """
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return f'"{ENTRY_POINT_GROUP}"' in f.read()
    except OSError:  # no source: fall back to the release that added it
        from ._support import version_key

        version = _verl_version()
        return version is not None and version_key(version) >= (0, 9, 0)


def _external_modules_lists_us(environ=None) -> bool:
    value = (environ if environ is not None else os.environ).get(EXTERNAL_MODULES_ENV, "")
    return __name__ in {m.strip() for m in value.split(",")}


def loading_mechanism(environ=None) -> str:
    """How a bare ``import verl`` reaches this module here: "entry point", "VERL_USE_EXTERNAL_MODULES", or
    "none" (the mechanism that applies, given the installed verl and ``environ``, default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    policy = environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    by_entry_point = (
        verl_loads_entry_points()
        and bool(_entry_points())
        and policy != "none"
        and (policy == "auto" or ENTRY_POINT_NAME in {p.strip() for p in policy.split(",")})
    )
    if by_entry_point:
        return "entry point"
    if _external_modules_lists_us(environ):
        return EXTERNAL_MODULES_ENV
    return "none"


def plugin_status(fresh_process: bool = True, timeout: float = 300.0) -> str:
    """One human-readable paragraph: is the verl plugin installed, does it register, through what?

    With ``fresh_process`` (default) the decisive check runs what a user's Ray worker runs: a new
    Python process (this environment) that does a bare ``import verl`` (never importing cfpo_loss
    itself) and looks up ``cfpo`` / ``cfpo_seq`` in POLICY_LOSS_REGISTRY (about 15 s: importing verl is
    slow). Otherwise the check runs in this process (where importing this module has already registered
    the losses).
    """
    from ._support import is_supported, supported_range, tested_versions

    verl_version = _verl_version()
    if verl_version is None:
        return "verl is not installed (pip install 'cfpo-loss[verl]' to use loss_mode=cfpo)"
    details = []
    if not is_supported("verl", verl_version):
        details.append(
            f"WARNING: verl {verl_version} is outside the supported range verl{supported_range('verl')} "
            f"(tested: {tested_versions('verl')})"
        )
    mechanism = loading_mechanism()
    has_group = verl_loads_entry_points()
    if has_group:
        eps = _entry_points()
        if eps:
            details.append(f"entry point: [{ENTRY_POINT_GROUP}] {eps[0].name} = {eps[0].value}")
        else:
            details.append(
                f"PROBLEM: no [{ENTRY_POINT_GROUP}] entry point for {__name__} in the installed metadata "
                "(install cfpo-loss with pip rather than putting src/ on PYTHONPATH, or set "
                f"{EXTERNAL_MODULES_ENV}={__name__})"
            )
        policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
        if policy == "none":
            details.append("PROBLEM: VERL_USE_EXTERNAL_PLUGINS=none disables all verl plugins")
        elif policy != "auto" and ENTRY_POINT_NAME not in {p.strip() for p in policy.split(",")}:
            details.append(f"PROBLEM: VERL_USE_EXTERNAL_PLUGINS={policy!r} does not list {ENTRY_POINT_NAME!r}")
        else:
            details.append(f"VERL_USE_EXTERNAL_PLUGINS={policy!r} lets verl load it")
    else:
        details.append(
            f"verl {verl_version} has no [{ENTRY_POINT_GROUP}] entry-point group: it loads this plugin only through "
            f"{EXTERNAL_MODULES_ENV}={__name__}"
        )
        if mechanism == "none":
            details.append(
                f"PROBLEM: {EXTERNAL_MODULES_ENV} does not list {__name__} in this shell. For training, pass "
                f"{HYDRA_OVERRIDE} to verl (reaches every Ray worker); export "
                f"{EXTERNAL_MODULES_ENV}={__name__} to register it in this process too"
            )
        else:
            details.append(
                f"Ray workers: pass {HYDRA_OVERRIDE} to verl's main_ppo (an exported variable reaches only a Ray "
                "cluster the driver starts itself)"
            )
    details.insert(0, f"mechanism: {mechanism}")

    probe = _probe_fresh_process(timeout) if fresh_process else _probe_here()
    if "exception" in probe:
        details.append(f"PROBLEM: {probe['exception']}")
    reg = probe.get("registered", {})
    for n in LOSS_NAMES:
        if reg.get(n) not in (None, __name__):
            details.append(f"PROBLEM: loss_mode={n} is held by {reg[n]}, not cfpo_loss")
    if probe.get("error"):
        details.append(f"cause: {probe['error']}")
    ok = [n for n in LOSS_NAMES if reg.get(n) == __name__]
    where = "a fresh process after a bare `import verl`" if fresh_process else "this process"
    if len(ok) == len(LOSS_NAMES):
        verdict = f"REGISTERED (loss_mode={' / '.join(ok)}) in {where}"
    else:
        missing = ", ".join(n for n in LOSS_NAMES if n not in ok)
        verdict = f"NOT REGISTERED ({missing}) in {where}"
    return "\n".join([verdict, *("  " + d for d in details)])


def _probe_here() -> dict:
    out: dict[str, Any] = {}
    try:
        import verl  # noqa: F401
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

        out["registered"] = {n: getattr(POLICY_LOSS_REGISTRY.get(n), "__module__", None) for n in LOSS_NAMES}
    except Exception as exc:  # noqa: BLE001
        out["exception"] = f"{type(exc).__name__}: {exc}"
    out["error"] = registration_error()
    return out


def _probe_fresh_process(timeout: float) -> dict:
    import json

    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired:
        return {"exception": f"`import verl` in a fresh process took longer than {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("CFPO_PROBE "):
            return json.loads(line[len("CFPO_PROBE ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"exception": f"probe process exited with {proc.returncode}: {' | '.join(tail)}"}


_register_at_import()
