"""Forward+backward time and peak memory of the LM-head + policy loss: naive vs fused vs TRL vs Liger.

    python benchmarks/bench_fused.py                          # CPU, the default configurations
    python benchmarks/bench_fused.py --configs 8x512x1024x32768 --repeats 3
    python benchmarks/bench_fused.py --device cuda            # GPU: bf16, V = 151,936, see benchmarks/README.md
    python benchmarks/bench_fused.py --check [--device cuda]  # loss and gradients of every method vs naive

A configuration is ``BxTxHxV``, optionally with ``:ragged``: then each sequence b has the first L_b positions
valid, L_b drawn uniformly from [T/4, T] by ``torch.randint`` with a CPU generator seeded 1 (the same lengths
on every device); otherwise every position is valid.

Every (configuration, method) runs in a fresh subprocess, so allocator state and peak memory never
leak from one measurement into the next. In the worker:

* the inputs are built (hidden (B,T,H), lm_head weight (V,H) in ``--dtype``, targets, fp32 old log-probs
  near the current policy's, GRPO-style advantages, the mask), then garbage is collected;
* before each run the peak is reset and the base taken: on CPU the kernel's peak-RSS mark
  (``/proc/self/clear_refs`` = 5, base = VmRSS, peak = VmHWM); on CUDA ``torch.cuda.reset_peak_memory_stats()``,
  base = ``memory_allocated()``, peak = ``max_memory_allocated()``. Memory "above inputs" is peak − base: it
  includes the gradients of hidden and weight (outputs, alive at the end);
* ``--warmup`` untimed runs (torch.compile'd and Triton code compiles and autotunes here; the first call's
  time is reported as "first s"), then ``--repeats`` timed runs, median reported; peak = max over all runs
  on CPU, over the timed runs on CUDA (compilation and autotuning allocate scratch memory once).
  Time on CPU is the wall clock and the process CPU time (all threads); on CUDA it is CUDA-event time
  around the call (after a synchronize), with the host's CPU time beside it.

The CPU machine is shared (other jobs come and go), so the methods run interleaved in ``--rounds`` rounds;
each ratio is the median over rounds of (method / naive, both from the same round).

Methods (temperature 1, token-mean over valid tokens, eps 0.2):

  naive-cfpo / naive-clip   logits = h @ W.T (in --dtype) -> fp32 log_softmax -> gather
                            -> cfpo_loss.compute_policy_loss
  fused-cfpo / fused-clip   cfpo_loss.fused_linear_policy_loss (public API, default chunk size)
  liger-clip                liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(beta=0, loss_type="dapo"), its
                            token-mean; compiled (torch.compile, its default) on CUDA, eager on CPU unless
                            --liger-compiled
  trl-cfpo                  log-probs from TRL 1.16's chunked LM-head kernel ``trl.kernels.ChunkedLogProbFunction``
                            called exactly as GRPOTrainer calls it (trl/trainer/utils.py ``add_fused_lm_head``):
                            vocab tiles of 32768, outputs ("log_probs", "entropy"); on a Triton device (CUDA)
                            only the valid positions (hidden[mask], labels[mask], then masked_scatter back),
                            elsewhere every position (labels clamped, then masked_fill); then
                            cfpo_loss.compute_policy_loss: what CFPOTrainer does with use_fused_loss=False
  gemm3                     the three GEMMs alone over the valid tokens, no grad: z = h·Wᵀ, z·W, zᵀ·h (z stands
                            in for the logits' gradient): the floor of any method that does not recompute

Ratios are printed against the naive path of the same objective, measured in the same run; besides
fused / liger, fused / trl and fused / gemm3 are printed when both ran.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import add_device_arg, machine_header, require_device, timed_call

METHODS = ("naive-cfpo", "naive-clip", "fused-cfpo", "fused-clip", "liger-clip", "trl-cfpo", "gemm3")
DEFAULT_METHODS = {"cpu": METHODS[:5], "cuda": ("naive-cfpo", "fused-cfpo", "trl-cfpo", "liger-clip", "gemm3")}
DEFAULT_CONFIGS = {
    "cpu": ("8x512x1024x32768", "8x512x1024x131072"),
    "cuda": ("8x1024x2048x151936:ragged", "16x1024x4096x151936"),
}
CHECK_CONFIGS = ("3x50x64x5000:ragged", "2x40x32x40000:ragged")  # the second spans two of TRL's vocab tiles
# per device: rounds, timed runs per subprocess, warm-up runs, dtype
DEVICE_DEFAULTS = {
    "cpu": dict(rounds=3, repeats=1, warmup=1, dtype="float32"),
    "cuda": dict(rounds=1, repeats=10, warmup=2, dtype="bfloat16"),
}
TRL_CHUNK_SIZE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE in trl 1.16.0 (read from trl if it has it)


def parse_config(text: str):
    dims, _, flag = text.partition(":")
    if flag not in ("", "ragged"):
        raise ValueError(f"configuration {text!r}: the only suffix is ':ragged'")
    B, T, H, V = (int(x) for x in dims.split("x"))
    return B, T, H, V, flag == "ragged"


def _objective(method: str):
    return method.split("-")[1] if "-" in method else None


# ---------------------------------------------------------------------------------------------- worker
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_reset(torch, device) -> float:
    """Reset the peak mark; return the base (MiB) the peak is measured above."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS") / 1024


def _peak_read(torch, device) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_kib("VmHWM") / 1024


def _make_inputs(torch, B, T, H, V, ragged=False, device="cpu", dtype=None, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, device=device)
    weight = torch.randn(V, H, generator=g, device=device) * (1.0 / H**0.5)
    targets = torch.randint(0, V, (B, T), generator=g, device=device)
    if dtype is not None and dtype != hidden.dtype:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    blk = 256 if device == "cpu" else 4096
    with torch.no_grad():  # current log-probs, in blocks (setup only), to put old_log_prob near them
        lp = torch.empty(B * T, device=device)
        h2 = hidden.reshape(B * T, H)
        for s in range(0, B * T, blk):
            z = h2[s : s + blk] @ weight.t()
            lp[s : s + blk] = z.float().log_softmax(-1).gather(1, targets.reshape(-1)[s : s + blk, None]).squeeze(1)
        old = (lp.view(B, T) + 0.1 * torch.randn(B, T, generator=g, device=device)).contiguous()
    rewards = torch.randn(B, generator=g, device=device)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    if ragged:
        lengths = torch.randint(T // 4, T + 1, (B,), generator=torch.Generator().manual_seed(seed + 1))
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return hidden, weight, targets, old, adv, mask


def _trl_chunk_size() -> int:
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return int(_CHUNKED_LOGPROB_CHUNK_SIZE)
    except Exception:  # noqa: BLE001 - trl.trainer pulls in datasets & co.; the kernel itself needs none of it
        return TRL_CHUNK_SIZE


def _step_fn(torch, method, hidden, weight, targets, old, adv, mask, liger_compiled):
    """One forward+backward of ``method``; the same code on every device. Returns the loss (None for gemm3)."""
    from cfpo_loss import compute_policy_loss, fused_linear_policy_loss

    objective = _objective(method)
    if method.startswith("naive"):

        def step():
            logits = torch.nn.functional.linear(hidden, weight)
            lp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out = compute_policy_loss(lp, old, adv, mask, objective=objective, agg="token-mean")
            out.loss.backward()
            return out.loss

        return step
    if method.startswith("fused"):

        def step():
            out = fused_linear_policy_loss(hidden, weight, targets, old, adv, mask, objective=objective)
            out.loss.backward()
            return out.loss

        return step
    if method == "liger-clip":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(
            beta=0.0,
            use_ref_model=False,
            epsilon_low=0.2,
            epsilon_high=0.2,
            loss_type="dapo",
            compiled=liger_compiled,
        )
        attention_mask = mask.long()

        def step():
            loss, _metrics = loss_fn(hidden, weight, targets, attention_mask, adv, old_per_token_logps=old)
            loss.backward()
            return loss

        return step
    if method == "trl-cfpo":
        from trl.kernels import ChunkedLogProbFunction

        try:  # TRL's own test for "a Triton device" (CUDA/XPU with triton importable)
            from trl.kernels.chunked_logprob import _use_triton

            compact = _use_triton(hidden.device)
        except ImportError:
            compact = hidden.device.type == "cuda"
        chunk = _trl_chunk_size()
        B, T, H = hidden.shape
        labels = targets.masked_fill(~mask, -100)  # what GRPOTrainer passes: padding labelled -100

        def step():  # trl/trainer/utils.py add_fused_lm_head._fused_forward, trl 1.16.0 (no softcap, scale 1)
            if compact:
                lp, _entropy, *_ = ChunkedLogProbFunction.apply(
                    hidden[mask], weight, None, labels[mask], 1.0, chunk, None, 1.0, ("log_probs", "entropy")
                )
                lp = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
            else:
                lp, _entropy, *_ = ChunkedLogProbFunction.apply(
                    hidden.reshape(-1, H),
                    weight,
                    None,
                    labels.clamp(min=0).reshape(-1),
                    1.0,
                    chunk,
                    None,
                    1.0,
                    ("log_probs", "entropy"),
                )
                lp = lp.view(B, T).masked_fill(~mask, 0)
            out = compute_policy_loss(lp, old, adv, mask, objective="cfpo", agg="token-mean")
            out.loss.backward()
            return out.loss

        return step
    if method == "gemm3":
        h_valid = hidden.detach()[mask]  # the valid tokens' rows, selected outside the timed call
        w = weight.detach()

        def step():
            with torch.no_grad():
                z = h_valid @ w.t()  # logits
                z @ w  # grad_h = dz · W
                z.t() @ h_valid  # grad_W = dzᵀ · h
            return None

        return step
    raise ValueError(f"unknown method {method!r}")


def worker(method, cfg, repeats, warmup, device, dtype_name, liger_compiled) -> dict:
    import torch

    B, T, H, V, ragged = cfg
    dtype = getattr(torch, dtype_name)
    hidden, weight, targets, old, adv, mask = _make_inputs(torch, B, T, H, V, ragged, device, dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    step = _step_fn(torch, method, hidden, weight, targets, old, adv, mask, liger_compiled)
    n_warm = warmup if repeats else 0  # --repeats 0: the single (cold) run is the timed one
    times, cpus, peaks, loss, first = [], [], [], None, None
    for i in range(n_warm + max(repeats, 1)):
        hidden.grad = weight.grad = None
        gc.collect()
        base = _peak_reset(torch, device)
        loss, dt, dc = timed_call(step, device)
        peaks.append(_peak_read(torch, device) - base)
        if i == 0:
            first = dt
        if i >= n_warm:
            times.append(dt)
            cpus.append(dc)
    return {
        "method": method,
        "B": B,
        "T": T,
        "H": H,
        "V": V,
        "ragged": ragged,
        "valid_tokens": int(mask.sum()),
        "device": device,
        "dtype": dtype_name,
        "times_s": times,
        "cpu_times_s": cpus,
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpus),
        "first_s": first,
        # CUDA: the timed runs' peak (the warm-ups' compilation and autotuning allocate scratch memory once);
        # CPU: every run's, as in the published CPU tables
        "peak_mib": max(peaks[n_warm:] if device == "cuda" else peaks),
        "peaks_mib": peaks,
        "loss": None if loss is None else float(loss),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------- --check
def check(methods, configs, device, dtype_name, liger_compiled) -> int:
    """Run every method once per configuration and compare loss and gradients with the naive path of the same
    objective computed in fp32 from the same (dtype-rounded) inputs. Errors: loss as |Δ| / mean |A| over valid
    tokens (the per-token objective's scale: the aggregated loss itself can be near 0), gradients as
    ‖Δ‖ / ‖reference‖. Tolerance 1e-4 in fp32, 3e-2 in bf16/fp16 (a wrong sign, normaliser or mask is O(1))."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32 (TF32 is off by default;
    torch.backends.cudnn.allow_tf32 = False  # nothing imported here may have turned it on)
    dtype = getattr(torch, dtype_name)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    failures = 0
    for cfg in configs:
        B, T, H, V, ragged = cfg
        hidden, weight, targets, old, adv, mask = _make_inputs(torch, B, T, H, V, ragged, device, dtype)
        scale = adv[:, None].expand(B, T)[mask].abs().mean().item()
        refs = {}
        for objective in sorted({_objective(m) for m in methods if m != "gemm3"} | {"cfpo"}):
            h32 = hidden.detach().float().requires_grad_(True)
            w32 = weight.detach().float().requires_grad_(True)
            loss = _step_fn(torch, "naive-" + objective, h32, w32, targets, old, adv, mask, False)()
            refs[objective] = (loss.item(), h32.grad, w32.grad)
        print(
            f"## check {B}x{T}x{H}x{V}{' ragged' if ragged else ''} ({int(mask.sum())} valid tokens), "
            f"{device} {dtype_name}, vs naive in fp32, tolerance {tol:g}"
        )
        for m in methods:
            if m == "gemm3":
                print(f"  {m:<11} skipped: no loss (the GEMM floor)")
                continue
            h = hidden.detach().clone().requires_grad_(True)
            w = weight.detach().clone().requires_grad_(True)
            try:
                loss = _step_fn(torch, m, h, w, targets, old, adv, mask, liger_compiled)()
            except Exception as ex:  # noqa: BLE001 - report and go on to the next method
                failures += 1
                print(f"  {m:<11} FAILED to run: {type(ex).__name__}: {str(ex)[:300]}")
                continue
            ref_loss, ref_h, ref_w = refs[_objective(m)]
            e_loss = abs(loss.item() - ref_loss) / scale
            e_h = ((h.grad.float() - ref_h).norm() / ref_h.norm()).item()
            e_w = ((w.grad.float() - ref_w).norm() / ref_w.norm()).item()
            ok = max(e_loss, e_h, e_w) <= tol
            failures += not ok
            print(
                f"  {m:<11} {'ok  ' if ok else 'FAIL'} loss {loss.item():+.6f} (ref {ref_loss:+.6f}, err {e_loss:.1e}) "
                f"grad_h err {e_h:.1e} grad_W err {e_w:.1e}"
            )
    print(f"check: {'all passed' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


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


def _run_one(method, cfg_text, args) -> dict:
    cfg = parse_config(cfg_text)
    if args.device == "cpu" and method.startswith("naive") and _estimate_naive_gib(*cfg[:4]) * 1.25 > _available_gib():
        return {
            "method": method,
            "skipped": f"needs ~{_estimate_naive_gib(*cfg[:4]):.1f} GiB, {_available_gib():.1f} GiB available",
        }
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        "--configs",
        cfg_text,
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--liger-compiled" if args.liger_compiled else "--no-liger-compiled",
    ]
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
        return f"load {os.getloadavg()[0]:.1f}"
    except OSError:
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arg(p)
    p.add_argument("--configs", nargs="+", help="BxTxHxV[:ragged] ... (default: per device, see the docstring)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: per device")
    p.add_argument("--rounds", type=int, help="rounds over all methods, interleaved (default: cpu 3, cuda 1)")
    p.add_argument(
        "--repeats",
        type=int,
        help="timed runs per subprocess (default: cpu 1, cuda 10; 0: one run, no warm-up, timed cold)",
    )
    p.add_argument("--warmup", type=int, help="untimed runs first (default: cpu 1, cuda 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: cpu float32, cuda bfloat16")
    p.add_argument(
        "--liger-compiled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Liger with compiled=True (torch.compile); default: on for cuda, off for cpu",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="run each method once on small configurations (or --configs) and compare loss and "
        "gradients with naive; exit 1 on a mismatch",
    )
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = DEVICE_DEFAULTS[args.device]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.liger_compiled is None:
        args.liger_compiled = args.device == "cuda"
    if args.configs is None:
        args.configs = list(CHECK_CONFIGS if args.check else DEFAULT_CONFIGS[args.device])
    if args.methods is None:
        args.methods = list(METHODS if args.check else DEFAULT_METHODS[args.device])
    configs = [parse_config(c) for c in args.configs]

    require_device(args.device)
    if args.worker:
        print(
            json.dumps(
                worker(args.worker, configs[0], args.repeats, args.warmup, args.device, args.dtype, args.liger_compiled)
            )
        )
        return 0

    print(machine_header(args.device), flush=True)
    if args.check:
        return check(args.methods, configs, args.device, args.dtype, args.liger_compiled)

    unit, mul = ("ms", 1e3) if args.device == "cuda" else ("s", 1.0)
    print(
        f"# {args.device} {args.dtype} | {args.rounds} rounds x "
        f"({f'{args.warmup} warm-up + {args.repeats} timed' if args.repeats else '1 cold timed run'}) | "
        f"liger compiled={args.liger_compiled} | {_load()}",
        flush=True,
    )
    results = []
    for cfg_text, _cfg in zip(args.configs, configs):
        runs = {m: [] for m in args.methods}
        for rnd in range(args.rounds):
            for m in args.methods:
                r = _run_one(m, cfg_text, args)
                r["round"] = rnd
                runs[m].append(r)
                results.append({"config": cfg_text, **r})
                if "time_s" in r:
                    print(
                        f"  [{cfg_text} round {rnd}] {m}: {r['time_s'] * mul:.2f} {unit} "
                        f"{'event' if args.device == 'cuda' else 'wall'}, {r['cpu_s']:.2f} s cpu, "
                        f"{r['peak_mib']:.0f} MiB, first call {r['first_s'] * mul:.2f} {unit}  ({_load()})",
                        flush=True,
                    )
                else:
                    print(f"  [{cfg_text} round {rnd}] {m}: {r.get('skipped') or r.get('failed')}", flush=True)
        _report(cfg_text, runs, unit, mul, "event" if args.device == "cuda" else "wall")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def _report(cfg_text, runs, unit, mul, clock) -> None:
    """Median time / CPU time, max peak; ratios = median over rounds of (method / naive of the same objective,
    same round)."""
    B, T, H, V, ragged = parse_config(cfg_text)
    valid = next((r["valid_tokens"] for rs in runs.values() for r in rs if "valid_tokens" in r), None)
    print(f"\n## B={B} T={T} H={H} V={V}{' ragged' if ragged else ''} ({valid} valid tokens)")
    t_col = f"{clock} {unit}"
    print(
        f"{'method':<12} {t_col:>9} {'cpu s':>7} {'peak MiB':>9} {clock + '/naive':>11} {'cpu/naive':>10} "
        f"{'mem/naive':>10} {'first ' + unit:>9}  per-round {clock} ({unit})"
    )
    ok = {m: [r for r in rs if "time_s" in r] for m, rs in runs.items()}

    def ratio(good, base, key, agg):
        vals = [r[key] / base[r["round"]][key] for r in good if r["round"] in base]
        return f"{agg(vals):.{3 if key == 'peak_mib' else 2}f}x" if vals else "n/a"

    naive_any = ok.get("naive-cfpo") or ok.get("naive-clip") or []
    for m, rs in runs.items():
        good = ok[m]
        if not good:
            why = (rs[0].get("skipped") or rs[0].get("failed")) if rs else "not run"
            print(f"{m:<12} {'-':>9} {'-':>7} {'-':>9} {'-':>11} {'-':>10} {'-':>10} {'-':>9}  {why}")
            continue
        objective = _objective(m)
        naive = (ok.get("naive-" + objective) if objective else None) or naive_any
        base = {r["round"]: r for r in naive}  # same objective's naive run; either (same cost) if only one ran
        per_round = ", ".join(f"{r['time_s'] * mul:.2f}" for r in good)
        print(
            f"{m:<12} {statistics.median(r['time_s'] for r in good) * mul:>9.2f} "
            f"{statistics.median(r['cpu_s'] for r in good):>7.2f} {max(r['peak_mib'] for r in good):>9.0f} "
            f"{ratio(good, base, 'time_s', statistics.median):>11} {ratio(good, base, 'cpu_s', statistics.median):>10} "
            f"{ratio(good, base, 'peak_mib', max):>10} {statistics.median(r['first_s'] for r in good) * mul:>9.2f}"
            f"  {per_round}"
        )
    for num, den in (("fused-clip", "liger-clip"), ("fused-cfpo", "trl-cfpo"), ("fused-cfpo", "gemm3")):
        f, d = ok.get(num, []), ok.get(den, [])
        if f and d:
            by = {r["round"]: r for r in d}
            mem = "" if den == "gemm3" else f", peak memory {ratio(f, by, 'peak_mib', max)}"
            print(
                f"{num} / {den}: {clock} {ratio(f, by, 'time_s', statistics.median)}, "
                f"cpu {ratio(f, by, 'cpu_s', statistics.median)}{mem} (medians of per-round ratios"
                f"{'' if den == 'gemm3' else '; memory: max'})"
            )
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
