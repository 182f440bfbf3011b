"""``plugin_status()`` (what ``python -m cfpo_loss`` prints for verl): is the plugin installed, does a bare
``import verl`` register it, and through which mechanism.

verl >= 0.9.0 loads every entry point of the ``verl.plugins`` group on ``import verl`` (filtered by
``VERL_USE_EXTERNAL_PLUGINS``: "auto" by default, "none", or a comma list of entry-point names); verl 0.8.0 has no
such group and imports only the modules listed in ``VERL_USE_EXTERNAL_MODULES``. The decisive check runs what a Ray
worker runs: a fresh process that imports verl, never cfpo_loss, and looks the losses up in verl's registry.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from typing import Any

from ._common import (
    ENTRY_POINT_GROUP,
    ENTRY_POINT_NAME,
    EXTERNAL_MODULES_ENV,
    HYDRA_OVERRIDE,
    LOSS_NAMES,
    PLUGIN_MODULE,
    verl_version,
)
from ._registration import registration_error

_PROBE = r"""
import json, sys
out = {}
try:
    import verl
    out["verl_version"] = getattr(verl, "__version__", "?")
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
    out["registered"] = {n: (getattr(POLICY_LOSS_REGISTRY.get(n), "__module__", None)) for n in %r}
    mod = sys.modules.get(%r)
    out["error"] = mod.registration_error() if mod is not None else None
except Exception as e:
    out["exception"] = "%%s: %%s" %% (type(e).__name__, e)
print("CFPO_PROBE " + json.dumps(out))
""" % (LOSS_NAMES, PLUGIN_MODULE)  # noqa: UP031 - a %-template: the probe's own % are escaped above


def _entry_points() -> list:
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10 API, kept for completeness
        eps = importlib.metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return [ep for ep in eps if ep.value.split(":")[0] == PLUGIN_MODULE]


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
        from .._support import version_key

        version = verl_version()
        return version is not None and version_key(version) >= (0, 9, 0)


def _external_modules_lists_us(environ=None) -> bool:
    value = (environ if environ is not None else os.environ).get(EXTERNAL_MODULES_ENV, "")
    return PLUGIN_MODULE in {m.strip() for m in value.split(",")}


def _plugins_policy(environ) -> str:
    return environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()


def _policy_lists_us(policy: str) -> bool:
    return policy == "auto" or ENTRY_POINT_NAME in {p.strip() for p in policy.split(",")}


def loading_mechanism(environ=None) -> str:
    """How a bare ``import verl`` reaches this module here: "entry point", "VERL_USE_EXTERNAL_MODULES", or
    "none" (the mechanism that applies, given the installed verl and ``environ``, default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    policy = _plugins_policy(environ)
    by_entry_point = (
        verl_loads_entry_points() and bool(_entry_points()) and policy != "none" and _policy_lists_us(policy)
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
    from .._support import is_supported, supported_range, tested_versions

    version = verl_version()
    if version is None:
        return "verl is not installed (pip install 'cfpo-loss[verl]' to use loss_mode=cfpo)"
    details = [f"mechanism: {loading_mechanism()}"]
    if not is_supported("verl", version):
        details.append(
            f"WARNING: verl {version} is outside the supported range verl{supported_range('verl')} "
            f"(tested: {tested_versions('verl')})"
        )
    if verl_loads_entry_points():
        details += _entry_point_details()
    else:
        details += _external_modules_details(version)
    probe = _probe_fresh_process(timeout) if fresh_process else _probe_here()
    verdict, problems = _registry_verdict(probe, fresh_process)
    return "\n".join([verdict, *("  " + d for d in details + problems)])


def _entry_point_details() -> list[str]:
    """verl >= 0.9.0: is our entry point installed, and does VERL_USE_EXTERNAL_PLUGINS let verl load it?"""
    eps = _entry_points()
    if eps:
        details = [f"entry point: [{ENTRY_POINT_GROUP}] {eps[0].name} = {eps[0].value}"]
    else:
        details = [
            f"PROBLEM: no [{ENTRY_POINT_GROUP}] entry point for {PLUGIN_MODULE} in the installed metadata "
            "(install cfpo-loss with pip rather than putting src/ on PYTHONPATH, or set "
            f"{EXTERNAL_MODULES_ENV}={PLUGIN_MODULE})"
        ]
    policy = _plugins_policy(os.environ)
    if policy == "none":
        details.append("PROBLEM: VERL_USE_EXTERNAL_PLUGINS=none disables all verl plugins")
    elif not _policy_lists_us(policy):
        details.append(f"PROBLEM: VERL_USE_EXTERNAL_PLUGINS={policy!r} does not list {ENTRY_POINT_NAME!r}")
    else:
        details.append(f"VERL_USE_EXTERNAL_PLUGINS={policy!r} lets verl load it")
    return details


def _external_modules_details(version: str) -> list[str]:
    """verl 0.8.0: only VERL_USE_EXTERNAL_MODULES loads the plugin; how to reach the driver and the Ray workers."""
    details = [
        f"verl {version} has no [{ENTRY_POINT_GROUP}] entry-point group: it loads this plugin only through "
        f"{EXTERNAL_MODULES_ENV}={PLUGIN_MODULE}"
    ]
    if not _external_modules_lists_us():
        details.append(
            f"PROBLEM: {EXTERNAL_MODULES_ENV} does not list {PLUGIN_MODULE} in this shell. For training, pass "
            f"{HYDRA_OVERRIDE} to verl (reaches every Ray worker); export "
            f"{EXTERNAL_MODULES_ENV}={PLUGIN_MODULE} to register it in this process too"
        )
    else:
        details.append(
            f"Ray workers: pass {HYDRA_OVERRIDE} to verl's main_ppo (an exported variable reaches only a Ray "
            "cluster the driver starts itself)"
        )
    return details


def _registry_verdict(probe: dict, fresh_process: bool) -> tuple[str, list[str]]:
    """REGISTERED / NOT REGISTERED from what the probe found in verl's registry, and the problems it saw."""
    problems = []
    if "exception" in probe:
        problems.append(f"PROBLEM: {probe['exception']}")
    reg = probe.get("registered", {})
    for n in LOSS_NAMES:
        if reg.get(n) not in (None, PLUGIN_MODULE):
            problems.append(f"PROBLEM: loss_mode={n} is held by {reg[n]}, not cfpo_loss")
    if probe.get("error"):
        problems.append(f"cause: {probe['error']}")
    ok = [n for n in LOSS_NAMES if reg.get(n) == PLUGIN_MODULE]
    where = "a fresh process after a bare `import verl`" if fresh_process else "this process"
    if len(ok) == len(LOSS_NAMES):
        return f"REGISTERED (loss_mode={' / '.join(ok)}) in {where}", problems
    missing = ", ".join(n for n in LOSS_NAMES if n not in ok)
    return f"NOT REGISTERED ({missing}) in {where}", problems


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
