"""The two OpenRLHF PolicyLoss APIs the adapter supports, for the tests (no import of openrlhf here).

* "is_correction" (OpenRLHF 0.11.2): is_correction_level / _mode / _gating / _threshold; forward returns 5.
* "vllm_is" (OpenRLHF 0.10.4 - 0.11.1): enable_vllm_is_correction, vllm_is_truncated_threshold,
  vllm_is_correction_type in {tis, icepop, seq-mask-tis}; forward returns 4 (no is_filter_ratio).

Which one is installed is read from the installed ``openrlhf/models/loss.py`` text, as the adapter reads it
from ``PolicyLoss.__init__``'s signature.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import version
from pathlib import Path

OPENRLHF_VERSION = version("openrlhf")
_LOSS_SOURCE = (Path(importlib.util.find_spec("openrlhf").origin).parent / "models" / "loss.py").read_text()
API = "is_correction" if "is_correction_level" in _LOSS_SOURCE else "vllm_is"
N_OUTPUTS = 5 if API == "is_correction" else 4
_LEGACY = {
    ("token", "clip", "ratio"): "tis",
    ("token", "mask", "ratio"): "icepop",
    ("seq", "mask", "ratio"): "seq-mask-tis",
}


def is_kwargs(level="token", mode="mask", gating="ratio", threshold=(0.5, 5.0)):
    """PolicyLoss keyword arguments for this IS correction in the installed API; None if it has no such one."""
    if API == "is_correction":
        kw = dict(is_correction_level=level, is_correction_threshold=list(threshold))
        if mode != "mask":
            kw["is_correction_mode"] = mode
        if gating != "ratio":
            kw["is_correction_gating"] = gating
        return kw
    kind = _LEGACY.get((level, mode, gating))
    if kind is None:
        return None
    return dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=list(threshold),
                vllm_is_correction_type=kind)  # fmt: skip


#: the IS corrections this OpenRLHF has, as PolicyLoss keyword arguments
IS_CORRECTION = [
    kw for kw in (
        is_kwargs("token", "mask", "ratio", (0.8, 1.25)),  # ICEPOP
        is_kwargs("token", "clip", "ratio", (0.8, 1.25)),  # TIS
        is_kwargs("seq", "mask", "ratio", (0.9, 1.1)),  # seq-mask-tis
        is_kwargs("token", "mask", "binary_kl", (0.0, 0.02)),
        is_kwargs("seq", "mask", "binary_kl", (0.0, 0.02)),
        is_kwargs("token", "mask", "tv", (0.0, 0.05)),
        is_kwargs("seq", "mask", "tv", (0.0, 0.08)),
    ) if kw is not None
]  # fmt: skip

#: the CLI options that switch the token-level IS correction on, in this OpenRLHF's train_ppo_ray
IS_CLI = (["--algo.advantage.is_correction_level", "token"] if API == "is_correction"
          else ["--algo.advantage.is_correction_enable"])  # fmt: skip
#: the CLI options for ICEPOP (token-level IS weight pi_train/pi_rollout, tokens outside [0.8, 1.25] dropped)
ICEPOP_CLI = [*(["--algo.advantage.is_correction_level", "token", "--algo.advantage.is_correction_mode", "mask"]
                if API == "is_correction" else
                ["--algo.advantage.is_correction_enable", "--algo.advantage.is_correction_type", "icepop"]),
              "--algo.advantage.is_correction_threshold", "0.8", "1.25"]  # fmt: skip
#: --actor.loss_agg_mode exists from 0.11.2 on
LOSS_AGG_CLI = ["--actor.loss_agg_mode", "seq-mean-token-mean"] if API == "is_correction" else []
