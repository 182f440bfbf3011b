"""`python -m cfpo_loss.adapters.trl_check`: says precisely whether the installed TRL's GRPOTrainer._compute_loss and
RLOOTrainer._compute_loss are the texts CFPOTrainer / CFPORLOOTrainer mirror, and shows the diff when one is not (so
a TRL bump is a reviewed diff); the RLOO copy's departures from TRL's text are the stored patch, hunk for hunk."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trl
from trl import GRPOTrainer, RLOOTrainer

from cfpo_loss.adapters import trl_check
from cfpo_loss.adapters._support import SUPPORTED
from cfpo_loss.adapters.trl import _guard


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cfpo_loss.adapters.trl_check", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_stored_mirror_is_what_the_guard_pins_and_what_trl_ships():
    stored = trl_check.mirrored_source()
    assert trl_check.sha256(stored) == _guard.MIRRORED_SHA256["GRPOTrainer"]
    assert trl_check.MIRRORED_TRL_VERSION == trl.__version__ == SUPPORTED["trl"][0]
    assert stored == inspect.getsource(GRPOTrainer._compute_loss)


def test_stored_rloo_mirror_is_what_the_guard_pins_and_what_trl_ships():
    stored = trl_check.mirrored_source("RLOOTrainer")
    assert trl_check.sha256(stored) == _guard.MIRRORED_SHA256["RLOOTrainer"]
    assert stored == inspect.getsource(RLOOTrainer._compute_loss)


def test_installed_trl_matches():
    proc = _cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"MATCH: installed trl {trl.__version__} GRPOTrainer._compute_loss: sha256 "
                                  f"{_guard.MIRRORED_SHA256['GRPOTrainer']}")  # fmt: skip
    assert (f"\nMATCH: installed trl {trl.__version__} RLOOTrainer._compute_loss: sha256 "
            f"{_guard.MIRRORED_SHA256['RLOOTrainer']}\n  is exactly the trl 1.16.0 text that "
            "CFPORLOOTrainer._compute_loss mirrors") in proc.stdout  # fmt: skip


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
    text = text.replace(
        "            policy_loss = loss.detach()\n", "            policy_loss = loss.detach().float()\n", 1
    )
    text = text.replace(
        "    def _get_per_token_logps_and_entropies(", "    def _get_per_token_logps_and_entropies(  # x\n", 1
    )
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
    """mirror/RLOOTrainer._compute_loss.patch is exactly the diff from TRL's text to CFPORLOOTrainer._compute_loss:
    a departure added to the code without the patch (or the reverse) fails here."""
    stored = trl_check.patch_path("RLOOTrainer").read_text(encoding="utf-8")
    assert stored == trl_check.departures_patch("RLOOTrainer")
    assert stored.count("\n@@ ") + stored.startswith("@@ ") == 3  # three small hunks: docstring, objective, metrics
    code = (Path(_guard.__file__).parent / "_rloo_mirror.py").read_text(encoding="utf-8")
    changed = code.replace("        loss = per_sequence_loss.mean()\n", "        loss = per_sequence_loss.sum()\n", 1)
    assert changed != code and trl_check.departures_patch("RLOOTrainer", changed) != stored


def test_update_stores_the_installed_texts(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trl_check, "MIRROR_DIR", tmp_path)
    assert trl_check.main(["--update"]) == 0
    assert (tmp_path / "GRPOTrainer._compute_loss.txt").read_text() == inspect.getsource(GRPOTrainer._compute_loss)
    assert (tmp_path / "RLOOTrainer._compute_loss.txt").read_text() == inspect.getsource(RLOOTrainer._compute_loss)
    assert (tmp_path / "RLOOTrainer._compute_loss.patch").read_text() == trl_check.departures_patch("RLOOTrainer")
    out = capsys.readouterr().out
    assert all(pin in out for pin in _guard.MIRRORED_SHA256.values())


@pytest.mark.parametrize("method", ["GRPOTrainer", "RLOOTrainer"])
def test_guard_error_points_at_the_check(monkeypatch, method):
    monkeypatch.setitem(_guard.MIRRORED_SHA256, method, "0" * 64)
    monkeypatch.delenv("CFPO_LOSS_ALLOW_UNSUPPORTED_TRL", raising=False)
    expected = rf"trl\.{method}\._compute_loss differs .*python -m cfpo_loss.adapters.trl_check"
    with pytest.raises(ImportError, match=expected):
        _guard.check_trl_version()


# ---- the patches: our method is TRL's text plus the stored patch -----------------------------------------------------


@pytest.mark.parametrize("cls,hunks", [("GRPOTrainer", 3), ("RLOOTrainer", 3)])
def test_our_method_is_trl_text_plus_the_stored_patch(cls, hunks):
    """mirror/<Class>._compute_loss.patch applied to TRL's stored text gives exactly the adapter's method (read from
    its module, not imported), and is the canonical diff --update writes: a line changed in the method without the
    patch, or the reverse, fails here. GRPO: docstring + fused hand-over, objective, metrics; RLOO: docstring,
    objective, metrics."""
    stored = trl_check.patch_path(cls).read_text(encoding="utf-8")
    ours = trl_check.adapter_source(cls)
    assert ours.startswith("    def _compute_loss(self, model, inputs):\n")
    assert trl_check.apply_patch(trl_check.mirrored_source(cls), stored) == ours
    assert trl_check.apply_patch(inspect.getsource(getattr(trl, cls)._compute_loss), stored) == ours
    assert stored == trl_check.departures_patch(cls)
    assert len(re.findall(r"^@@ ", stored, flags=re.M)) == hunks
    # every line we add says why: a "# CFPO:" comment or the docstring pointing at them sits in each hunk
    for hunk in re.split(r"^@@ .*\n", stored, flags=re.M)[1:]:
        assert "CFPO" in hunk, hunk


def test_apply_patch_finds_moved_hunks_and_names_one_that_does_not_apply():
    """The bump step: TRL's new text with lines inserted above a hunk still takes the patch (the hunk is found where
    its lines moved, as `patch` does); a change inside a hunk's lines makes it fail by name, never a silent merge."""
    cls = "RLOOTrainer"
    patch = trl_check.patch_path(cls).read_text(encoding="utf-8")
    text = trl_check.mirrored_source(cls)
    anchor = "        logps = (per_token_logps * completion_mask).sum(1)"
    inserted = "        # a new TRL comment\n        # over two lines\n"
    shifted = text.replace(anchor, inserted + anchor, 1)
    assert shifted != text
    ours = trl_check.apply_patch(shifted, patch)
    assert ours == trl_check.adapter_source(cls).replace(anchor, inserted + anchor, 1)
    old_line = "        coef_1 = torch.exp(log_ratio)\n"
    conflicting = text.replace(old_line, "        coef_1 = torch.exp(log_ratio.clamp(max=20))\n")
    assert conflicting != text
    with pytest.raises(ValueError, match=r"hunk 2 \(@@ -\d+,\d+ \+\d+,\d+ @@\) does not apply"):
        trl_check.apply_patch(conflicting, patch)


def test_apply_cli_prints_the_new_method(tmp_path):
    """--apply on a newer TRL (simulated: two lines inserted into GRPOTrainer._compute_loss): the new CFPOTrainer
    method, exit 0; with a line changed inside a hunk: DOES NOT APPLY naming the hunk, exit 1."""
    with open(inspect.getsourcefile(GRPOTrainer), encoding="utf-8") as f:
        text = f.read()
    anchor = "        if self.top_entropy_quantile < 1.0:\n"
    assert text.count(anchor) == 1
    new_file = tmp_path / "grpo_trainer.py"
    new_file.write_text(text.replace(anchor, "        x = 1  # new in TRL\n" + anchor))
    proc = _cli("--source", str(new_file), "--apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = trl_check.adapter_source("GRPOTrainer").replace(anchor, "        x = 1  # new in TRL\n" + anchor)
    assert proc.stdout == (
        f"APPLIED: {new_file} GRPOTrainer._compute_loss + GRPOTrainer._compute_loss.patch, the new "
        "CFPOTrainer._compute_loss (for cfpo_loss/adapters/trl/_grpo_mirror.py):\n" + expected
    )
    old = "        # Log the metrics\n        def masked_seq_mean(x):\n"
    assert text.count(old) == 1
    new_file.write_text(text.replace(old, "        # Log the metrics (new)\n        def masked_seq_mean(x):\n"))
    proc = _cli("--source", str(new_file), "--apply")
    assert proc.returncode == 1 and proc.stdout.startswith(f"DOES NOT APPLY: {new_file} GRPOTrainer._compute_loss")
    assert "hunk 3" in proc.stdout and "_grpo_mirror.py" in proc.stdout
