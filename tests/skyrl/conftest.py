"""Fixtures for the SkyRL adapter tests (real skyrl, Python >= 3.12); helpers live in skyrl_helpers.py."""

from __future__ import annotations

import pytest

pytest.importorskip("skyrl")

# importing the adapter registers cfpo / cfpo_seq in SkyRL's PolicyLossRegistry, as a user's launch does
import cfpo_loss.adapters.skyrl  # noqa: F401


def pytest_report_header(config):
    from cfpo_loss.adapters._support import installed_version

    return [f"skyrl {installed_version('skyrl')}"]
