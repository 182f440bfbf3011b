"""The flash_attn / vllm stand-ins are import-only: every name raises when used (skipped where real)."""

import importlib

import pytest

NAMES = [
    ("flash_attn.bert_padding", "index_first_axis"),
    ("flash_attn.bert_padding", "pad_input"),
    ("flash_attn.bert_padding", "unpad_input"),
    ("flash_attn.bert_padding", "rearrange"),
    ("flash_attn.utils.distributed", "all_gather"),
    ("vllm", "SamplingParams"),
    ("vllm.inputs", "TokensPrompt"),
    ("vllm.utils", "random_uuid"),
]


@pytest.mark.parametrize("module,name", NAMES)
def test_every_standin_raises_when_called(module, name):
    top = importlib.import_module(module.split(".")[0])
    if not getattr(top, "__cfpo_test_standin__", False):
        pytest.skip(f"real {top.__name__} installed")
    obj = getattr(importlib.import_module(module), name)
    with pytest.raises(RuntimeError, match="import-only TEST stand-in"):
        obj()
    with pytest.raises(RuntimeError, match="import-only TEST stand-in"):
        obj.anything  # noqa: B018 - the attribute access itself must raise
