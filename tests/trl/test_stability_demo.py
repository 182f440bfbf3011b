"""examples/stability_demo.py --quick and --grid --quick: the outputs exist and are well-formed (not their
values), the batch-ratio axis really lags the old policy, and a run is exactly reproducible from its seed.
Runs the script as a user does, in a subprocess, with the real TRL. No test looks at a training outcome."""

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
    "objective", "num_iterations", "batch_ratio", "step", "round", "reward", "ratio_dev", "max_abs_ratio_dev",
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
    assert proc.returncode == 0, (
        f"stability_demo.py failed:\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    )
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
    assert {r["batch_ratio"] for r in rows} == {"1"}  # the iterations demo: one optimizer step per mini-batch = batch
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
    for needle in (
        "objective",
        "num_iterations",
        "final reward",
        "max \\|r-1\\|",
        "mean exit fraction",
        "final entropy",
    ):
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


def test_rloo_quick(tmp_path):
    """--trainer rloo: TRL's RLOOTrainer through CFPORLOOTrainer, same outputs; the ratio columns are RLOO's sequence
    ratio (as the trainer logs it). The first step of every round is on-policy (r == 1 exactly), every later one is
    not; with k = 1 clip and cfpo are the same algorithm (identical rows), with k = 4 they differ. (What the ratio
    columns hold is checked in-process by the next test.)"""
    proc = _run(tmp_path, "--trainer", "rloo", "--rounds", "2", "--iterations", "1", "4")
    assert "RLOOTrainer: r = sequence ratio" in (tmp_path / "summary.md").read_text().splitlines()[0]
    for name in ("stability.png", "objectives.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    header, rows = _read_csv(tmp_path / "metrics.csv")
    assert header == COLUMNS
    runs: dict = {}
    for row in rows:
        runs.setdefault((row["objective"], int(row["num_iterations"])), []).append(row)
    assert set(runs) == {(o, k) for o in OBJECTIVES for k in (1, 4)}
    for (objective, k), run in runs.items():
        assert [int(r["step"]) for r in run] == list(range(1, 2 * k + 1)), (objective, k)
        for r in run:
            for key in ("reward", "ratio_dev", "max_abs_ratio_dev", "exit_frac", "entropy", "kl_old", "loss"):
                assert math.isfinite(float(r[key])), (objective, k, r["step"], key, r[key])
            assert (float(r["ratio_dev"]) == 0.0) == ((int(r["step"]) - 1) % k == 0), (objective, k, r["step"])
        assert all((r["kl_consecutive"] != "") == (int(r["step"]) % k == 0) for r in run), (objective, k)
    strip = lambda run: [{**r, "objective": ""} for r in run]
    assert strip(runs[("clip", 1)]) == strip(runs[("cfpo", 1)])
    assert strip(runs[("clip", 4)]) != strip(runs[("cfpo", 4)])
    assert "RLOOTrainer" in proc.stdout


def test_rloo_columns_are_the_sequence_ratio_statistics(tmp_path):
    """In-process, with the real RLOOTrainer: each optimizer step's row of the RLOO demo holds the statistics of
    RLOO's sequence ratio r = exp(sum_t log pi_theta - old_logps) on that step's batch (mean and max |r - 1|, exit
    fraction in the advantage's direction) and the per-token k3 KL against the rollout policy's per-token log-probs,
    which must sum to the old_logps RLOO uses; all recomputed here from the tensors of each step."""
    import argparse
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("stability_demo_under_test", SCRIPT)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    expected = []

    class Checked(demo.make_trainer_class("rloo")):
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            with torch.no_grad():  # the same weights: the optimizer steps after this call
                mask = inputs["completion_mask"]
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
                attention = torch.cat([inputs["prompt_mask"], mask], dim=1)
                logps = self._get_per_token_logps_and_entropies(model, ids, attention, mask.size(1))[0]
                old = inputs["demo_old_per_token_logps"]
                torch.testing.assert_close((old * mask).sum(1), inputs["old_logps"])
                r = torch.exp((logps * mask).sum(1) - inputs["old_logps"])
                adv = inputs["advantages"]
                log_ratio = torch.where(mask.bool(), logps - old, 0.0)
                expected.append({
                    "ratio_dev": (r - 1).abs().mean().item(), "max_abs_ratio_dev": (r - 1).abs().max().item(),
                    "exit_frac": (((r > 1.2) & (adv > 0)) | ((r < 0.8) & (adv < 0))).float().mean().item(),
                    "kl_old": ((log_ratio.exp() - 1 - log_ratio).sum() / mask.sum()).item(),
                })  # fmt: skip
            return loss

    opts = argparse.Namespace(trainer="rloo", eps=0.2, lr=2e-3, batch_size=16, num_generations=4, seed=0)
    tokenizer = demo.build_tokenizer()
    model_path = demo.build_model(tokenizer, str(tmp_path / "model"), 0)
    rows = demo.run_one(Checked, "cfpo", 3, 1, 2, model_path, tokenizer, str(tmp_path), opts, demo._Progress(6))
    assert len(rows) == len(expected) == 6
    assert any(e["max_abs_ratio_dev"] > 0.2 for e in expected)  # the ratio did leave the trust region
    for row, e in zip(rows, expected):
        for key, value in e.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-4, abs=1e-6), (row["step"], key)


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--rounds", "0"), "--rounds"),
        (("--grid", "--batch-ratios", "3"), "--batch-ratios"),  # must divide the generation batch (64)
        (("--batch-ratios", "1", "2"), "--grid"),  # several batch ratios only in the grid
    ],
)
def test_bad_arguments_are_rejected(tmp_path, args, needle):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True, text=True)
    assert proc.returncode != 0 and needle in proc.stderr


# ------------------------------------------------------------------------------------------ --grid --quick
GRID_ROUNDS, GRID_ITERATIONS, GRID_RATIOS = 2, (1, 2), (1, 2)  # what --grid --quick runs
GRID_HEATMAPS = (
    "grid_final_reward.png", "grid_reward_drop.png", "grid_max_exit.png", "grid_mean_exit.png",
    "grid_entropy_collapse.png", "grid_kl_consecutive.png",
)  # fmt: skip
GRID_CELLS = {(o, k, b) for o in OBJECTIVES for k in GRID_ITERATIONS for b in GRID_RATIOS}


def _cells(rows: list[dict]) -> dict:
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["objective"], int(row["num_iterations"]), int(row["batch_ratio"])), []).append(row)
    return cells


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability_grid_quick")
    proc = _run(out, "--grid", "--quick")
    return out, proc


def test_grid_writes_every_output(grid_run):
    out, _ = grid_run
    for name in ("metrics.csv", "grid_summary.md", "grid_heatmaps.png", "grid_curves.png", *GRID_HEATMAPS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


@pytest.mark.parametrize("name", [*GRID_HEATMAPS, "grid_heatmaps.png", "grid_curves.png"])
def test_grid_figures_are_pngs(grid_run, name):
    import matplotlib.image

    out, _ = grid_run
    assert (out / name).read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(out / name).shape[:2]
    assert width >= 600 and height >= 400


def test_grid_csv_is_well_formed(grid_run):
    out, _ = grid_run
    header, rows = _read_csv(out / "metrics.csv")
    assert header == COLUMNS
    cells = _cells(rows)
    assert set(cells) == GRID_CELLS
    for (objective, k, b), run in cells.items():
        n = GRID_ROUNDS * k * b  # k passes over b mini-batches per generation round: k * b optimizer steps
        assert [int(r["step"]) for r in run] == list(range(1, n + 1)), (objective, k, b)
        assert [int(r["round"]) for r in run] == [(s - 1) // (k * b) + 1 for s in range(1, n + 1)]
        for r in run:
            for key in ("reward", "ratio_dev", "max_abs_ratio_dev", "exit_frac", "entropy", "kl_old", "loss"):
                assert math.isfinite(float(r[key])), (objective, k, b, r["step"], key, r[key])
            assert 0.0 <= float(r["reward"]) <= 1.0 and 0.0 <= float(r["exit_frac"]) <= 1.0
        # the consecutive-policy KL: once per generation round, at its last optimizer step
        assert all((r["kl_consecutive"] != "") == (int(r["step"]) % (k * b) == 0) for r in run), (objective, k, b)
        assert all(float(r["kl_consecutive"]) >= -1e-6 for r in run if r["kl_consecutive"] != "")


def test_grid_batch_ratio_lags_the_old_policy(grid_run):
    """The mapping to TRL is what the paper means: in every round the first mini-batch is trained on-policy
    (r == 1 exactly), every later step against the rollout policy that has since moved (r != 1), and with
    k = b = 1 nothing lags, so clip and cfpo are the same algorithm (identical rows)."""
    out, _ = grid_run
    cells = _cells(_read_csv(out / "metrics.csv")[1])
    for (objective, k, b), run in cells.items():
        for r in run:
            first_of_round = (int(r["step"]) - 1) % (k * b) == 0
            assert (float(r["ratio_dev"]) == 0.0) == first_of_round, (objective, k, b, r["step"], r["ratio_dev"])
    strip = lambda run: [{**r, "objective": ""} for r in run]
    assert strip(cells[("clip", 1, 1)]) == strip(cells[("cfpo", 1, 1)])
    assert strip(cells[("clip", 1, 2)]) != strip(cells[("cfpo", 1, 2)])  # the lag alone makes them differ


def test_grid_summary_table_is_well_formed(grid_run):
    out, proc = grid_run
    lines = [ln for ln in (out / "grid_summary.md").read_text().splitlines() if ln.startswith("|")]
    header, sep, body = lines[0], lines[1], lines[2:]
    ncol = header.count("|") - 1 - header.count("\\|")
    names = [c.strip() for c in header.replace("\\|", "/").strip().strip("|").split("|")]
    for needle in ("objective", "num_iterations", "batch ratio", "final reward", "reward drop", "max exit fraction",
                   "mean exit fraction", "entropy < 0.1", "KL(pi_n"):  # fmt: skip
        assert sum(needle in name for name in names) == 1, needle
    collapse_col = next(i for i, name in enumerate(names) if "entropy < 0.1" in name)
    assert set(sep.replace("|", "").replace(":", "").replace("-", "")) == set()
    assert len(body) == len(GRID_CELLS)
    seen = []
    for line in body:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == ncol, line
        seen.append((cells[0], int(cells[1]), int(cells[2])))
        assert int(cells[3]) == GRID_ROUNDS * int(cells[1]) * int(cells[2])  # optimizer steps
        collapse = cells[collapse_col]
        assert collapse == "never" or 1 <= int(collapse) <= GRID_ROUNDS, collapse
        for cell in cells[4:collapse_col] + cells[collapse_col + 1 :]:
            float(cell)
    assert set(seen) == GRID_CELLS and len(seen) == len(set(seen))
    assert seen == sorted(seen, key=lambda c: (c[1], c[2], c[0]))  # clip and cfpo of a cell side by side
    assert body[0] in proc.stdout


def test_grid_cell_is_reproducible_alone(grid_run, tmp_path):
    """Same seed => the same rows, whether a cell runs inside the grid or on its own."""
    out, _ = grid_run
    _run(tmp_path, "--grid", "--rounds", str(GRID_ROUNDS), "--iterations", "2", "--batch-ratios", "2",
         "--objectives", "cfpo")  # fmt: skip
    grid_lines = (out / "metrics.csv").read_text().splitlines()
    alone = (tmp_path / "metrics.csv").read_text().splitlines()
    assert alone[0] == grid_lines[0]
    assert alone[1:] == [ln for ln in grid_lines[1:] if ln.startswith("cfpo,2,2,")]
    assert len(alone) == 1 + GRID_ROUNDS * 2 * 2


def test_grid_plot_only_redraws_the_same_table(grid_run, tmp_path):
    import shutil

    out, _ = grid_run
    for name in ("metrics.csv", "grid_summary.md"):
        shutil.copy(out / name, tmp_path / name)
    _run(tmp_path, "--grid", "--plot-only")
    assert (tmp_path / "grid_summary.md").read_text() == (out / "grid_summary.md").read_text()
    for name in (*GRID_HEATMAPS, "grid_heatmaps.png", "grid_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
