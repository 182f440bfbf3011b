"""The verl plugin's identity: the one constant its entry-point, registry and VERL_USE_EXTERNAL_MODULES checks
compare with must be the module verl imports, which is what the entry point and the 0.8.0 switch name. Runs
without verl (the adapter imports; its registration then warns that it cannot register)."""

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_plugin_module_is_the_package_and_the_entry_point():
    tomllib = pytest.importorskip("tomllib")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without verl: "could not register the verl policy losses"
        import cfpo_loss.adapters.verl as plugin

    assert plugin.PLUGIN_MODULE == plugin.__name__ == "cfpo_loss.adapters.verl"
    assert plugin.compute_policy_loss_cfpo.__module__ == plugin.PLUGIN_MODULE  # what the registry check reads
    assert plugin.HYDRA_OVERRIDE.endswith(f"VERL_USE_EXTERNAL_MODULES={plugin.PLUGIN_MODULE}")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["entry-points"]["verl.plugins"] == {plugin.ENTRY_POINT_NAME: plugin.PLUGIN_MODULE}
