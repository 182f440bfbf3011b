"""CFPO vs clipped GRPO as sample reuse grows: a CPU-sized version of the paper's stability experiment.

    pip install "cfpo-loss[trl,demo]"          # trl==1.16.0, matplotlib, tqdm (keep torch a CPU build)
    python examples/stability_demo.py          # default run: 8400 optimizer steps, 6.4 min measured on 2 CPU cores
    python examples/stability_demo.py --quick  # smoke run, ~15 s of training (outputs have the same format)

What it does
------------
A tiny causal LM (2-layer Qwen2, hidden 64, built from a config; WordLevel tokenizer built with the
`tokenizers` package; nothing is downloaded) is trained with the real TRL ``GRPOTrainer`` through
``cfpo_loss.adapters.trl.CFPOTrainer`` on a synthetic task with a verifiable reward, once for every
objective in {clip, cfpo} x num_iterations in {1, 4, 16}, all with the same seed, learning rate, eps
and number of generation rounds.

The task ("count"): the prompt is ``count from d :`` with d a digit; the ideal completion is the next
four numbers mod 10 (``count from 7 :`` -> ``8 9 0 1``). Reward = mean over the 4 completion positions of
1 for the right number, 0.1 for any other digit, 0 otherwise (so a random policy gets signal from the
first step and the curve shows both "learn to emit digits" and "learn to count").

Sample reuse: every run sees the same number of generation rounds (same prompts, same number of sampled
completions). ``num_iterations = k`` takes k optimizer steps on each generated batch (TRL's mu), so the
k = 16 runs make 16x the updates of the k = 1 runs on the same data. With k = 1 the ratio is exactly 1
and clip and cfpo are the same algorithm (identical trajectories); they can only differ for k > 1.

Outputs (in --out, default ``stability_demo_out/``):
  metrics.csv       one row per optimizer step and run: reward of the batch trained on, mean |r-1|,
                    max |r-1|, trust-region exit fraction (TRL's clip_ratio/region_mean), entropy,
                    approx KL(pi_old || pi_theta) on the batch, approx KL between consecutive rollout
                    policies (at the last step of each round), loss
  stability.png     one panel per metric against generation round: colour = num_iterations,
                    solid = cfpo, dashed = clip
  summary.md        a table per run: final reward, max |r-1|, mean exit fraction, final entropy, ...
  objectives.png    the paper's Figure 1 from the library's own cfpo_surrogate / clipped_surrogate:
                    objective and its gradient d/dr against r, A = +1 and A = -1, eps = 0.2
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "TRANSFORMERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

from cfpo_loss import cfpo_surrogate, clipped_surrogate, compute_policy_loss  # noqa: E402

OBJECTIVES = ("clip", "cfpo")
CSV_COLUMNS = (
    "objective",
    "num_iterations",
    "step",
    "round",
    "reward",
    "ratio_dev",
    "max_abs_ratio_dev",
    "exit_frac",
    "entropy",
    "kl_old",
    "kl_consecutive",
    "loss",
)
METRIC_LABELS = {  # CSV column -> panel title (one panel each)
    "reward": "reward (batch mean)",
    "entropy": "entropy (nats/token)",
    "ratio_dev": "mean |r - 1|",
    "max_abs_ratio_dev": "max |r - 1| in the batch",
    "exit_frac": "trust-region exit fraction",
    "kl_old": "approx KL(pi_old || pi_theta) on the batch",
    "kl_consecutive": "approx KL(pi_n || pi_n+1), consecutive rollout policies",
    "loss": "loss",
}

# ---------------------------------------------------------------------------------------------- the task
DIGITS = [str(i) for i in range(10)]
FILLER = [f"w{i}" for i in range(48)]  # non-answer words, so that "emit digits at all" must be learned too
SPECIALS = ["<pad>", "<eos>", "<unk>"]
COMPLETION_LEN = 4


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["count", "from", ":"] + DIGITS + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build_model(tokenizer, path: str, seed: int) -> str:
    """Save a randomly initialised 2-layer Qwen2 to `path`; every run loads these same initial weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


def prompt_dataset(n: int = 200):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"count from {i % 10} :" for i in range(n)]})


def count_reward(prompts, completions, **kwargs):
    """Verifiable reward: per position 1 for the right next number (mod 10), 0.1 for another digit, else 0."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        start = int(prompt.split()[2])
        words = completion.split()[:COMPLETION_LEN]
        score = 0.0
        for i, w in enumerate(words):
            if w == str((start + i + 1) % 10):
                score += 1.0
            elif w.isdigit():
                score += 0.1
        rewards.append(score / COMPLETION_LEN)
    return rewards


# ------------------------------------------------------------------------------------------ the trainer
def make_trainer_class():
    from transformers import TrainerCallback

    from cfpo_loss.adapters.trl import CFPOTrainer

    class DemoTrainer(CFPOTrainer):
        """CFPOTrainer that also records, per optimizer step, the trust-region statistics of the core
        (``compute_policy_loss(...).metrics`` on the log-probs TRL computed for the loss) and, at the end of each
        generation round, the approximate KL between the rollout policy of that round and the next one."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.demo_steps: list[dict] = []
            self._demo_capture = None
            self._demo_batch = None
            self.add_callback(_RoundEnd(self))

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if self._demo_capture is not None:
                self._demo_capture.append(out[0].detach())
            return out

        def _compute_loss(self, model, inputs):
            self._demo_capture = []
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                (logps,), self._demo_capture = self._demo_capture, None
            mask = inputs["completion_mask"].bool()
            old = inputs.get("old_per_token_logps")
            old = logps if old is None else old  # TRL's on-policy shortcut: old == current, r == 1
            out = compute_policy_loss(
                logps, old, inputs["advantages"], mask, objective=self.policy_objective,
                eps_low=self.epsilon_low, eps_high=self.epsilon_high,
            )  # fmt: skip
            m = {k: v.item() for k, v in out.metrics.items()}
            self.demo_steps.append(
                {
                    "ratio_dev": m["ratio_dev"],
                    "max_abs_ratio_dev": max(m["ratio_max"] - 1.0, 1.0 - m["ratio_min"]),
                    "exit_frac": m["tr_exit_frac"],
                    "kl_old": m["approx_kl_k3"],
                }
            )
            # the round's batch and its rollout-policy log-probs, for the consecutive-policy KL at round end
            self._demo_batch = (inputs, old, mask)
            return loss

        @torch.no_grad()
        def demo_round_kl(self) -> float:
            """approx KL(pi_n || pi_n+1) (k3, on round n's completions, sampled from pi_n): the rollout policy
            of round n against the policy after its num_iterations updates, the next round's rollout policy."""
            inputs, old, mask = self._demo_batch
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            new = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, inputs["completion_ids"].size(1)
            )[0]
            out = compute_policy_loss(new, old, inputs["advantages"], mask, eps_low=self.epsilon_low)
            return out.metrics["approx_kl_k3"].item()

    class _RoundEnd(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            t = self.trainer
            if state.global_step % t.num_iterations == 0 and t._demo_batch is not None:
                t.demo_steps[-1]["kl_consecutive"] = t.demo_round_kl()

    return DemoTrainer


class _Progress:
    """One tqdm bar over every optimizer step of every run."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    def callback(self, label: str):
        from transformers import TrainerCallback

        bar = self.bar

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                bar.set_description(label)

            def on_step_end(self, args, state, control, **kwargs):
                bar.update(1)

        return _Cb()


def run_one(trainer_cls, objective, k, rounds, model_path, tokenizer, work, opts, progress) -> list[dict]:
    from transformers import PrinterCallback

    from cfpo_loss.adapters.trl import CFPOConfig

    args = CFPOConfig(
        output_dir=os.path.join(work, f"{objective}-k{k}"),
        policy_objective=objective,
        loss_type="dapo",  # TRL's default aggregation (global token mean), the same for both objectives
        epsilon=opts.eps,
        epsilon_high=opts.eps,
        beta=0.0,
        num_iterations=k,
        max_steps=rounds * k,  # the same number of generation rounds for every k
        learning_rate=opts.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=opts.batch_size,
        num_generations=opts.num_generations,
        max_completion_length=COMPLETION_LEN,
        temperature=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=opts.seed,
        data_seed=opts.seed,
        disable_tqdm=True,
    )
    trainer = trainer_cls(
        model=model_path,
        reward_funcs=count_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
        callbacks=[progress.callback(f"{objective:>4} k={k:<2}")],
    )
    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout: the progress bar says enough
    trainer.train()

    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    rows, reward = [], float("nan")
    for step, demo in enumerate(trainer.demo_steps, start=1):
        h = logs.get(step, {})
        if h.get("reward") is not None:  # TRL logs the reward at the step that generated the batch
            reward = h["reward"]
        rows.append(
            {
                "objective": objective,
                "num_iterations": k,
                "step": step,
                "round": (step - 1) // k + 1,
                "reward": reward,  # reward of the batch this step trains on
                "ratio_dev": demo["ratio_dev"],
                "max_abs_ratio_dev": demo["max_abs_ratio_dev"],
                "exit_frac": demo["exit_frac"],
                "entropy": h.get("entropy", float("nan")),
                "kl_old": demo["kl_old"],
                "kl_consecutive": demo.get("kl_consecutive", ""),
                "loss": h.get("loss", float("nan")),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ the outputs
def per_round(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Mean of `key` over the steps of each generation round (the max for max_* columns; blanks skipped)."""
    acc: dict[int, list[float]] = {}
    for r in rows:
        if r[key] != "" and not math.isnan(float(r[key])):
            acc.setdefault(int(r["round"]), []).append(float(r[key]))
    xs = sorted(acc)
    if key.startswith("max"):
        return xs, [max(acc[x]) for x in xs]
    return xs, [sum(acc[x]) / len(acc[x]) for x in xs]


def smooth(ys: list[float], w: int, agg=None) -> list[float]:
    """Trailing moving average over w rounds (or another `agg` of the window, e.g. max)."""
    if w <= 1:
        return ys
    agg = agg or (lambda window: sum(window) / len(window))
    return [agg(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]


def plot_stability(runs: dict, iterations, path: str, smooth_w: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(sorted(iterations), ["tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple"]))
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for ax, (key, title) in zip(axes.flat, METRIC_LABELS.items()):
        for (objective, k), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            xs, ys = per_round(rows, key)
            ax.plot(
                xs, smooth(ys, smooth_w, max if key.startswith("max") else None), color=colors[k], linestyle="-" if objective == "cfpo" else "--",
                linewidth=1.6 if objective == "cfpo" else 1.3, label=f"{objective} k={k}",
            )  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("generation round")
        ax.grid(alpha=0.3)
        if key in ("ratio_dev", "max_abs_ratio_dev", "kl_old", "kl_consecutive"):
            ax.set_yscale("symlog", linthresh=1e-3)
    axes.flat[0].legend(fontsize=8, ncol=2)
    fig.suptitle(
        "clip (dashed) vs cfpo (solid), num_iterations k = reuse of each generated batch; "
        f"per-round means (max for max |r-1|){f', trailing mean (max) over {smooth_w} rounds' if smooth_w > 1 else ''}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_rows(runs: dict) -> list[dict]:
    out = []
    for (objective, k), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        _, rewards = per_round(rows, "reward")
        tail = max(1, len(rewards) // 10)
        entropies = [float(r["entropy"]) for r in rows if not math.isnan(float(r["entropy"]))]
        last = entropies[-max(1, len(entropies) // 10) :]
        kls = [float(r["kl_consecutive"]) for r in rows if r["kl_consecutive"] != ""]
        out.append(
            {
                "objective": objective,
                "k": k,
                "steps": len(rows),
                "reward_first": sum(rewards[:tail]) / tail,
                "reward_final": sum(rewards[-tail:]) / tail,
                "max_abs_dev": max(float(r["max_abs_ratio_dev"]) for r in rows),
                "mean_dev": sum(float(r["ratio_dev"]) for r in rows) / len(rows),
                "mean_exit": sum(float(r["exit_frac"]) for r in rows) / len(rows),
                "entropy_final": sum(last) / len(last) if last else float("nan"),
                "mean_kl_consecutive": sum(kls) / len(kls) if kls else float("nan"),
            }
        )
    return out


def write_summary(runs: dict, path: str, header: str) -> str:
    lines = [
        header,
        "",
        "| objective | num_iterations | optimizer steps | reward, first 10% of rounds | final reward (last 10%) "
        "| max \\|r-1\\| | mean \\|r-1\\| | mean exit fraction | final entropy | mean KL(pi_n \\|\\| pi_n+1) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary_rows(runs):
        lines.append(
            f"| {s['objective']} | {s['k']} | {s['steps']} | {s['reward_first']:.3f} | {s['reward_final']:.3f} "
            f"| {s['max_abs_dev']:.3f} | {s['mean_dev']:.4f} | {s['mean_exit']:.4f} | {s['entropy_final']:.3f} "
            f"| {s['mean_kl_consecutive']:.2e} |"
        )
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def plot_objectives(path: str, eps: float = 0.2) -> None:
    """The paper's Figure 1 from the library's own functions: J(r) and dJ/dr for clip and cfpo, A = +1 / -1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = torch.linspace(0.4, 1.6, 1201, dtype=torch.float64)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for col, a in enumerate((1.0, -1.0)):
        adv = torch.full_like(r, a)
        for name, fn, style in (("clip", clipped_surrogate, "--"), ("cfpo", cfpo_surrogate, "-")):
            x = r.clone().requires_grad_(True)
            j = fn(x, adv, eps_low=eps, eps_high=eps)
            (g,) = torch.autograd.grad(j.sum(), x)
            axes[0, col].plot(r, j.detach(), style, label=name, linewidth=2)
            axes[1, col].plot(r, g, style, label=name, linewidth=2)
        for row in range(2):
            ax = axes[row, col]
            for edge in (1 - eps, 1 + eps):
                ax.axvline(edge, color="grey", linewidth=0.8, linestyle=":")
            ax.axvline(1.0, color="black", linewidth=0.6)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=9)
        axes[0, col].set_title(f"objective J(r), A = {a:+.0f}, eps = {eps}")
        axes[1, col].set_title(f"gradient dJ/dr, A = {a:+.0f}")
        axes[1, col].set_xlabel("probability ratio r")
    fig.suptitle("clipped surrogate (PPO/GRPO) vs CFPO, drawn with cfpo_loss.clipped_surrogate / cfpo_surrogate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def redraw(out: str) -> int:
    runs: dict = {}
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        for row in csv.DictReader(f):
            runs.setdefault((row["objective"], int(row["num_iterations"])), []).append(row)
    rounds = max(int(r["round"]) for rows in runs.values() for r in rows)
    plot_stability(runs, {k for _, k in runs}, os.path.join(out, "stability.png"), max(1, rounds // 20))
    old = os.path.join(out, "summary.md")
    header = open(old).readline().rstrip("\n") if os.path.exists(old) else f"Stability demo: {rounds} generation rounds"
    print(write_summary(runs, old, header))
    return 0


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="stability_demo_out", help="output folder (default: %(default)s)")
    p.add_argument(
        "--plot-only", action="store_true", help="no training: redraw the figures and table from --out/metrics.csv"
    )
    p.add_argument("--quick", action="store_true", help="a < 2 minute smoke run: 3 rounds, same outputs")
    p.add_argument("--rounds", type=int, default=None, help="generation rounds per run (default 200; 3 with --quick)")
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 4, 16], help="num_iterations values")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eps", type=float, default=0.2, help="epsilon = epsilon_high (both objectives)")
    p.add_argument("--batch-size", type=int, default=64, help="completions per optimizer step")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (group size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: a model this small runs fastest on one; more threads only contend)",
    )  # fmt: skip
    opts = p.parse_args(argv)
    rounds = opts.rounds if opts.rounds is not None else (3 if opts.quick else 200)
    if rounds < 1:
        p.error("--rounds must be >= 1")
    if any(k < 1 for k in opts.iterations):
        p.error("--iterations must be >= 1")

    import logging
    import warnings

    import datasets
    import transformers

    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    os.makedirs(opts.out, exist_ok=True)
    plot_objectives(os.path.join(opts.out, "objectives.png"), eps=opts.eps)
    if opts.plot_only:
        return redraw(opts.out)

    trainer_cls = make_trainer_class()
    tokenizer = build_tokenizer()
    iterations = sorted(set(opts.iterations))
    total = sum(rounds * k for k in iterations) * len(opts.objectives)
    print(
        f"stability demo: {len(opts.objectives)} objectives x num_iterations {iterations}, {rounds} generation rounds "
        f"each ({total} optimizer steps), lr {opts.lr}, eps {opts.eps}, seed {opts.seed} -> {opts.out}/",
        flush=True,
    )
    t0 = time.time()
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="cfpo_stability_") as work:
        model_path = build_model(tokenizer, os.path.join(work, "tiny-qwen2"), opts.seed)
        progress = _Progress(total)
        for k in iterations:
            for objective in opts.objectives:
                runs[(objective, k)] = run_one(trainer_cls, objective, k, rounds, model_path, tokenizer, work, opts, progress)
        progress.bar.close()
    elapsed = time.time() - t0

    with open(os.path.join(opts.out, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for rows in runs.values():
            writer.writerows(rows)
    smooth_w = max(1, rounds // 20)
    plot_stability(runs, iterations, os.path.join(opts.out, "stability.png"), smooth_w)
    header = (
        f"Stability demo: {rounds} generation rounds per run, batch {opts.batch_size} completions "
        f"({opts.num_generations} per prompt), lr {opts.lr}, eps {opts.eps}, seed {opts.seed}; "
        f"training took {elapsed / 60:.1f} min, torch threads {opts.threads}."
    )
    table = write_summary(runs, os.path.join(opts.out, "summary.md"), header)
    print("\n" + table)
    print(f"wrote {opts.out}/metrics.csv, stability.png, summary.md, objectives.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
