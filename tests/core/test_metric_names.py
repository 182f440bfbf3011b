"""The adapters' one metric table (cfpo_loss.adapters._metric_names): one row per core metric, in the core's order,
each framework key used once, and its Markdown rendering. Each adapter's own test session holds its keys to the
values it logs (tests/trl, tests/verl, tests/openrlhf: test_every_*_of_the_metric_table_*)."""

from __future__ import annotations

import pytest

from cfpo_loss.adapters._metric_names import FRAMEWORKS, METRIC_NAMES, NOTES, framework_keys, markdown_table
from cfpo_loss.metrics import metric_names


def test_one_row_per_core_metric_in_the_core_order():
    assert tuple(row.core for row in METRIC_NAMES) == metric_names(dual_clip=True, penalty=True)
    assert all(row.meaning and "\n" not in row.meaning for row in METRIC_NAMES)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_each_framework_key_names_one_core_metric(framework):
    keys = framework_keys(framework)
    assert keys and len(set(keys.values())) == len(keys)
    assert list(keys) == [row.core for row in METRIC_NAMES if row.core in keys]  # the table's order


def test_the_adapters_keys():
    """The keys the adapters have always logged (README, dashboards): a row edited by mistake fails here."""
    assert framework_keys("trl") == {
        "ratio_min": "cfpo/ratio_min", "ratio_max": "cfpo/ratio_max", "ratio_dev": "cfpo/ratio_dev",
        "tr_exit_frac": "clip_ratio/region_mean", "tr_exit_low": "clip_ratio/low_mean",
        "tr_exit_high": "clip_ratio/high_mean", "penalty": "cfpo/penalty",
    }  # fmt: skip
    assert framework_keys("verl") == {"tr_exit_frac": "actor/pg_clipfrac", "approx_kl_k1": "actor/ppo_kl",
                                      "dual_clip_frac": "actor/pg_clipfrac_lower"}  # fmt: skip
    assert framework_keys("openrlhf") == {"tr_exit_frac": "clip_ratio"}
    assert framework_keys("skyrl") == {"tr_exit_frac": "clip_ratio"}
    assert framework_keys("areal") == {"ratio_mean": "importance_weight/avg", "ratio_min": "importance_weight/min",
                                       "ratio_max": "importance_weight/max", "tr_exit_frac": "clip_ratio/avg",
                                       "dual_clip_frac": "dual_clip_ratio/avg"}  # fmt: skip
    with pytest.raises(ValueError, match="unknown framework 'deepspeed'"):
        framework_keys("deepspeed")


def test_markdown_rendering():
    text = markdown_table()
    lines = text.splitlines()
    assert lines[0] == "| core metric | meaning | TRL | verl | OpenRLHF | SkyRL | AReaL |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    rows = lines[2 : 2 + len(METRIC_NAMES)]
    assert all(line.count(" | ") == 6 and line.startswith("| `") and line.endswith(" |") for line in rows)
    assert ("| `tr_exit_frac` | fraction with A > 0 and r > 1 + ε_high, or A < 0 and r < 1 − ε_low (for clip: the "
            "clip fraction) | `clip_ratio/region_mean` | `actor/pg_clipfrac` | `clip_ratio` | `clip_ratio` | "
            "`clip_ratio/avg` |") in rows  # fmt: skip
    # a bare | would split the cell
    assert "| `ratio_dev` | mean \\|r − 1\\| | `cfpo/ratio_dev` | — | — | — | — |" in rows
    assert text.endswith("".join(f"- {note}\n" for note in NOTES))
