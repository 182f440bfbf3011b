"""examples/stability_demo.py --quick: the outputs exist and are well-formed (not their values), and a run is
exactly reproducible from its seed. Runs the script as a user does, in a subprocess, with the real TRL."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "stability_demo.py"
COLUMNS = [
    "objective", "num_iterations", "step", "round", "reward", "ratio_dev", "max_abs_ratio_dev",
    "exit_frac", "entropy", "kl_old", "kl_consecutive", "loss",
]  # fmt: skip
QUICK_ROUNDS, ITERATIONS, OBJECTIVES = 3, (1, 4, 16), ("clip", "cfpo")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"stability_demo.py failed:\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    return proc


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability_quick")
    proc = _run(out, "--quick")
    return out, proc


def test_quick_writes_every_output(quick_run):
    out, _ = quick_run
    for name in ("metrics.csv", "stability.png", "summary.md", "objectives.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_metrics_csv_is_well_formed(quick_run):
    out, _ = quick_run
    header, rows = _read_csv(out / "metrics.csv")
    assert header == COLUMNS
    # one row per optimizer step of every run: num_iterations steps per generation round
    assert len(rows) == len(OBJECTIVES) * QUICK_ROUNDS * sum(ITERATIONS)
    runs = {}
    for row in rows:
        runs.setdefault((row["objective"], int(row["num_iterations"])), []).append(row)
    assert set(runs) == {(o, k) for o in OBJECTIVES for k in ITERATIONS}
    for (objective, k), run in runs.items():
        assert [int(r["step"]) for r in run] == list(range(1, QUICK_ROUNDS * k + 1)), (objective, k)
        assert [int(r["round"]) for r in run] == [(s - 1) // k + 1 for s in range(1, QUICK_ROUNDS * k + 1)]
        for r in run:
            for key in ("reward", "ratio_dev", "max_abs_ratio_dev", "exit_frac", "entropy", "kl_old", "loss"):
                assert math.isfinite(float(r[key])), (objective, k, r["step"], key, r[key])
            assert 0.0 <= float(r["reward"]) <= 1.0
            assert 0.0 <= float(r["exit_frac"]) <= 1.0
            assert float(r["ratio_dev"]) >= 0.0 and float(r["max_abs_ratio_dev"]) >= float(r["ratio_dev"]) - 1e-6
        # the consecutive-policy KL is recorded at the last step of every generation round, blank elsewhere
        kl = [(int(r["step"]), r["kl_consecutive"]) for r in run]
        assert all((v != "") == (s % k == 0) for s, v in kl), (objective, k)
        assert all(math.isfinite(float(v)) and float(v) >= -1e-6 for _, v in kl if v != "")


def test_summary_table_is_well_formed(quick_run):
    out, proc = quick_run
    text = (out / "summary.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header, sep, body = lines[0], lines[1], lines[2:]
    ncol = header.count("|") - 1 - header.count("\\|")
    for needle in ("objective", "num_iterations", "final reward", "max \\|r-1\\|", "mean exit fraction", "final entropy"):
        assert needle in header
    assert set(sep.replace("|", "").replace(":", "").replace("-", "")) == set()
    assert len(body) == len(OBJECTIVES) * len(ITERATIONS)
    seen = set()
    for line in body:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == ncol, line
        seen.add((cells[0], int(cells[1])))
        for cell in cells[2:]:
            float(cell)  # every statistic is a number
    assert seen == {(o, k) for o in OBJECTIVES for k in ITERATIONS}
    assert body[0] in proc.stdout  # the table is also printed


@pytest.mark.parametrize("name, min_size", [("stability.png", (800, 400)), ("objectives.png", (600, 400))])
def test_figures_are_pngs(quick_run, name, min_size):
    import matplotlib.image

    out, _ = quick_run
    assert (out / name).read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(out / name).shape[:2]
    assert width >= min_size[0] and height >= min_size[1]


def test_same_seed_same_trajectory(tmp_path):
    args = ("--rounds", "2", "--iterations", "4", "--objectives", "clip", "cfpo")
    _run(tmp_path / "a", *args)
    _run(tmp_path / "b", *args)
    assert (tmp_path / "a" / "metrics.csv").read_bytes() == (tmp_path / "b" / "metrics.csv").read_bytes()


def test_bad_arguments_are_rejected(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--rounds", "0"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "--rounds" in proc.stderr
