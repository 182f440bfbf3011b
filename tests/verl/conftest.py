"""Fixtures for the verl adapter tests; helpers live in verl_helpers.py."""

from __future__ import annotations

import pytest

pytest.importorskip("verl")

# In-process tests use the registry; *how* a bare `import verl` fills it (entry point on verl >= 0.9.0,
# VERL_USE_EXTERNAL_MODULES on 0.8.0) is test_verl_plugin.py's and test_verl_ray.py's subject, in fresh
# processes. Importing the adapter here registers cfpo / cfpo_seq on every supported verl.
import cfpo_loss.adapters.verl  # noqa: F401


def pytest_report_header(config):
    from verl_helpers import VERL_VERSION

    from cfpo_loss.adapters.verl import loading_mechanism

    return [f"verl {VERL_VERSION}; plugin mechanism in this shell: {loading_mechanism()}"]


@pytest.fixture
def verl_registry():
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    saved = dict(POLICY_LOSS_REGISTRY)
    yield POLICY_LOSS_REGISTRY
    POLICY_LOSS_REGISTRY.clear()
    POLICY_LOSS_REGISTRY.update(saved)
