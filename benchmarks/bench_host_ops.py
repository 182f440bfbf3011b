"""Host-side operations per policy-loss step: what bounds the loss on a GPU, countable on any CPU.

    python benchmarks/bench_host_ops.py [--batch 64] [--seq 4096]

On a GPU the policy loss alone is host-bound (measured on an H100: the fast path's kernels take ~50 µs
of a 0.8 ms call), so its wall time follows the number of operations the host dispatches and the number of
device-to-host synchronisations, not the arithmetic. Both are deterministic and device-independent, so
this script counts them here, under a ``TorchDispatchMode``, for one forward + backward with the metrics
read as a logger reads them:

  ops      dispatched aten operations that launch a kernel on a GPU (views, detach, expand, ... excluded)
  syncs    device-to-host waits: what .item(), float(), bool() and nonzero dispatch to, plus each
           Tensor.tolist() (one transfer on a GPU; on CPU it bypasses the dispatcher, so it is counted by
           wrapping the method)

Rows: the verl-style clip baseline of ``bench_elementwise.py`` (an eager copy of verl 0.9.1's vanilla loss,
metrics read with .item() as verl's loss function does), ours clip / cfpo eager with the metrics read by
``read_metrics`` (one transfer), with the selects as they run on CUDA (``torch.where``) and as on CPU
(bit operations), each with its default finite check (the one sync, which brings the metrics along). A count is a
proxy, not a time: a GPU figure still needs a GPU (bench_elementwise.py --device cuda).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_elementwise import verl_style_clip

import cfpo_loss._per_token as per_token
from cfpo_loss import compute_policy_loss

NO_KERNEL = {
    "detach",
    "view",
    "expand",
    "unbind",
    "lift_fresh",
    "alias",
    "t",
    "transpose",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "_unsafe_view",
    "reshape",
    "as_strided",
    "scalar_tensor",
}
SYNCS = {"_local_scalar_dense", "nonzero", "item"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.by_name = 0, 0, collections.Counter()

    def __enter__(self):
        tolist, self._tolist = torch.Tensor.tolist, torch.Tensor.tolist

        def counted(t):
            self.syncs += 1
            return tolist(t)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_KERNEL:
            self.ops += 1
            self.by_name[name] += 1
        self.syncs += name in SYNCS
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--verbose", action="store_true", help="ops by name")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(args.batch, args.seq, generator=g).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(args.batch, args.seq, generator=g)
    adv = torch.randn(args.batch, 1, generator=g)
    mask = torch.rand(args.batch, args.seq, generator=g) > 0.2

    def verl():
        loss, _ = verl_style_clip(old, lp, adv, mask.float())
        loss.backward()

    def ours(objective):
        def step():
            out = compute_policy_loss(
                lp, old, adv, mask, objective=objective, dual_clip=3.0 if objective == "clip" else None
            )
            out.loss.backward()
            out.metric_floats()

        return step

    rows = [("verl-style clip (baseline)", verl, None)]
    for select in ("where (as on CUDA)", "bit ops (as on CPU)"):
        for objective in ("clip", "cfpo"):
            rows.append((f"ours {objective}, eager, {select}", ours(objective), select.startswith("where")))
    original = per_token.Select.__init__
    print(f"policy loss fwd+bwd+metrics read, {args.batch}x{args.seq}, torch {torch.__version__}")
    print("| row | ops | syncs | ops / baseline |\n|---|---:|---:|---:|")
    base = None
    for name, fn, where in rows:
        if where is not None:

            def init(self, m, dtype, bitwise=True, _where=where):  # force the row's select, whatever the size
                original(self, m, dtype, not _where)

            per_token.Select.__init__ = init
        try:
            fn()  # warm-up (lazy init, caches)
            with Count() as c:
                fn()
        finally:
            per_token.Select.__init__ = original
        base = base or c.ops
        print(f"| {name} | {c.ops} | {c.syncs} | {c.ops / base:.2f} |")
        if args.verbose:
            print("    ", dict(c.by_name.most_common()))


if __name__ == "__main__":
    main()
