"""One TRL loss step (``_compute_loss`` forward + backward) for GRPOTrainer, CFPOTrainer and
CFPOTrainer(use_fused_loss=True): same model shapes and inputs, each (size, row, precision) in a fresh process.

    python benchmarks/bench_trl_fused.py                                  # CPU: the small cases below
    python benchmarks/bench_trl_fused.py --sizes tiny --rows grpo cfpo cfpo-fused --repeats 1   # smoke
    python benchmarks/bench_trl_fused.py --device cuda                    # GPU: Qwen2 shapes, V = 151,936
    python benchmarks/bench_trl_fused.py --device cuda --sizes 1.5b       # one size per call

Rows (all through the trainers' public constructors; nothing else is touched but ``_compute_loss``):
  grpo        trl.GRPOTrainer(args=GRPOConfig(...)): TRL 1.16's own loss (its chunked log-prob kernel + clip)
  cfpo        CFPOTrainer(args=CFPOConfig(..., use_fused_loss=False)): TRL's kernel, then the CFPO objective
  cfpo-fused  CFPOTrainer(args=CFPOConfig(..., use_fused_loss=True)): cfpo_loss's fused LM head + loss

The model is a Qwen2ForCausalLM built from a config (random weights, untied LM head, no download) in fp32 on
the device, which is what TRL loads from a path by default (its model_init_kwargs dtype defaults to float32);
``--precisions bf16`` sets TRL's ``bf16=True`` (GRPOConfig's own default), under which TRL runs the forward in
``accelerator.autocast()`` (bf16 autocast), and ``fp32`` sets ``bf16=False``. As ``Trainer.train`` would, the
step runs with gradient checkpointing on when the config asks for it (GRPOConfig's default;
``--no-gradient-checkpointing`` to turn it off); the output says which. Inputs: ``num_generations=4``,
32-token prompts, completions of the size's length, every completion token valid, advantages ~ N(0, 1), old
log-probs at -log V + 0.1·N(0, 1) (the random model's log-probs are ≈ -log V, so ratios stay near 1).

Time per step: the median of ``--repeats`` runs after ``--warmup`` runs (CPU: wall clock; CUDA: CUDA events
around the step after a synchronize); the first call's time (compilation, autotuning) is printed beside it.
Memory: CPU, the process's peak RSS (model + activations + loss); CUDA, ``max_memory_allocated`` above
``memory_allocated`` at the start of the step (model and inputs excluded, gradients included), and the
absolute peak. Ratios are against the grpo row of the same size and precision (or, if it did not run, cfpo).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import add_device_arg, machine_header, require_device, timed_call

# name: (layers, hidden, intermediate, heads, kv heads, vocab, batch, completion length)
SIZES = {
    "1.5b": (28, 1536, 8960, 12, 2, 151936, 8, 1024),  # Qwen2.5-1.5B's shapes (untied head), 8 x 1024 tokens
    "4l-h1024": (4, 1024, 5504, 8, 2, 151936, 16, 1024),  # 4 layers, H 1024, 16 x 1024 tokens
    "4l-h2048": (4, 2048, 11008, 16, 2, 151936, 8, 2048),  # Qwen2.5-3B's layer shapes, 4 layers, 8 x 2048 tokens
    "cpu-v32k": (2, 256, 512, 4, 2, 32768, 8, 256),  # the CPU cases of this script's first version
    "cpu-v131k": (2, 256, 512, 4, 2, 131072, 8, 256),
    "tiny": (2, 64, 128, 4, 2, 4096, 4, 32),  # smoke test
}
ROWS = ("grpo", "cfpo", "cfpo-fused")
PROMPT_LEN = 32
DEVICE_DEFAULTS = {
    "cpu": dict(
        sizes=["cpu-v32k", "cpu-v131k"], rows=["cfpo", "cfpo-fused"], precisions=["fp32", "bf16"], repeats=3, warmup=1
    ),
    "cuda": dict(sizes=["1.5b", "4l-h1024", "4l-h2048"], rows=list(ROWS), precisions=["bf16"], repeats=5, warmup=2),
}


def child(size, row, precision, device, repeats, warmup, grad_ckpt) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import resource

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from cfpo_loss.adapters.trl import CFPOConfig, CFPOTrainer

    L, H, inter, heads, kv_heads, V, B, T = SIZES[size]
    P = PROMPT_LEN
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(2)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    config = Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=inter,
        num_hidden_layers=L,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(4096, P + T),
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = Qwen2ForCausalLM(config)  # fp32, TRL's default dtype for a model it loads
    d = tempfile.mkdtemp()
    common = dict(
        output_dir=d + "/o",
        per_device_train_batch_size=B,
        num_generations=4,
        max_completion_length=T,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        disable_tqdm=True,
    )
    if row == "grpo":
        cls, args = GRPOTrainer, GRPOConfig(**common)
    else:
        cls, args = CFPOTrainer, CFPOConfig(**common, use_fused_loss=row == "cfpo-fused")
    tr = cls(
        model=model,
        reward_funcs=lambda completions, **k: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}),
        processing_class=tok,
    )
    if grad_ckpt and getattr(args, "gradient_checkpointing", False) and not tr.model.is_gradient_checkpointing:
        tr.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    dev = tr.accelerator.device
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        prompt_ids=torch.randint(3, V, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(3, V, (B, T), generator=g),
        completion_mask=torch.ones(B, T, dtype=torch.long),
        advantages=torch.randn(B, generator=g),
        num_items_in_batch=torch.tensor(B * T),
        old_per_token_logps=-math.log(V) + 0.1 * torch.randn(B, T, generator=g),
    )
    inputs = {k: v.to(dev) for k, v in inputs.items()}

    def step():
        tr.model.zero_grad(set_to_none=True)
        loss = tr._compute_loss(tr.model, inputs)
        loss.backward()
        return loss

    times, peaks_above, peaks_total, first, loss = [], [], [], None, None
    for i in range(warmup + repeats):
        tr.model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        loss, dt, _cpu = timed_call(step, device)
        if device == "cuda":
            peaks_above.append((torch.cuda.max_memory_allocated() - base) / 2**20)
            peaks_total.append(torch.cuda.max_memory_allocated() / 2**20)
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    out = dict(
        size=size,
        row=row,
        precision=precision,
        device=device,
        layers=L,
        hidden=H,
        vocab=V,
        batch=B,
        completion_len=T,
        s_per_step=statistics.median(times),
        times_s=times,
        first_s=first,
        loss=float(loss),
        grad_ckpt=bool(tr.model.is_gradient_checkpointing),
        attn=getattr(tr.model.config, "_attn_implementation", None),
    )
    if device == "cuda":
        out.update(peak_above_mib=max(peaks_above), peak_total_mib=max(peaks_total))
    else:
        out.update(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arg(p)
    p.add_argument(
        "--sizes", nargs="+", choices=list(SIZES), help="default: cpu cpu-v32k cpu-v131k; cuda all three Qwen2 shapes"
    )
    p.add_argument("--rows", nargs="+", choices=ROWS, help="default: cpu cfpo cfpo-fused; cuda all three")
    p.add_argument(
        "--precisions", nargs="+", choices=("fp32", "bf16"), help="TRL bf16=False / True (default: cpu both, cuda bf16)"
    )
    p.add_argument("--repeats", type=int, help="timed steps (default: cpu 3, cuda 5)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: cpu 1, cuda 2)")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="enable it when the config asks for it, as Trainer.train does (default: on)",
    )
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    require_device(args.device)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.repeats, args.warmup, args.gradient_checkpointing)))
        return 0

    print(machine_header(args.device), flush=True)
    unit, mul = ("ms", 1e3) if args.device == "cuda" else ("s", 1.0)
    mem_key = "peak_above_mib" if args.device == "cuda" else "peak_rss_mib"
    print(
        f"# {args.device} | {args.warmup} warm-up + {args.repeats} timed steps per process, median | "
        f"memory: {'max_memory_allocated above the step start' if args.device == 'cuda' else 'peak RSS'}",
        flush=True,
    )
    results = []
    for size in args.sizes:
        for precision in args.precisions:
            got = {}
            for row in args.rows:
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    size,
                    row,
                    precision,
                    "--device",
                    args.device,
                    "--repeats",
                    str(args.repeats),
                    "--warmup",
                    str(args.warmup),
                    "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode == 0:
                    got[row] = json.loads(proc.stdout.strip().splitlines()[-1])
                    results.append(got[row])
                else:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    print(f"  [{size} {precision}] {row}: failed: {' | '.join(tail)}", flush=True)
            _report(size, precision, got, unit, mul, mem_key)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def _report(size, precision, got, unit, mul, mem_key) -> None:
    L, H, _, _, _, V, B, T = SIZES[size]
    base = got.get("grpo") or got.get("cfpo")
    if not got:
        return
    any_row = next(iter(got.values()))
    print(
        f"\n## {size}: {L} layers, H={H}, V={V}, {B}x{T} completion tokens, TRL bf16={precision == 'bf16'}, "
        f"gradient checkpointing {any_row['grad_ckpt']}, attention {any_row['attn']}"
    )
    print(
        f"{'row':<11} {unit + '/step':>9} {'x ' + ('grpo' if 'grpo' in got else 'cfpo'):>7} {'peak MiB':>9} "
        f"{'x mem':>6} {'first ' + unit:>9}  loss"
    )
    for row, r in got.items():
        t, m = r["s_per_step"], r[mem_key]
        print(
            f"{row:<11} {t * mul:>9.2f} {t / base['s_per_step']:>6.2f}x {m:>9.0f} {m / base[mem_key]:>5.2f}x "
            f"{r['first_s'] * mul:>9.2f}  {r['loss']:+.6f}"
        )
    if "cfpo-fused" in got and "cfpo" in got:
        print(
            f"cfpo-fused / cfpo: time {got['cfpo-fused']['s_per_step'] / got['cfpo']['s_per_step']:.2f}x, "
            f"memory {got['cfpo-fused'][mem_key] / got['cfpo'][mem_key]:.2f}x"
        )
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
