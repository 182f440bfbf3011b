"""The plugin reaches verl with no import of cfpo_loss by the user - through the ``verl.plugins`` entry
point on verl >= 0.9.0, through ``VERL_USE_EXTERNAL_MODULES`` on verl 0.8.0 (which has no entry-point
group); registration is idempotent, and a failure is loud (verl only logs it at DEBUG)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
from verl_helpers import EXTERNAL_MODULES, HAS_ENTRY_POINTS, VERL_VERSION

import cfpo_loss.adapters.verl as plugin

#: what a user of this verl sets so that a bare `import verl` loads the plugin (nothing on verl >= 0.9.0)
SWITCH = {} if HAS_ENTRY_POINTS else EXTERNAL_MODULES
needs_entry_points = pytest.mark.skipif(not HAS_ENTRY_POINTS, reason=f"verl {VERL_VERSION} has no verl.plugins group")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )


BARE_USER = """
    import json, sys
    assert not any(m.startswith("cfpo_loss") for m in sys.modules)
    import torch
    import verl                                          # the only import a verl user does
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig
    out = {"loaded_by_verl": "cfpo_loss.adapters.verl" in sys.modules}
    try:
        fn = get_policy_loss_fn("cfpo")
    except ValueError as e:
        out["error"] = str(e)
    else:
        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                          policy_loss=PolicyLossConfig(loss_mode="cfpo"))
        lp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
        loss, metrics = fn(torch.tensor([[-1.2, -0.4]]), lp, torch.tensor([[1.0, 1.0]]),
                           torch.tensor([[True, True]]), "token-mean", cfg, None)
        loss.backward()
        out["modules"] = {n: POLICY_LOSS_REGISTRY[n].__module__ for n in ("cfpo", "cfpo_seq")}
        out["grad_finite"] = bool(torch.isfinite(lp.grad).all())
        out["metric_keys"] = sorted(metrics)
    # the rollout-correction config step (test_verl_offpolicy.py): the function each PPO entry point calls on the
    # composed config, as that entry point binds it. `python -m verl.trainer.main_ppo` runs the module's code as
    # __main__ after importing the verl package, as runpy does here
    import runpy
    main_ppo = runpy.run_module("verl.trainer.main_ppo", run_name="cfpo_probe")
    import verl.experimental.fully_async_policy.fully_async_main as fully_async
    import verl.experimental.one_step_off_policy.main_ppo as one_step_off
    from verl.trainer.ppo import rollout_corr_helper
    mark = lambda fn: getattr(fn, "__cfpo_loss_plugin__", None)
    out["hooks"] = {"main_ppo": mark(main_ppo["auto_set_device"]), "one_step_off": mark(one_step_off.auto_set_device),
                    "fully_async": mark(fully_async.auto_set_device),
                    "apply_bypass_mode": mark(rollout_corr_helper.apply_bypass_mode)}
    print("RESULT " + json.dumps(out))
"""


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@functools.cache
def bare_user_result() -> dict:
    """BARE_USER's result with this verl's switch, run once per session (importing verl takes ~15 s)."""
    return _result(_python(BARE_USER, **SWITCH))


def test_bare_import_verl_registers_cfpo_in_a_fresh_process():
    out = bare_user_result()
    assert out["loaded_by_verl"]
    assert out["modules"] == {"cfpo": "cfpo_loss.adapters.verl", "cfpo_seq": "cfpo_loss.adapters.verl"}
    assert out["grad_finite"]
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/cfpo/penalty"} <= set(
        out["metric_keys"]
    )


@pytest.mark.skipif(HAS_ENTRY_POINTS, reason=f"verl {VERL_VERSION} loads the entry point")
def test_without_the_switch_verl_0_8_does_not_load_the_plugin():
    """Negative control for verl 0.8.0: the entry point alone is not enough, VERL_USE_EXTERNAL_MODULES is."""
    out = _result(_python(BARE_USER))
    assert not out["loaded_by_verl"]
    assert "Unsupported loss mode: cfpo" in out["error"]


@pytest.mark.parametrize("others", ["", "json,"])
def test_verl_use_external_modules_loads_the_plugin(others):
    """verl's own import hook (every version): also as one of several comma-separated modules."""
    out = _result(
        _python(BARE_USER, VERL_USE_EXTERNAL_MODULES=others + plugin.__name__, VERL_USE_EXTERNAL_PLUGINS="none")
    )
    assert out["loaded_by_verl"]
    assert out["modules"] == {"cfpo": "cfpo_loss.adapters.verl", "cfpo_seq": "cfpo_loss.adapters.verl"}


@needs_entry_points
@pytest.mark.parametrize(
    "policy, registered",
    [("cfpo_loss", True), ("none", False), ("some_other_plugin", False)],
)
def test_verl_use_external_plugins_controls_loading(policy, registered):
    out = _result(_python(BARE_USER, VERL_USE_EXTERNAL_PLUGINS=policy))
    if registered:
        assert out["modules"]["cfpo"] == "cfpo_loss.adapters.verl"
    else:
        assert not out["loaded_by_verl"]
        assert "Unsupported loss mode: cfpo" in out["error"]


def test_entry_point_declared_in_installed_metadata():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="verl.plugins") if ep.name == plugin.ENTRY_POINT_NAME]
    assert len(eps) == 1 and eps[0].value == "cfpo_loss.adapters.verl"
    assert eps[0].load() is plugin  # exactly what verl/__init__.py calls


def test_registration_is_idempotent(verl_registry):
    before = dict(verl_registry)
    for _ in range(3):
        assert plugin.register() == plugin.LOSS_NAMES
    assert verl_registry == before
    assert verl_registry["cfpo"] is plugin.compute_policy_loss_cfpo
    assert verl_registry["cfpo_seq"] is plugin.compute_policy_loss_cfpo_seq


def test_foreign_loss_under_our_name_is_kept_with_a_warning(verl_registry):
    def foreign(*args, **kwargs):  # somebody else's "cfpo"
        raise AssertionError

    verl_registry["cfpo"] = foreign
    with pytest.warns(RuntimeWarning, match="already registered") as caught:
        assert plugin.register() == ("cfpo_seq",)
    assert verl_registry["cfpo"] is foreign
    (warning,) = caught.list
    assert "'cfpo' is already registered by test_verl_plugin." in str(warning.message)
    assert "foreign; leaving it in place (loss_mode=cfpo will NOT be CFPO)" in str(warning.message)
    assert warning.filename == __file__  # attributed to the caller of register()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plugin.register(override=True) == plugin.LOSS_NAMES
    assert verl_registry["cfpo"] is plugin.compute_policy_loss_cfpo


BROKEN_VERL = """
    import importlib.abc, json, sys, warnings

    class Broken(importlib.abc.MetaPathFinder):      # simulates an incompatible / broken verl install
        def find_spec(self, name, path=None, target=None):
            if name == "verl.trainer.ppo.core_algos":
                raise ImportError("simulated: core_algos is broken")

    sys.meta_path.insert(0, Broken())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import verl                                  # loads our entry point, which must complain
    mod = sys.modules.get("cfpo_loss.adapters.verl")
    print("RESULT " + json.dumps({
        "loaded": mod is not None,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "error": mod.registration_error() if mod else None,
        "status": mod.plugin_status(fresh_process=False) if mod else None,
    }))
"""


def test_registration_failure_is_loud_and_diagnosed():
    proc = _python(BROKEN_VERL, **SWITCH)
    out = _result(proc)
    assert out["loaded"]
    assert any("could not register" in w and "simulated: core_algos is broken" in w for w in out["warnings"])
    assert "simulated: core_algos is broken" in out["error"]
    assert out["status"].startswith("NOT REGISTERED")
    assert "cause:" in out["status"]
    # also on the logging channel (what a Ray worker's log shows), at WARNING level
    assert "could not register" in proc.stderr


@needs_entry_points
def test_plugin_status_reports_a_disabled_plugin(monkeypatch):
    monkeypatch.setenv("VERL_USE_EXTERNAL_PLUGINS", "none")
    monkeypatch.delenv("VERL_USE_EXTERNAL_MODULES", raising=False)
    status = plugin.plugin_status()
    assert status.startswith("NOT REGISTERED") and "VERL_USE_EXTERNAL_PLUGINS=none" in status
    assert "mechanism: none" in status


@pytest.mark.skipif(HAS_ENTRY_POINTS, reason=f"verl {VERL_VERSION} loads the entry point")
def test_plugin_status_tells_a_verl_0_8_user_the_switch(monkeypatch):
    monkeypatch.delenv("VERL_USE_EXTERNAL_MODULES", raising=False)
    status = plugin.plugin_status()
    assert status.startswith("NOT REGISTERED") and "mechanism: none" in status
    assert f"verl {VERL_VERSION} has no [verl.plugins] entry-point group" in status
    assert plugin.HYDRA_OVERRIDE in status and "export VERL_USE_EXTERNAL_MODULES=cfpo_loss.adapters.verl" in status


def test_python_m_cfpo_loss_reports_the_plugin_and_its_mechanism():
    """`python -m cfpo_loss` calls plugin_status(), which checks a fresh bare `import verl`."""
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    env.update(SWITCH)
    proc = subprocess.run([sys.executable, "-m", "cfpo_loss"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "verl plugin: REGISTERED (loss_mode=cfpo / cfpo_seq) in a fresh process" in proc.stdout
    mechanism = "entry point" if HAS_ENTRY_POINTS else "VERL_USE_EXTERNAL_MODULES"
    assert f"  mechanism: {mechanism}\n" in proc.stdout
    if not HAS_ENTRY_POINTS:
        assert plugin.HYDRA_OVERRIDE in proc.stdout  # how to reach the Ray workers


def test_loading_mechanism_follows_the_environment():
    on = {"VERL_USE_EXTERNAL_MODULES": "cfpo_loss.adapters.verl"}
    if HAS_ENTRY_POINTS:
        assert plugin.loading_mechanism({}) == "entry point"
        assert plugin.loading_mechanism({"VERL_USE_EXTERNAL_PLUGINS": "none"}) == "none"
        assert plugin.loading_mechanism({"VERL_USE_EXTERNAL_PLUGINS": "none", **on}) == "VERL_USE_EXTERNAL_MODULES"
    else:
        assert plugin.verl_loads_entry_points() is False
        assert plugin.loading_mechanism({}) == "none"
        assert plugin.loading_mechanism(on) == "VERL_USE_EXTERNAL_MODULES"
        assert plugin.loading_mechanism({"VERL_USE_EXTERNAL_MODULES": "a.b, cfpo_loss.adapters.verl"}) != "none"


UNSUPPORTED_VERL = """
    import importlib.metadata, json, warnings
    real = importlib.metadata.version
    importlib.metadata.version = lambda d: "0.7.1" if d == "verl" else real(d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import cfpo_loss.adapters.verl as plugin
    print("RESULT " + json.dumps({"warnings": [str(w.message) for w in caught], "error": plugin.registration_error()}))
"""


def test_an_unsupported_verl_is_warned_about_naming_the_range():
    out = _result(_python(UNSUPPORTED_VERL))
    assert any("verl 0.7.1 is outside" in w and ">=0.8.0,<0.10" in w for w in out["warnings"]), out
    assert out["error"] is None  # registered anyway: the warning, not a refusal, is the contract
