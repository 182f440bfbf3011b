"""`python -m cfpo_loss.adapters.trl_check`: says precisely whether the installed TRL's GRPOTrainer._compute_loss is
the text CFPOTrainer mirrors, and shows the diff when it is not (so a TRL bump is a reviewed diff)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import trl
from trl import GRPOTrainer

from cfpo_loss.adapters import trl as adapter
from cfpo_loss.adapters import trl_check
from cfpo_loss.adapters._support import SUPPORTED


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cfpo_loss.adapters.trl_check", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_stored_mirror_is_what_the_guard_pins_and_what_trl_ships():
    stored = trl_check.mirrored_source()
    assert trl_check.sha256(stored) == adapter._MIRRORED_SHA256
    assert trl_check.MIRRORED_TRL_VERSION == trl.__version__ == SUPPORTED["trl"][0]
    assert stored == inspect.getsource(GRPOTrainer._compute_loss)


def test_installed_trl_matches():
    proc = _cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"MATCH: installed trl {trl.__version__} GRPOTrainer._compute_loss: sha256 "
                                  f"{adapter._MIRRORED_SHA256}")  # fmt: skip


def test_source_extraction_equals_inspect():
    path = inspect.getsourcefile(GRPOTrainer)
    with open(path, encoding="utf-8") as f:
        assert trl_check.method_source(f.read()) == inspect.getsource(GRPOTrainer._compute_loss)


def test_a_changed_trl_is_reported_with_the_diff(tmp_path):
    """A future TRL (simulated: the installed grpo_trainer.py with two lines of _compute_loss changed, one other
    method changed too) is named DIFFERS, with exactly those lines in a unified diff, exit status 1."""
    with open(inspect.getsourcefile(GRPOTrainer), encoding="utf-8") as f:
        text = f.read()
    old_line = "        coef_1 = torch.exp(log_importance_weights)\n"
    new_line = "        coef_1 = torch.exp(log_importance_weights.clamp(max=20.0))\n"
    assert text.count(old_line) == 1
    text = text.replace(old_line, new_line)
    text = text.replace("            policy_loss = loss.detach()\n", "            policy_loss = loss.detach().float()\n", 1)
    text = text.replace("    def _get_per_token_logps_and_entropies(", "    def _get_per_token_logps_and_entropies(  # x\n", 1)
    new_file = tmp_path / "grpo_trainer.py"
    new_file.write_text(text)

    proc = _cli("--source", str(new_file))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith(f"DIFFERS: {new_file} GRPOTrainer._compute_loss")
    assert "4 line(s) removed or added" in out
    assert f"--- trl {trl_check.MIRRORED_TRL_VERSION} GRPOTrainer._compute_loss (mirrored by CFPOTrainer)" in out
    assert "-" + old_line in out and "+" + new_line in out
    assert "+            policy_loss = loss.detach().float()\n" in out
    assert "_get_per_token_logps_and_entropies(  # x" not in out  # only the mirrored method is compared
    assert "bump procedure" in out


def test_cannot_check_is_its_own_status(tmp_path):
    empty = tmp_path / "grpo_trainer.py"
    empty.write_text("class Other:\n    pass\n")
    proc = _cli("--source", str(empty))
    assert proc.returncode == 2 and "CANNOT CHECK" in proc.stderr and "no class GRPOTrainer" in proc.stderr


def test_update_stores_the_installed_text(monkeypatch, tmp_path, capsys):
    target = tmp_path / "mirror.txt"
    monkeypatch.setattr(trl_check, "MIRROR_PATH", target)
    assert trl_check.main(["--update"]) == 0
    assert target.read_text() == inspect.getsource(GRPOTrainer._compute_loss)
    assert adapter._MIRRORED_SHA256 in capsys.readouterr().out


def test_guard_error_points_at_the_check(monkeypatch):
    import pytest

    monkeypatch.setattr(adapter, "_MIRRORED_SHA256", "0" * 64)
    monkeypatch.delenv("CFPO_LOSS_ALLOW_UNSUPPORTED_TRL", raising=False)
    with pytest.raises(ImportError, match="python -m cfpo_loss.adapters.trl_check"):
        adapter._check_trl_version()
