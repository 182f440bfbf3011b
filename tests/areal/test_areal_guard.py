"""The guard over the AReaL code the adapter relies on, its check command, and ``python -m cfpo_loss``'s report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cfpo_loss.adapters import areal_check
from cfpo_loss.adapters._metric_names import framework_keys
from cfpo_loss.adapters.areal import _guard


def test_installed_areal_matches_every_fingerprint():
    assert areal_check.problems() == []
    for fp in areal_check.FINGERPRINTS:
        stored = areal_check.stored_text(fp)  # the reviewable text ships with the package
        assert areal_check.sha256(stored) == fp.sha256, fp.name
        assert areal_check.installed_text(fp) == stored, fp.name


def test_a_changed_areal_function_is_refused_by_name(monkeypatch):
    changed = areal_check.FINGERPRINTS[3]
    real = areal_check.installed_text
    monkeypatch.setattr(areal_check, "installed_text", lambda fp: real(fp) + ("# changed\n" if fp is changed else ""))
    with pytest.raises(ImportError, match=changed.qualname) as refused:
        _guard.check_areal()
    assert "areal_check" in str(refused.value) and len(areal_check.problems()) == 1
    monkeypatch.setenv(_guard.ALLOW_ENV, "1")
    with pytest.warns(RuntimeWarning, match=changed.qualname):
        _guard.check_areal()


def test_an_areal_outside_the_supported_range_is_refused(monkeypatch):
    monkeypatch.setattr("cfpo_loss.adapters._support.installed_version", lambda dist: "1.1.0")
    with pytest.raises(ImportError, match=r"areal==1\.1\.0 is outside the supported range"):
        _guard.check_areal()


@pytest.mark.parametrize("from_file", [True, False], ids=["changed-text", "no-source"])
def test_the_import_refuses_when_areals_loss_changed(tmp_path, from_file):
    """The real import path: AReaL's ppo_actor_loss_fn replaced in the process (by a function with a different text,
    or by one whose source cannot be read), then the adapter imported."""
    replacement = "def ppo_actor_loss_fn(*args, **kwargs):\n    return None\n"
    (tmp_path / "changed_areal_loss.py").write_text(replacement)
    define = "from changed_areal_loss import ppo_actor_loss_fn\n" if from_file else replacement
    code = (
        "import areal.utils.functional.functional as f\n" + define + "f.ppo_actor_loss_fn = ppo_actor_loss_fn\n"
        "try:\n    import cfpo_loss.adapters.areal\nexcept ImportError as e:\n    print('REFUSED', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    expected = "ppo_actor_loss_fn differs" if from_file else "ppo_actor_loss_fn: its source cannot be read"
    assert "REFUSED" in out and expected in out, out


def test_check_command(capsys, monkeypatch):
    assert areal_check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("MATCH: ") == len(areal_check.FINGERPRINTS)
    changed = areal_check.FINGERPRINTS[0]
    real = areal_check.installed_text
    monkeypatch.setattr(areal_check, "installed_text", lambda fp: real(fp).replace("loss_mask", "mask", 1))
    assert areal_check.main([]) == 1
    out = capsys.readouterr().out
    assert f"DIFFERS: {changed.name}" in out and "\n-" in out and "\n+" in out  # the diff to review


def test_python_m_cfpo_loss_reports_the_areal_adapter():
    out = subprocess.run([sys.executable, "-m", "cfpo_loss"], capture_output=True, text=True, check=True).stdout
    assert "areal: 1.0.4 (supported" in out
    assert "areal adapter: READY" in out


def test_every_areal_key_of_the_metric_table_is_logged_under_that_name():
    """The table's AReaL keys are the stat names AReaL's grpo_loss_fn logs from policy_loss_fn's stat dict."""
    text = areal_check.stored_text(next(fp for fp in areal_check.FINGERPRINTS if fp.qualname == "grpo_loss_fn"))
    for core, key in framework_keys("areal").items():
        name = key.split("/")[0]
        assert f"        {name}=stat[" in text, (core, key)
