"""Forward+backward time and peak memory of the LM-head + policy loss: naive vs fused vs Liger.

    python benchmarks/bench_fused.py                          # the default configurations
    python benchmarks/bench_fused.py --configs 8x512x1024x32768 --repeats 3

Every (configuration, method) runs in a fresh subprocess, so allocator state and peak memory never
leak from one measurement into the next. In the worker:

* the inputs are built (hidden (B,T,H), lm_head weight (V,H), targets, old log-probs near the current
  policy's, GRPO-style advantages, a full mask), then garbage is collected;
* the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5) and the current RSS taken as the
  base; one forward+backward runs; the peak above the base is read from ``VmHWM``. This is the memory
  "above inputs": it includes the gradients of hidden and weight (they are outputs, alive at the end);
* one untimed warm-up run, then ``--repeats`` timed runs; peak = max over all runs (warm-up included).

The machine is shared (other jobs come and go), so the methods run interleaved in ``--rounds`` rounds;
each ratio is the median over rounds of (method / naive, both from the same round). Besides wall time,
the process CPU time (all threads) is reported: other processes competing for the cores inflate wall
time far more than CPU time, so the CPU-time ratio is the steadier one on a loaded machine.

Methods (all fp32, temperature 1, token-mean over valid tokens, eps 0.2):

  naive-cfpo / naive-clip   logits = h @ W.T -> log_softmax -> gather -> cfpo_loss.compute_policy_loss
  fused-cfpo / fused-clip   cfpo_loss.fused.fused_linear_policy_loss (default chunk size)
  liger-clip                liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(beta=0, loss_type="dapo")
                            (its token-mean; ``--liger-compiled`` to let it torch.compile its loss math)
  trl-cfpo                  (opt-in, needs trl==1.16.0) log-probs from TRL's own chunked LM-head kernel
                            ``trl.kernels.ChunkedLogProbFunction`` exactly as GRPOTrainer 1.16 calls it on a
                            non-Triton device (all positions, 32768-wide vocab tiles, log_probs + entropy),
                            then cfpo_loss.compute_policy_loss: what CFPOTrainer does today

Ratios are printed against the naive path of the same objective, measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

METHODS = ("naive-cfpo", "naive-clip", "fused-cfpo", "fused-clip", "liger-clip", "trl-cfpo")
DEFAULT_METHODS = METHODS[:5]
DEFAULT_CONFIGS = ("8x512x1024x32768", "8x512x1024x131072")


# ---------------------------------------------------------------------------------------------- worker
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _make_inputs(torch, B, T, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (1.0 / H**0.5)
    targets = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():  # current log-probs, in blocks (setup only), to put old_log_prob near them
        lp = torch.empty(B * T)
        h2 = hidden.reshape(B * T, H)
        for s in range(0, B * T, 256):
            z = h2[s : s + 256] @ weight.t()
            lp[s : s + 256] = z.log_softmax(-1).gather(1, targets.reshape(-1)[s : s + 256, None]).squeeze(1)
        old = (lp.view(B, T) + 0.1 * torch.randn(B, T, generator=g)).contiguous()
    rewards = torch.randn(B, generator=g)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    mask = torch.ones(B, T, dtype=torch.bool)
    return hidden, weight, targets, old, adv, mask


def _step_fn(torch, method, hidden, weight, targets, old, adv, mask, liger_compiled):
    if method.startswith("naive"):
        from cfpo_loss import compute_policy_loss

        objective = method.split("-")[1]

        def step():
            logits = torch.nn.functional.linear(hidden, weight)
            lp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out = compute_policy_loss(lp, old, adv, mask, objective=objective, agg="token-mean")
            out.loss.backward()
            return out.loss

        return step
    if method.startswith("fused"):
        from cfpo_loss.fused import fused_linear_policy_loss

        objective = method.split("-")[1]

        def step():
            out = fused_linear_policy_loss(hidden, weight, targets, old, adv, mask, objective=objective)
            out.loss.backward()
            return out.loss

        return step
    if method == "liger-clip":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
            compiled=liger_compiled,
        )

        def step():
            loss, _metrics = loss_fn(hidden, weight, targets, mask.long(), adv, old_per_token_logps=old)
            loss.backward()
            return loss

        return step
    if method == "trl-cfpo":
        from cfpo_loss import compute_policy_loss
        from trl.kernels import ChunkedLogProbFunction

        B, T, H = hidden.shape

        def step():
            lp, _entropy, *_ = ChunkedLogProbFunction.apply(
                hidden.reshape(-1, H), weight, None, targets.reshape(-1), 1.0, 32768, None, 1.0,
                ("log_probs", "entropy"),
            )
            out = compute_policy_loss(lp.view(B, T), old, adv, mask, objective="cfpo", agg="token-mean")
            out.loss.backward()
            return out.loss

        return step
    raise ValueError(f"unknown method {method!r}")


def worker(method: str, B: int, T: int, H: int, V: int, repeats: int, liger_compiled: bool) -> dict:
    import torch

    hidden, weight, targets, old, adv, mask = _make_inputs(torch, B, T, H, V)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    step = _step_fn(torch, method, hidden, weight, targets, old, adv, mask, liger_compiled)
    times, cpus, peaks, loss = [], [], [], None
    for i in range(repeats + 1 if repeats else 1):  # run 0 is the warm-up
        hidden.grad = weight.grad = None
        gc.collect()
        _reset_peak()
        base = _rss_kib("VmRSS")
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        peaks.append(_rss_kib("VmHWM") - base)
        if i or not repeats:  # --repeats 0: the single (cold) run is the timed one
            times.append(dt)
            cpus.append(dc)
    return {
        "method": method, "B": B, "T": T, "H": H, "V": V, "times_s": times, "cpu_times_s": cpus,
        "time_s": statistics.median(times), "cpu_s": statistics.median(cpus),
        "peak_mib": max(peaks) / 1024, "peaks_mib": [x / 1024 for x in peaks],
        "loss": float(loss), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------- driver
def _estimate_naive_gib(B, T, H, V) -> float:
    # logits, log_softmax output, and their gradients: ~4 (N x V) fp32 tensors, plus grads of h and W
    return (4 * B * T * V + V * H + B * T * H) * 4 / 2**30


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _run_one(method, cfg, args) -> dict:
    if method.startswith("naive") and _estimate_naive_gib(*cfg) * 1.25 > _available_gib():
        return {"method": method, "skipped": f"needs ~{_estimate_naive_gib(*cfg):.1f} GiB, "
                f"{_available_gib():.1f} GiB available"}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--configs", "x".join(map(str, cfg)),
           "--repeats", str(args.repeats)] + (["--liger-compiled"] if args.liger_compiled else [])
    # Tensors >= 1 MiB get their own mmap and go back to the OS when freed, so RSS tracks live tensors
    # (glibc would otherwise keep freed blocks up to 32 MiB on its heap and hide them from later peaks).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"method": method, "failed": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> str:
    try:
        return "load %.1f" % os.getloadavg()[0]
    except OSError:
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="BxTxHxV ...")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over all methods (interleaved, so load drift hits every method alike)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per subprocess, after one warm-up (0: one run, no warm-up, timed cold)")
    p.add_argument("--liger-compiled", action="store_true", help="Liger with compiled=True (torch.compile)")
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs]

    if args.worker:
        print(json.dumps(worker(args.worker, *configs[0], args.repeats, args.liger_compiled)))
        return 0

    import torch

    print(f"# {platform.platform()} | {platform.machine()} | cpus={os.cpu_count()} | torch {torch.__version__} "
          f"threads={torch.get_num_threads()} | {args.rounds} rounds x "
          f"({'1 warm-up + %d timed' % args.repeats if args.repeats else '1 cold timed run'}) | "
          f"{_load()}", flush=True)
    results = []
    for cfg in configs:
        B, T, H, V = cfg
        runs = {m: [] for m in args.methods}
        for rnd in range(args.rounds):
            for m in args.methods:
                r = _run_one(m, cfg, args)
                r["round"] = rnd
                runs[m].append(r)
                results.append({"config": cfg, **r})
                if "time_s" in r:
                    print(f"  [{B}x{T}x{H}x{V} round {rnd}] {m}: {r['time_s']:.2f} s wall, {r['cpu_s']:.2f} s cpu, "
                          f"{r['peak_mib']:.0f} MiB  ({_load()})", flush=True)
                else:
                    print(f"  [{B}x{T}x{H}x{V} round {rnd}] {m}: {r.get('skipped') or r.get('failed')}", flush=True)
        _report(cfg, runs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def _report(cfg, runs) -> None:
    """Median wall / CPU time, max peak; ratios = median over rounds of (method / naive of the same objective,
    same round)."""
    B, T, H, V = cfg
    print(f"\n## B={B} T={T} H={H} V={V}")
    print(f"{'method':<12} {'wall s':>7} {'cpu s':>7} {'peak MiB':>9} {'wall/naive':>11} {'cpu/naive':>10} "
          f"{'mem/naive':>10}  per-round wall (s)")
    ok = {m: [r for r in rs if "time_s" in r] for m, rs in runs.items()}

    def ratio(good, base, key, agg):
        vals = [r[key] / base[r["round"]][key] for r in good if r["round"] in base]
        return f"{agg(vals):.{3 if key == 'peak_mib' else 2}f}x" if vals else "n/a"

    for m, rs in runs.items():
        good = ok[m]
        if not good:
            why = (rs[0].get("skipped") or rs[0].get("failed")) if rs else "not run"
            print(f"{m:<12} {'-':>7} {'-':>7} {'-':>9} {'-':>11} {'-':>10} {'-':>10}  {why}")
            continue
        naive = ok.get("naive-" + m.split("-")[1]) or ok.get("naive-cfpo") or ok.get("naive-clip") or []
        base = {r["round"]: r for r in naive}  # same objective's naive run; either (same cost) if only one ran
        per_round = ", ".join(f"{r['time_s']:.2f}" for r in good)
        print(f"{m:<12} {statistics.median(r['time_s'] for r in good):>7.2f} "
              f"{statistics.median(r['cpu_s'] for r in good):>7.2f} {max(r['peak_mib'] for r in good):>9.0f} "
              f"{ratio(good, base, 'time_s', statistics.median):>11} {ratio(good, base, 'cpu_s', statistics.median):>10} "
              f"{ratio(good, base, 'peak_mib', max):>10}  {per_round}")
    f, lg = ok.get("fused-clip", []), ok.get("liger-clip", [])
    if f and lg:
        by = {r["round"]: r for r in lg}
        print(f"fused-clip / liger-clip: wall {ratio(f, by, 'time_s', statistics.median)}, "
              f"cpu {ratio(f, by, 'cpu_s', statistics.median)}, peak memory {ratio(f, by, 'peak_mib', max)} "
              f"(medians of per-round ratios; memory: max)")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
