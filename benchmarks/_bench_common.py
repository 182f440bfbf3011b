"""What the benchmark scripts share: the --device choice, a clear stop when CUDA is asked for and absent,
the machine header, and one timer for CPU and CUDA.

The scripts are run as ``python benchmarks/<script>.py``, so this file is importable by its bare name.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time

DEVICES = ("cpu", "cuda")


def add_device_arg(parser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="cpu (default): wall + process CPU time; cuda: CUDA-event time, torch.cuda memory",
    )


def require_device(device: str) -> None:
    """Stop at once, with a message that says why, when ``--device cuda`` is asked for without a GPU."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda: no CUDA GPU is visible to this process (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}; torch.cuda.is_available() is False). Run it on a CUDA machine, or use "
            "--device cpu."
        )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header(device: str) -> str:
    """One line: the device (GPU name, or CPU model and core count) and the versions that decide the figures."""
    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        where = (
            f"{torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"sm_{p.major}{p.minor}), CUDA {torch.version.cuda}"
        )
    else:
        where = f"{_cpu_model()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"
    vers = ", ".join(f"{d} {_version(d)}" for d in ("triton", "transformers", "trl", "liger-kernel"))
    return (
        f"# {where} | {platform.platform()} | python {platform.python_version()} | torch {torch.__version__}, "
        f"{vers}, cfpo_loss {_cfpo_version()}"
    )


def _cfpo_version() -> str:
    """The imported cfpo_loss (it may come from PYTHONPATH=src rather than an install) and the commit, if known."""
    try:
        import cfpo_loss

        version, where = cfpo_loss.__version__, os.path.dirname(os.path.abspath(cfpo_loss.__file__))
    except ImportError:
        return "not importable"
    try:
        rev = subprocess.run(
            ["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", ""
    return f"{version} ({rev}{' + uncommitted changes' if dirty else ''})" if rev else version


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed_call(fn, device: str):
    """Run ``fn()`` once; return (its result, seconds, process CPU seconds).

    CPU: wall clock around the call. CUDA: CUDA events recorded around the call on the current stream, after a
    synchronize, read after another synchronize: the device time from the first kernel queued to the last one
    finished (host gaps in between included). The CPU seconds are the host's (Python, launches, syncs)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0 = time.process_time()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3, time.process_time() - c0
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0
