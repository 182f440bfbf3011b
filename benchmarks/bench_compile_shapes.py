"""compute_policy_loss(compile=True) at host-bound shapes when T changes every call (as in RL): is padding T
to a bucket (one static shape) worth it? Side by side in one process, CPU or CUDA.

    python benchmarks/bench_compile_shapes.py [--batch 8] [--tmin 193] [--tmax 256] [--calls 200]

Rows (fwd + bwd + metrics read with metric_floats(), best-of and median over --calls calls after warm-up):
  verl-style clip        the eager baseline of bench_elementwise.py, at each call's own T
  ours cfpo eager        compute_policy_loss, default eager path, at each call's own T
  compiled, fixed T      compile=True at T = --tmax every call (the best case: one static kernel)
  compiled, varying T    compile=True at each call's T (torch.compile goes dynamic after the second shape)
  compiled, bucketed     each call's inputs padded (mask False) to T = --tmax, then compile=True: one static shape;
                         the padding is four extra ops per call (log-probs, old log-probs, advantages, mask)
The loss of the bucketed call equals the unpadded one (padding is masked; token-mean counts valid tokens); the
script checks it. Compilation time (first calls) is printed apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import add_device_arg, machine_header, require_device, sync
from bench_elementwise import verl_style_clip

from cfpo_loss import compute_policy_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arg(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tmin", type=int, default=193)
    p.add_argument("--tmax", type=int, default=256)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    require_device(args.device)
    dev, B, tmax = args.device, args.batch, args.tmax
    print(machine_header(dev))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.tmin, tmax + 1, (args.calls + 20,), generator=g).tolist()
    full = {
        "lp": (-torch.rand(B, tmax, generator=g) * 3),
        "adv": torch.randn(B, 1, generator=g).expand(B, tmax).contiguous(),
        "mask": torch.rand(B, tmax, generator=g) > 0.2,
    }
    full["old"] = full["lp"] + 0.2 * torch.randn(B, tmax, generator=g)
    full = {k: v.to(dev) for k, v in full.items()}

    def inputs(t):
        lp = full["lp"][:, :t].contiguous().requires_grad_()
        return lp, full["old"][:, :t].contiguous(), full["adv"][:, :t].contiguous(), full["mask"][:, :t].contiguous()

    def ours(lp, old, adv, mask, compile=False):
        out = compute_policy_loss(lp, old, adv, mask, compile=compile)
        torch.autograd.grad(out.loss, lp)
        out.metric_floats()
        return out

    def bucketed(lp, old, adv, mask):
        pad = tmax - lp.shape[1]
        lp_p = F.pad(lp, (0, pad))  # differentiable: the gradient flows back to the unpadded log-probs
        out = compute_policy_loss(lp_p, F.pad(old, (0, pad)), F.pad(adv, (0, pad)), F.pad(mask, (0, pad)), compile=True)
        torch.autograd.grad(out.loss, lp)
        out.metric_floats()
        return out

    def verl(lp, old, adv, mask):
        loss, _ = verl_style_clip(old, lp, adv, mask.float())
        torch.autograd.grad(loss, lp)

    rows = {
        "verl-style clip": lambda t: verl(*inputs(t)),
        "ours cfpo eager": lambda t: ours(*inputs(t)),
        "compiled, fixed T": lambda t: ours(*inputs(tmax), compile=True),
        "compiled, varying T": lambda t: ours(*inputs(t), compile=True),
        "compiled, bucketed": lambda t: bucketed(*inputs(t)),
    }
    first = {}
    for name, fn in rows.items():  # warm-up: compiles (the varying row: static, then dynamic)
        t0 = time.perf_counter()
        for t in lengths[:20]:
            fn(t)
        first[name] = time.perf_counter() - t0
    times = {name: [] for name in rows}
    for t in lengths[20:]:
        for name, fn in rows.items():  # interleaved, the same T for every row in a round
            sync(dev)
            t0 = time.perf_counter()
            fn(t)
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    base = min(times["verl-style clip"])
    print(f"\nB={B}, T uniform in [{args.tmin}, {tmax}] per call, {args.calls} calls per row, device {dev}")
    print(f"{'row':24s} {'best us':>9s} {'median us':>10s} {'x verl best':>12s} {'warm-up s (20 calls)':>21s}")
    for name, ts in times.items():
        print(
            f"{name:24s} {min(ts) * 1e6:9.1f} {statistics.median(ts) * 1e6:10.1f} {min(ts) / base:12.2f} "
            f"{first[name]:21.2f}"
        )
    t = lengths[-1]
    a, b = ours(*inputs(t)), bucketed(*inputs(t))
    assert torch.allclose(a.loss, b.loss, rtol=1e-6, atol=1e-7), (a.loss, b.loss)


if __name__ == "__main__":
    main()
