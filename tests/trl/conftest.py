"""Fixtures for the TRL adapter tests: a tiny Qwen2 built from a config and a WordLevel tokenizer built
with the `tokenizers` package, saved to a temporary folder (GRPOTrainer loads the reference model for
beta > 0 from the policy's path). Nothing is downloaded."""

from __future__ import annotations

import os

import pytest

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_k, _v)

pytest.importorskip("trl")

import torch  # noqa: E402

# The models here are tiny (2 layers, 64 wide): thread synchronisation costs more than it gains, and on a shared
# 2-core machine under load a 2-thread step measured 50-500 ms against 10 ms with one thread.
torch.set_num_threads(1)

from trl_helpers import build_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Qwen2; pass the folder as `model=` and the `tokenizer` fixture as `processing_class=`.

    The tokenizer is deliberately not saved next to it: AutoTokenizer would load it back as a Qwen2Tokenizer
    (from config.json's model type), whose byte-level decoder drops the spaces between WordLevel tokens."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    build_model(build_tokenizer()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()
