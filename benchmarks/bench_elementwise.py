"""Forward+backward time of the policy loss alone (no model), side by side in one process.

    python benchmarks/bench_elementwise.py [--shapes 2x16 8x256 64x4096] [--repeats 30]
    python benchmarks/bench_elementwise.py --device cuda          # shapes 64x4096 and 256x8192
    python benchmarks/bench_elementwise.py --profile [--shapes 2x16]   # where one call's host time goes
    python benchmarks/bench_elementwise.py --compare before=/path/to/other/src   # another code state, same process

Default CPU shapes: 2x16 and 8x256 (host-bound: the arithmetic is negligible, what is timed is Python,
dispatch and autograd, as on a GPU at any shape) and 64x4096 (the arithmetic shows). --profile skips the
timing and prints, per shape, dtype and row, the top self-CPU-time entries of torch.profiler (CPU activity)
over --profile-calls calls after warm-up, divided by that count: the cost of one call.

Rows, each timed on the same inputs (best of --repeats rounds x 3 back-to-back calls, after warm-up):
  verl-style clip     an eager copy of verl 0.9.1's compute_policy_loss_vanilla (ratio clamp, exp,
                      dual-clip, masked clipfrac / ppo_kl metrics, token-mean agg_loss): the baseline
  ours clip / cfpo    compute_policy_loss, the default eager path (one pass computing the objective, its
                      analytic derivative and the metrics; backward is one multiply), with its input
                      checks and all ten metrics, read as a logger reads them: with
                      cfpo_loss.read_metrics (one device-to-host transfer) where the installed cfpo_loss
                      has it, else one float() per metric; the output says which
  fast (compiled)     compute_policy_loss(compile=True): the same pass plus aggregation, torch.compile'd
  copy floor          copying the same input and gradient bytes once into preallocated buffers:
                      memory bandwidth's floor (cache-resident at this size, steady state); on CUDA
                      also "copy floor (device)": the same copies captured in a CUDA graph and replayed,
                      timed with CUDA events: the device's time alone, no launch overhead
  copy into fresh     the same copies into newly allocated tensors (allocation and first-touch
                      page faults included), as any op that returns a new gradient tensor pays
  NAME clip / cfpo    with --compare NAME=SRC: "ours" from another copy of the package (SRC holds its
                      cfpo_loss/, e.g. `git archive COMMIT src | tar -x -C DIR`, then DIR/src), imported
                      under another module name, timed in the same rounds: before/after a change in one
                      process, where separate runs on a shared machine differ by more than the change
The verl-style baseline reads its three metrics with one .item() each, as verl 0.9.1's
compute_policy_loss_vanilla itself does (pg_metrics = {"actor/pg_clipfrac": pg_clipfrac.detach().item(), ...}).

Our rows read the metrics with PolicyLossOutput.metric_floats() (what the verl adapter does): with the
default finite check the loss's one device sync already brought them to the host, so this reads nothing
more; the script prints METRICS_READER. (Before that they were read with cfpo_loss.read_metrics,
a second transfer.)

Timing: each call is bracketed by torch.cuda.synchronize() on CUDA (a no-op on CPU) and timed with the wall
clock, so a row's time is what the training loop waits for: host work (Python, launches, syncs) and device
work together. Warm-up calls come first (torch.compile compiles on the first call; that first call's time
is printed separately as "first ms").
It prints milliseconds, the ratio to the verl-style baseline and the ratio to the copy floor (on CUDA: to
the device-time copy floor).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import cfpo_loss
from cfpo_loss import compute_policy_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import add_device_arg, machine_header, require_device, sync

if hasattr(cfpo_loss.PolicyLossOutput, "metric_floats"):

    def read_metrics(out):
        return out.metric_floats()

    METRICS_READER = "PolicyLossOutput.metric_floats() (read in the loss's one sync)"
elif hasattr(cfpo_loss, "read_metrics"):

    def read_metrics(out):
        return cfpo_loss.read_metrics(out.metrics)

    METRICS_READER = "cfpo_loss.read_metrics (one transfer)"
else:

    def read_metrics(out):
        return {k: float(v) for k, v in out.metrics.items()}

    METRICS_READER = "float() per metric"


def verl_masked_sum(values, mask, axis=None):
    """verl.utils.torch_functional.masked_sum (0.9.1), verbatim."""
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):
    """verl.utils.torch_functional.masked_mean (0.9.1), verbatim."""
    return verl_masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def verl_style_clip(old_log_prob, log_prob, advantages, response_mask, clip_ratio=0.2, clip_ratio_c=3.0):
    """verl 0.9.1 compute_policy_loss_vanilla + agg_loss("token-mean"), the same ops in the same order."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    loss = verl_masked_sum(pg_losses, response_mask) / response_mask.sum()  # agg_loss token-mean, dp_size 1
    metrics = {
        "pg_clipfrac": pg_clipfrac.item(),
        "ppo_kl": ppo_kl.item(),
        "pg_clipfrac_lower": pg_clipfrac_lower.item(),
    }
    return loss, metrics


def _call_s(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed(rows: dict, repeats: int, device: str = "cpu", back_to_back: int = 3):
    """Best-of-N milliseconds per row, steady state, and each row's first-call milliseconds (compilation
    included). Each round runs every row ``back_to_back`` times in a row (its buffers and caches warm, as
    when a training loop calls the loss step after step) and keeps the fastest; rounds interleave the rows,
    so load from other processes on a shared machine hits every row alike, in an order reversed every other
    round: a row that always ran right after the same other row measured up to ~4% slower than an identical
    copy of itself run after it (2x16, CPU). The minimum is the least-disturbed run."""
    first = {}
    for name, fn in list(rows.items()):
        try:
            first[name] = _call_s(fn, device) * 1e3
        except Exception as ex:  # noqa: BLE001 - one broken row (say, a compile failure) must not hide the others
            print(f"  row {name!r} failed on its first call, left out: {type(ex).__name__}: {str(ex)[:300]}")
            del rows[name]
            continue
        for _ in range(2):
            fn()
    best = {name: float("inf") for name in rows}
    order = list(rows.items())
    for _ in range(repeats):
        for name, fn in order:
            for _ in range(back_to_back):
                best[name] = min(best[name], _call_s(fn, device))
        order.reverse()
    return {name: t * 1e3 for name, t in best.items()}, first


def graph_device_ms(fn, repeats: int, inner: int = 20) -> float:
    """CUDA only: ``fn`` captured in a CUDA graph, replayed ``inner`` times between two CUDA events; the best
    of ``repeats`` such runs, per replay: the device's own time for ``fn``'s kernels."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch.cuda.graph asks
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / inner)
    return best


DEFAULT_SHAPES = {"cpu": [(2, 16), (8, 256), (64, 4096)], "cuda": [(64, 4096), (256, 8192)]}


def _shape(text: str) -> tuple[int, int]:
    b, t = text.split("x")
    return int(b), int(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arg(parser)
    parser.add_argument("--batch", type=int, help="with --seq: one shape BxT instead of the defaults")
    parser.add_argument("--seq", type=int)
    parser.add_argument(
        "--shapes", nargs="+", type=_shape, help="BxT ... (default: cpu 2x16 8x256 64x4096; cuda 64x4096 256x8192)"
    )
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top self-time ops per call")
    parser.add_argument("--profile-calls", type=int, default=200, help="calls profiled per row (--profile)")
    parser.add_argument("--profile-top", type=int, default=15, help="entries printed per row (--profile)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd rows")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="also time the eager rows of the cfpo_loss package under SRC (a src/ directory), as 'NAME clip' etc.",
    )
    args = parser.parse_args()
    require_device(args.device)
    dev = args.device
    args.compare = [_import_copy(spec) for spec in args.compare]
    if args.shapes:
        shapes = args.shapes
    elif args.batch or args.seq:
        shapes = [(args.batch or 64, args.seq or 4096)]
    else:
        shapes = DEFAULT_SHAPES[dev]
    print(machine_header(dev))
    print(
        f"device {dev}, shapes {', '.join(f'{b}x{t}' for b, t in shapes)}, metrics read by ours: {METRICS_READER}; "
        f"verl-style: .item() per metric (as verl 0.9.1)"
    )
    for (batch, seq), dtype in [(s, getattr(torch, d)) for s in shapes for d in args.dtypes.split(",")]:
        _run_shape(args, dev, batch, seq, dtype)


def _run_shape(args, dev, batch, seq, dtype) -> None:
    g = torch.Generator().manual_seed(0)  # drawn on the CPU, then moved: the same values on every device
    shape = (batch, seq)
    log_prob = (-torch.rand(shape, generator=g) * 3).to(dtype=dtype, device=dev).requires_grad_()
    old_log_prob = (log_prob.detach().float().cpu() + 0.2 * torch.randn(shape, generator=g)).to(dtype=dtype, device=dev)
    advantages = torch.randn(batch, 1, generator=g).expand(shape).contiguous().to(dtype=dtype, device=dev)
    mask = (torch.rand(shape, generator=g) > 0.2).to(dev)
    verl_mask = mask.float()  # verl's response_mask is numeric (it multiplies by it)

    def ours(objective, compile=False, loss_fn=compute_policy_loss):
        def run():
            out = loss_fn(
                log_prob,
                old_log_prob,
                advantages,
                mask,
                objective=objective,
                dual_clip=3.0 if objective == "clip" else None,
                compile=compile,
            )
            torch.autograd.grad(out.loss, log_prob)
            read_metrics(out)  # metrics reach the logger (see METRICS_READER)
            return out

        return run

    def verl_ref():
        loss, _ = verl_style_clip(old_log_prob, log_prob, advantages, verl_mask)
        torch.autograd.grad(loss, log_prob)

    sources = [log_prob.detach(), old_log_prob, advantages, mask]
    buffers = [torch.empty_like(s) for s in sources]
    grad_buf = torch.empty_like(log_prob)

    def copy_floor():
        for b, s in zip(buffers, sources):
            b.copy_(s)
        grad_buf.copy_(sources[0])

    rows = {"verl-style clip (baseline)": verl_ref}
    for objective in ("clip", "cfpo"):
        rows[f"ours {objective}"] = ours(objective)
        for name, module in args.compare:
            rows[f"{name} {objective}"] = ours(objective, loss_fn=module.compute_policy_loss)
        if not args.no_compile:
            rows[f"ours {objective} fast (compiled)"] = ours(objective, True)
    if args.profile:
        del rows  # the profile wants the eager rows and the baseline only
        _profile(
            {"verl-style clip (baseline)": verl_ref, "ours clip": ours("clip"), "ours cfpo": ours("cfpo")},
            f"{batch}x{seq} {dtype}",
            args,
        )
        return
    rows["copy floor"] = copy_floor
    # the same bytes into freshly allocated tensors, as an op that returns a new gradient must do
    rows["copy into fresh tensors"] = lambda: ([x.clone() for x in sources], log_prob.detach().clone())

    times, first = timed(rows, args.repeats, dev)  # compiled rows compile in their first call
    floor_name = "copy floor"
    if dev == "cuda":
        floor_name = "copy floor (device: CUDA graph replay)"
        times[floor_name] = first[floor_name] = graph_device_ms(copy_floor, args.repeats)
    base, floor = times.get("verl-style clip (baseline)", float("nan")), times[floor_name]
    print(f"\n{batch}x{seq} {dtype} on {dev}  (best of {args.repeats}; x copy floor: vs '{floor_name}')")
    print(f"{'':40s} {'ms':>8s} {'x baseline':>11s} {'x copy floor':>13s} {'first ms':>9s}")
    for name, ms in times.items():
        print(f"{name:40s} {ms:8.3f} {ms / base:11.2f} {ms / floor:13.2f} {first[name]:9.1f}")

    if not args.no_compile:  # the compiled path's loss equals the eager one (checked after timing: the first
        # timed call is the one that compiles)
        for objective in [o for o in ("clip", "cfpo") if f"ours {o} fast (compiled)" in times]:
            ref = ours(objective)()
            out = ours(objective, True)()
            # CUDA: compiled (Triton) reductions may sum in another order than the eager kernels
            tol = 1e-6 if dev == "cpu" else 1e-5
            assert torch.allclose(out.loss, ref.loss, rtol=tol, atol=tol), (objective, out.loss, ref.loss)


def _import_copy(spec: str):
    """(NAME, module) for --compare NAME=SRC: SRC/cfpo_loss copied to a temporary directory as the package
    ``cfpo_loss_NAME`` (its imports are relative) and imported next to the installed cfpo_loss."""
    import importlib
    import shutil
    import tempfile

    name, _, src = spec.partition("=")
    if not name.isidentifier() or not os.path.isdir(os.path.join(src, "cfpo_loss")):
        raise SystemExit(f"--compare {spec!r}: expected NAME=SRC with SRC/cfpo_loss a package")
    root = tempfile.mkdtemp(prefix="bench_compare_")
    shutil.copytree(os.path.join(src, "cfpo_loss"), os.path.join(root, f"cfpo_loss_{name}"))
    sys.path.insert(0, root)
    module = importlib.import_module(f"cfpo_loss_{name}")
    print(f"--compare {name}: {os.path.abspath(src)}")
    return name, module


def _profile(rows: dict, label: str, args) -> None:
    """torch.profiler (CPU activity) over ``--profile-calls`` calls of each row after warm-up: total wall time
    per call, the profiler's self-CPU total per call, and its top entries by self CPU time, per call. The
    Python code between ops shows up only as the difference (the profiler records ops, not Python lines;
    ``python -m cProfile`` or line_profiler for that); the profiler's own cost inflates every figure alike."""
    from torch.profiler import ProfilerActivity, profile

    n = args.profile_calls
    for name, fn in rows.items():
        for _ in range(20):
            fn()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                fn()
        wall_us = (time.perf_counter() - t0) / n * 1e6
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        self_total = sum(e.self_cpu_time_total for e in events) / n
        print(f"\n{label} | {name}: {wall_us:.1f} us wall per call under the profiler, {self_total:.1f} us self CPU")
        print(f"  {'op':44s} {'self us/call':>12s} {'calls/call':>10s}")
        for e in events[: args.profile_top]:
            print(f"  {e.key[:44]:44s} {e.self_cpu_time_total / n:12.2f} {e.count / n:10.1f}")


if __name__ == "__main__":
    main()
