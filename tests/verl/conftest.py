"""Fixtures for the verl adapter tests; helpers live in verl_helpers.py."""

from __future__ import annotations

import pytest

pytest.importorskip("verl")


@pytest.fixture
def verl_registry():
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    saved = dict(POLICY_LOSS_REGISTRY)
    yield POLICY_LOSS_REGISTRY
    POLICY_LOSS_REGISTRY.clear()
    POLICY_LOSS_REGISTRY.update(saved)
