"""The core tests' batch builder (imported by name, as trl_helpers / verl_helpers are in their folders: a
conftest.py cannot be imported by name here, the repository root has one too).

Builders that stay in their test file have a purpose this one does not serve: test_reference.py's draws fp32 values
stored as float64 (log-probs around -1, NaN padding, an empty row), test_ratio_sums.py's has a fixed mask and (B, 1)
advantages for its sums by hand, test_fused.py / test_metrics.py build an LM head, test_fuzz.py draws shapes.
"""

from __future__ import annotations

import torch


def make_batch(b=5, t=7, seed=0, spread=0.5, dtype=torch.float64, first_token_valid=True):
    """``(log_prob, old_log_prob, advantages, mask)``: log-probs uniform in (-3, 0] (a leaf that requires grad),
    old log-probs ``spread`` · N(0, 1) away, one advantage per row, about 70 % valid tokens (with
    ``first_token_valid``, every row's first token is valid, so no row is empty).

    Drawn in ``dtype`` when it is float32 / float64, else in float32 and then rounded to ``dtype`` (bf16 / fp16):
    the same values a float32 batch has, as the low-precision tests compare against it."""
    draw = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.Generator().manual_seed(seed)
    log_prob = (-torch.rand(b, t, generator=g, dtype=draw) * 3).to(dtype).requires_grad_()
    old_log_prob = (log_prob.detach().to(draw) + spread * torch.randn(b, t, generator=g, dtype=draw)).to(dtype)
    advantages = torch.randn(b, generator=g, dtype=draw).to(dtype)
    mask = torch.rand(b, t, generator=g) > 0.3
    if first_token_valid:
        mask[:, 0] = True
    return log_prob, old_log_prob, advantages, mask
