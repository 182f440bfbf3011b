"""`python -m cfpo_loss.adapters.trl_check`: says precisely whether the installed TRL's GRPOTrainer._compute_loss and
RLOOTrainer._compute_loss are the texts CFPOTrainer / CFPORLOOTrainer mirror, and shows the diff when one is not (so
a TRL bump is a reviewed diff); the RLOO copy's departures from TRL's text are the stored patch, hunk for hunk."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trl
from trl import GRPOTrainer, RLOOTrainer

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


def test_stored_rloo_mirror_is_what_the_guard_pins_and_what_trl_ships():
    stored = trl_check.mirrored_source("RLOOTrainer")
    assert trl_check.sha256(stored) == adapter._RLOO_MIRRORED_SHA256
    assert stored == inspect.getsource(RLOOTrainer._compute_loss)


def test_installed_trl_matches():
    proc = _cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"MATCH: installed trl {trl.__version__} GRPOTrainer._compute_loss: sha256 "
                                  f"{adapter._MIRRORED_SHA256}")  # fmt: skip
    assert (f"\nMATCH: installed trl {trl.__version__} RLOOTrainer._compute_loss: sha256 "
            f"{adapter._RLOO_MIRRORED_SHA256}\n  is exactly the trl 1.16.0 text that CFPORLOOTrainer._compute_loss "
            "mirrors") in proc.stdout  # fmt: skip


@pytest.mark.parametrize("cls", [GRPOTrainer, RLOOTrainer])
def test_source_extraction_equals_inspect(cls):
    with open(inspect.getsourcefile(cls), encoding="utf-8") as f:
        assert trl_check.method_source(f.read(), cls.__name__) == inspect.getsource(cls._compute_loss)


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
    assert proc.returncode == 2 and "CANNOT CHECK" in proc.stderr
    assert "no class GRPOTrainer or RLOOTrainer" in proc.stderr


def _changed_rloo(text: str) -> tuple[str, str, str]:
    old_line = "        loss = per_sequence_loss.mean()\n"
    new_line = "        loss = per_sequence_loss.sum() / per_sequence_loss.numel()\n"
    assert text.count(old_line) == 1
    return text.replace(old_line, new_line), old_line, new_line


def test_a_changed_rloo_trainer_is_reported_with_the_diff(tmp_path):
    with open(inspect.getsourcefile(RLOOTrainer), encoding="utf-8") as f:
        text, old_line, new_line = _changed_rloo(f.read())
    new_file = tmp_path / "rloo_trainer.py"
    new_file.write_text(text)
    proc = _cli("--source", str(new_file))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith(f"DIFFERS: {new_file} RLOOTrainer._compute_loss") and "GRPOTrainer" not in out
    assert "2 line(s) removed or added" in out and "-" + old_line in out and "+" + new_line in out
    assert f"--- trl {trl_check.MIRRORED_TRL_VERSION} RLOOTrainer._compute_loss (mirrored by CFPORLOOTrainer)" in out
    assert "apply it to CFPORLOOTrainer._compute_loss" in out


def test_a_trl_folder_checks_both_methods(tmp_path):
    """--source a trl/ folder (an unpacked newer wheel): both methods are checked; one changed is exit status 1."""
    installed = Path(inspect.getsourcefile(GRPOTrainer)).parent  # site-packages/trl/trainer
    new_trl = tmp_path / "trl"
    (new_trl / "trainer").mkdir(parents=True)
    shutil.copy(installed / "grpo_trainer.py", new_trl / "trainer" / "grpo_trainer.py")
    text, _, _ = _changed_rloo((installed / "rloo_trainer.py").read_text(encoding="utf-8"))
    (new_trl / "trainer" / "rloo_trainer.py").write_text(text)
    proc = _cli("--source", str(new_trl))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"MATCH: {new_trl / 'trainer' / 'grpo_trainer.py'} GRPOTrainer._compute_loss")
    assert f"\nDIFFERS: {new_trl / 'trainer' / 'rloo_trainer.py'} RLOOTrainer._compute_loss" in proc.stdout
    shutil.copy(installed / "rloo_trainer.py", new_trl / "trainer" / "rloo_trainer.py")
    proc = _cli("--source", str(new_trl / "trainer"))
    assert proc.returncode == 0 and proc.stdout.count("MATCH: ") == 2, proc.stdout + proc.stderr


def test_stored_rloo_patch_is_the_code():
    """trl_mirror/RLOOTrainer._compute_loss.patch is exactly the diff from TRL's text to CFPORLOOTrainer._compute_loss:
    a departure added to the code without the patch (or the reverse) fails here."""
    stored = trl_check.patch_path("RLOOTrainer").read_text(encoding="utf-8")
    assert stored == trl_check.departures_patch("RLOOTrainer")
    assert stored.count("\n@@ ") + stored.startswith("@@ ") == 3  # three small hunks: docstring, objective, metrics
    code = Path(adapter.__file__).read_text(encoding="utf-8")
    changed = code.replace("        loss = per_sequence_loss.mean()\n", "        loss = per_sequence_loss.sum()\n", 1)
    assert changed != code and trl_check.departures_patch("RLOOTrainer", changed) != stored


def test_update_stores_the_installed_texts(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trl_check, "MIRROR_DIR", tmp_path)
    assert trl_check.main(["--update"]) == 0
    assert (tmp_path / "GRPOTrainer._compute_loss.txt").read_text() == inspect.getsource(GRPOTrainer._compute_loss)
    assert (tmp_path / "RLOOTrainer._compute_loss.txt").read_text() == inspect.getsource(RLOOTrainer._compute_loss)
    assert (tmp_path / "RLOOTrainer._compute_loss.patch").read_text() == trl_check.departures_patch("RLOOTrainer")
    out = capsys.readouterr().out
    assert adapter._MIRRORED_SHA256 in out and adapter._RLOO_MIRRORED_SHA256 in out


@pytest.mark.parametrize("pin,method", [("_MIRRORED_SHA256", "GRPOTrainer"), ("_RLOO_MIRRORED_SHA256", "RLOOTrainer")])
def test_guard_error_points_at_the_check(monkeypatch, pin, method):
    monkeypatch.setattr(adapter, pin, "0" * 64)
    monkeypatch.delenv("CFPO_LOSS_ALLOW_UNSUPPORTED_TRL", raising=False)
    expected = rf"trl\.{method}\._compute_loss differs .*python -m cfpo_loss.adapters.trl_check"
    with pytest.raises(ImportError, match=expected):
        adapter._check_trl_version()
