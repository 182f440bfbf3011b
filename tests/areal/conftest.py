"""AReaL adapter tests: run in the `areal` nox session (real areal==1.0.4, CPU, FSDP2 over gloo, one process).

Nothing of AReaL is mocked. The engines read the single-process distributed setup from the environment set here
(RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), as AReaL's launcher would set it. TORCHDYNAMO_DISABLE:
AReaL wraps its log-prob gather in ``torch.compile``, whose first CPU compilation costs ~50 s here; eager runs the
same Python function, for AReaL's actor and the adapter's alike (the docs' blocks that this session also runs
then run eagerly too; the `docs` session runs them compiled).
"""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "TORCHDYNAMO_DISABLE": "1",
    "RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
}.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("MASTER_PORT", _free_port())

if importlib.util.find_spec("areal") is None:  # e.g. `pytest tests` in the core env
    collect_ignore_glob = ["test_*.py"]
else:
    collect_ignore_glob = []
    import torch

    torch.set_num_threads(1)  # tiny models: thread synchronisation costs more than it gains on 2 shared cores


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Qwen2 (2 layers, 32 wide) with a WordLevel tokenizer: AReaL's engine loads both from `path`."""
    from areal_helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))
