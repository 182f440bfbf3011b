"""CFPO vs clipped GRPO as off-policy pressure grows: a CPU-sized version of the paper's stability experiments.

    pip install "cfpo-loss[trl,demo]"          # trl==1.16.0, matplotlib, tqdm (keep torch a CPU build)
    python examples/stability_demo.py          # default run: 8400 optimizer steps, 6.4 min measured on 2 CPU cores
    python examples/stability_demo.py --quick  # smoke run, ~15 s of training (outputs have the same format)
    python examples/stability_demo.py --grid   # clip/cfpo x num_iterations 1 2 4 8 x batch ratio 1 2 4 8: 32 runs of
                                               # 100 rounds, 23 min measured (15 min CPU) on 2 shared CPU cores
    python examples/stability_demo.py --grid --quick   # 2 rounds, iterations 1 2 x batch ratios 1 2 (same outputs)
    python examples/stability_demo.py --trainer rloo   # the same runs with TRL's RLOOTrainer (CFPORLOOTrainer): 6.0 min
                                                       # measured; -> stability_demo_rloo_out/

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

With ``--trainer rloo`` the runs use TRL's ``RLOOTrainer`` through ``cfpo_loss.adapters.trl.CFPORLOOTrainer``
instead: leave-one-out advantages (not normalised, RLOO's default), ONE ratio per completion r = exp(sum_t log pi_theta
- sum_t log pi_old) and the mean over completions. The columns ratio_dev, max_abs_ratio_dev and exit_frac are then the
statistics of that sequence ratio (as CFPORLOOTrainer logs them: cfpo/ratio_*, clip_ratio/region_mean); the KL
columns stay per token (from the rollout policy's per-token log-probs, which RLOOTrainer sums into old_logps).

Sample reuse: every run sees the same number of generation rounds (same prompts, same number of sampled
completions). ``num_iterations = k`` takes k optimizer steps on each generated batch (TRL's mu), so the
k = 16 runs make 16x the updates of the k = 1 runs on the same data. With k = 1 the ratio is exactly 1
and clip and cfpo are the same algorithm (identical trajectories); they can only differ for k > 1.

The grid (--grid): the paper's second axis, the batch ratio b = generation batch / mini-batch, crossed
with num_iterations k (its verl ablation, Figures 4-8). Cell (objective, k, b) maps to TRL 1.16 as

    per_device_train_batch_size = batch / b     the mini-batch of one optimizer step (64 / b by default)
    steps_per_generation        = b             so one generation batch = batch completions (8 prompts x 8)
    gradient_accumulation_steps = 1             so every mini-batch is its own optimizer step
    num_iterations              = k             passes over the generated batch
    max_steps                   = rounds * k * b

Each round TRL generates `batch` completions with the current policy, stores their log-probs as the old
policy (it does so whenever gradient_accumulation_steps is not a multiple of steps_per_generation x
num_iterations, i.e. in every cell but k = b = 1), shuffles them, splits them into b mini-batches and
takes k passes of b optimizer steps, each against that lagging old policy: the first step of a round is
on-policy (r = 1), every later one is not. Every cell generates the same number of samples (rounds x
batch, the same prompts in the same order); only how many optimizer steps are taken on them changes.
Single run per cell, one seed (--seed to repeat).

Outputs (in --out, default ``stability_demo_out/``):
  metrics.csv       one row per optimizer step and run: objective, num_iterations, batch_ratio, step, round,
                    reward of the batch trained on, mean |r-1|, max |r-1|, trust-region exit fraction
                    (TRL's clip_ratio/region_mean), entropy, approx KL(pi_old || pi_theta) on the mini-batch,
                    approx KL between consecutive rollout policies (at the last step of each round, on all
                    of that round's completions), loss
  stability.png     one panel per metric against generation round: colour = num_iterations,
                    solid = cfpo, dashed = clip
  summary.md        a table per run: final reward, max |r-1|, mean exit fraction, final entropy, ...
  objectives.png    the paper's Figure 1 from the library's own cfpo_surrogate / clipped_surrogate:
                    objective and its gradient d/dr against r, A = +1 and A = -1, eps = 0.2
With --grid, instead of stability.png and summary.md:
  grid_final_reward.png, grid_reward_drop.png, grid_max_exit.png, grid_mean_exit.png,
  grid_entropy_collapse.png, grid_kl_consecutive.png
                    one heat map per objective side by side (x: batch ratio, y: num_iterations) of: final
                    reward (mean over the last 10% of rounds), reward drop (the best mean over 10% of the
                    rounds minus the final one: collapse in the paper's sense), max (over rounds) and mean
                    trust-region exit fraction, first round whose mean entropy is below 0.1 nats/token,
                    mean consecutive-policy KL
  grid_heatmaps.png all six in one figure
  grid_curves.png   per cell: reward, exit fraction and entropy against generation round, clip vs cfpo
  grid_summary.md   the table: one row per (objective, k, b)
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
DEFAULT_ROUNDS = 200  # per run, the iterations demo (6 runs)
DEFAULT_GRID_ROUNDS = 100  # per cell, the --grid run (32 cells, 45000 optimizer steps): 15 min CPU, 23 min wall
CSV_COLUMNS = (
    "objective",
    "num_iterations",
    "batch_ratio",
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
def make_trainer_class(trainer: str = "grpo"):
    from transformers import TrainerCallback

    from cfpo_loss.adapters.trl import CFPORLOOTrainer, CFPOTrainer

    rloo = trainer == "rloo"

    class DemoTrainer(CFPORLOOTrainer if rloo else CFPOTrainer):
        """CFPOTrainer (CFPORLOOTrainer with --trainer rloo) that also records, per optimizer step, the trust-region
        statistics of the ratio the objective used and the approximate KL(pi_old || pi_theta) per token, and, at the
        end of each generation round, the approximate KL between the rollout policy of that round and the next one.

        GRPO: the token ratio's statistics from the core (``compute_policy_loss(...).metrics`` on the log-probs TRL
        computed for the loss). RLOO: the sequence ratio's, as CFPORLOOTrainer logs them (``cfpo/ratio_*``,
        ``clip_ratio/region_mean``); its KL columns per token, from the rollout policy's per-token log-probs that
        RLOOTrainer computes and sums into ``old_logps`` (kept here, unsummed, as ``demo_old_per_token_logps``)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.demo_steps: list[dict] = []
            self._demo_capture = None
            self._demo_batch: dict = {}
            self.add_callback(_RoundEnd(self))

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if self._demo_capture is not None:
                self._demo_capture.append(out[0].detach())
            return out

        def _generate_and_score_completions(self, inputs):
            if not rloo:
                return super()._generate_and_score_completions(inputs)
            # RLOO's first log-prob call here is the rollout policy's (old_per_token_logps, summed into old_logps)
            self._demo_capture = []
            try:
                out = super()._generate_and_score_completions(inputs)
            finally:
                captured, self._demo_capture = self._demo_capture, None
            out["demo_old_per_token_logps"] = captured[0]  # shuffled and split with the rest of the batch
            return out

        @property
        def demo_steps_per_round(self) -> int:
            """Optimizer steps per generation round: num_iterations x batch ratio (steps_per_generation / GA)."""
            return self.num_iterations * self.args.steps_per_generation // self.args.gradient_accumulation_steps

        def _compute_loss(self, model, inputs):
            self._demo_capture = []
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                (logps,), self._demo_capture = self._demo_capture, None
            mask = inputs["completion_mask"].bool()
            if rloo:
                old = inputs["demo_old_per_token_logps"]
                logged = {k: v[-1] for k, v in self._metrics["train" if self.model.training else "eval"].items()}
                kl = compute_policy_loss(logps, old, inputs["advantages"], mask, eps_low=self.epsilon_low)
                self.demo_steps.append(
                    {
                        "ratio_dev": logged["cfpo/ratio_dev"],
                        "max_abs_ratio_dev": max(logged["cfpo/ratio_max"] - 1.0, 1.0 - logged["cfpo/ratio_min"]),
                        "exit_frac": logged["clip_ratio/region_mean"],
                        "kl_old": kl.metrics["approx_kl_k3"].item(),
                    }
                )
            else:
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
            # every slice (mini-batch) of the round's generated batch with its rollout-policy log-probs, for the
            # consecutive-policy KL at round end (TRL trains on slice `_step % steps_per_generation` now)
            self._demo_batch[self._step % self.args.steps_per_generation] = (inputs, old, mask)
            return loss

        @torch.no_grad()
        def demo_round_kl(self) -> float:
            """approx KL(pi_n || pi_n+1) (k3, on all of round n's completions, sampled from pi_n): the rollout
            policy of round n against the policy after its num_iterations x batch-ratio updates, the next round's
            rollout policy. A token-weighted mean over the round's mini-batches."""
            total, tokens = 0.0, 0.0
            for inputs, old, mask in self._demo_batch.values():
                input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
                attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
                new = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, inputs["completion_ids"].size(1)
                )[0]
                out = compute_policy_loss(new, old, inputs["advantages"], mask, eps_low=self.epsilon_low)
                n = mask.sum().item()
                total, tokens = total + out.metrics["approx_kl_k3"].item() * n, tokens + n
            return total / max(tokens, 1.0)

    class _RoundEnd(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            t = self.trainer
            if state.global_step % t.demo_steps_per_round == 0 and t._demo_batch:
                t.demo_steps[-1]["kl_consecutive"] = t.demo_round_kl()
                t._demo_batch = {}

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


def trl_batch_args(batch: int, batch_ratio: int) -> dict:
    """How one generation round of `batch` completions becomes `batch_ratio` optimizer steps in TRL 1.16.

    TRL generates once per ``steps_per_generation`` micro-batches of ``per_device_train_batch_size`` (the
    generation batch), splits the generated batch (shuffled) into ``steps_per_generation`` slices, and takes
    one optimizer step per ``gradient_accumulation_steps`` slices. With gradient_accumulation_steps = 1 every
    slice is one optimizer step on a fresh mini-batch of batch / batch_ratio completions, all scored against
    the log-probs of the policy that generated them (TRL computes ``old_per_token_logps`` at generation time
    whenever gradient_accumulation_steps is not a multiple of steps_per_generation x num_iterations): the
    paper's batch ratio = generation batch size / mini-batch size = steps_per_generation / GA.
    """
    if batch_ratio < 1 or batch % batch_ratio:
        raise ValueError(f"batch ratio {batch_ratio} must divide the generation batch {batch}")
    return {
        "per_device_train_batch_size": batch // batch_ratio,  # the mini-batch of one optimizer step
        "steps_per_generation": batch_ratio,  # generation batch = batch completions per round
        "gradient_accumulation_steps": 1,
    }


def run_one(trainer_cls, objective, k, b, rounds, model_path, tokenizer, work, opts, progress) -> list[dict]:
    """One training run: `rounds` generation rounds of opts.batch_size completions, each trained on for
    k (num_iterations) passes of b (batch ratio) mini-batches, i.e. k * b optimizer steps per round."""
    from transformers import PrinterCallback

    from cfpo_loss.adapters.trl import CFPOConfig, CFPORLOOConfig

    if opts.trainer == "rloo":  # RLOO: leave-one-out advantages, sequence ratio, mean over sequences (TRL's)
        config_cls, trainer_options = CFPORLOOConfig, {}
    else:  # TRL's default aggregation (global token mean), the same for both objectives
        config_cls, trainer_options = CFPOConfig, {"loss_type": "dapo"}
    args = config_cls(
        output_dir=os.path.join(work, f"{objective}-k{k}-b{b}"),
        policy_objective=objective,
        **trainer_options,
        epsilon=opts.eps,
        epsilon_high=opts.eps,
        beta=0.0,
        num_iterations=k,
        max_steps=rounds * k * b,  # the same number of generation rounds (generated samples) for every cell
        learning_rate=opts.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        **trl_batch_args(opts.batch_size, b),
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
        callbacks=[progress.callback(f"{objective:>4} k={k:<2} b={b}")],
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
                "batch_ratio": b,
                "step": step,
                "round": (step - 1) // (k * b) + 1,
                "reward": reward,  # reward of the generated batch this step trains on
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
        for (objective, k, _b), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            xs, ys = per_round(rows, key)
            cfpo = objective == "cfpo"
            ys = smooth(ys, smooth_w, max if key.startswith("max") else None)
            ax.plot(xs, ys, color=colors[k], linestyle="-" if cfpo else "--", linewidth=1.6 if cfpo else 1.3,
                    label=f"{objective} k={k}")  # fmt: skip
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
    for (objective, k, _b), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
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


def write_table(path: str, header: str, columns: list[str], body: list[list]) -> str:
    """A header line, then a markdown table (first column left-aligned, the others right); also returned."""
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in body]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_summary(runs: dict, path: str, header: str) -> str:
    columns = [
        "objective", "num_iterations", "optimizer steps", "reward, first 10% of rounds", "final reward (last 10%)",
        "max \\|r-1\\|", "mean \\|r-1\\|", "mean exit fraction", "final entropy", "mean KL(pi_n \\|\\| pi_n+1)",
    ]  # fmt: skip
    body = [
        [
            s["objective"],
            s["k"],
            s["steps"],
            f"{s['reward_first']:.3f}",
            f"{s['reward_final']:.3f}",
            f"{s['max_abs_dev']:.3f}",
            f"{s['mean_dev']:.4f}",
            f"{s['mean_exit']:.4f}",
            f"{s['entropy_final']:.3f}",
            f"{s['mean_kl_consecutive']:.2e}",
        ]
        for s in summary_rows(runs)
    ]
    return write_table(path, header, columns, body)


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


# ------------------------------------------------------------------------------ the grid (--grid) outputs
ENTROPY_FLOOR = 0.1  # "entropy collapse": the first round whose mean entropy (nats/token) is below this
GRID_METRICS = {  # grid_stats key -> (file name, panel title, colour map: dark = worse)
    "reward_final": ("grid_final_reward.png", "final reward (mean, last 10% of rounds)", "viridis"),
    "reward_drop": ("grid_reward_drop.png", "reward drop: best 10%-of-rounds mean - final", "magma_r"),
    "exit_max": ("grid_max_exit.png", "max per-round trust-region exit fraction", "magma_r"),
    "exit_mean": ("grid_mean_exit.png", "mean trust-region exit fraction", "magma_r"),
    "entropy_collapse": ("grid_entropy_collapse.png", f"first round with entropy < {ENTROPY_FLOOR}", "magma"),
    "kl_consecutive": ("grid_kl_consecutive.png", "mean approx KL(pi_n || pi_n+1)", "magma_r"),
}


def grid_stats(rows: list[dict]) -> dict:
    """The per-cell numbers behind the heat maps and the grid table (per-round means over the run's steps)."""
    rounds, rewards = per_round(rows, "reward")
    tail = max(1, len(rewards) // 10)
    _, exits = per_round(rows, "exit_frac")
    ent_rounds, entropies = per_round(rows, "entropy")
    kls = [float(r["kl_consecutive"]) for r in rows if r["kl_consecutive"] != ""]
    return {
        "rounds": len(rounds),
        "steps": len(rows),
        "reward_first": sum(rewards[:tail]) / tail,
        "reward_final": sum(rewards[-tail:]) / tail,
        # collapse in the paper's sense: how far the reward fell from its best (a window as long as "final")
        "reward_drop": max(sum(rewards[i : i + tail]) for i in range(len(rewards) - tail + 1)) / tail
        - sum(rewards[-tail:]) / tail,
        "exit_max": max(exits),
        "exit_mean": sum(float(r["exit_frac"]) for r in rows) / len(rows),
        "max_abs_dev": max(float(r["max_abs_ratio_dev"]) for r in rows),
        "entropy_collapse": next((x for x, e in zip(ent_rounds, entropies) if e < ENTROPY_FLOOR), None),
        "entropy_final": sum(entropies[-tail:]) / len(entropies[-tail:]) if entropies else float("nan"),
        "kl_consecutive": sum(kls) / len(kls) if kls else float("nan"),
    }


def _grid_axes(runs: dict) -> tuple[list[str], list[int], list[int]]:
    objectives = [o for o in OBJECTIVES if any(key[0] == o for key in runs)]
    return objectives, sorted({key[1] for key in runs}), sorted({key[2] for key in runs})


def _draw_heatmaps(axes, fig, stats: dict, metric: str, objectives, iterations, ratios) -> None:
    """One heat map per objective (x: batch ratio, y: num_iterations), one colour scale shared by the row."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    _, title, cmap = GRID_METRICS[metric]
    rounds = max(s["rounds"] for s in stats.values())
    grids = {}
    for o in objectives:
        g = np.full((len(iterations), len(ratios)), np.nan)
        for i, k in enumerate(iterations):
            for j, b in enumerate(ratios):
                if (o, k, b) in stats:
                    v = stats[(o, k, b)][metric]
                    g[i, j] = rounds + 1 if v is None else v
        grids[o] = g
    values = np.concatenate([g[np.isfinite(g)] for g in grids.values()]) if grids else np.array([])
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if metric == "kl_consecutive" and lo > 0:
        norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.01))
    elif metric == "entropy_collapse":  # round 1 .. rounds, "never" drawn as rounds + 1 (the brightest)
        norm = Normalize(vmin=1, vmax=rounds + 1)
    else:
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    for ax, o in zip(axes, objectives):
        im = ax.imshow(grids[o], origin="lower", cmap=cmap, norm=norm, aspect="auto")
        for i in range(len(iterations)):
            for j in range(len(ratios)):
                v = grids[o][i, j]
                if not np.isfinite(v):
                    continue
                if metric == "entropy_collapse":
                    text = "never" if v > rounds else f"{v:.0f}"
                elif metric == "kl_consecutive":
                    text = f"{v:.1e}"
                else:
                    text = f"{v:.3f}"
                red, green, blue, _ = im.cmap(norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
        ax.set_xticks(range(len(ratios)), [str(b) for b in ratios])
        ax.set_yticks(range(len(iterations)), [str(k) for k in iterations])
        ax.set_xlabel("batch ratio b (mini-batch = batch / b)", fontsize=9)
        ax.set_ylabel("num_iterations k", fontsize=9)
        ax.set_title(f"{o}: {title}", fontsize=10)
    fig.colorbar(im, ax=list(axes), shrink=0.9)


def plot_grid(runs: dict, out: str, subtitle: str) -> list[str]:
    """A heat-map figure per metric (clip | cfpo side by side), all metrics in one figure, and the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    stats = {key: grid_stats(rows) for key, rows in runs.items()}
    objectives, iterations, ratios = _grid_axes(runs)
    width = 4.6 * len(objectives) + 1.2
    written = []
    for metric, (name, _, _) in GRID_METRICS.items():
        fig, axes = plt.subplots(1, len(objectives), figsize=(width, 4.9), squeeze=False, layout="constrained")
        _draw_heatmaps(axes[0], fig, stats, metric, objectives, iterations, ratios)
        fig.suptitle(textwrap.fill(subtitle, 130), fontsize=7)
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)
    fig, axes = plt.subplots(
        len(GRID_METRICS), len(objectives), figsize=(width, 4.0 * len(GRID_METRICS) + 0.6), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for row, metric in zip(axes, GRID_METRICS):
        _draw_heatmaps(row, fig, stats, metric, objectives, iterations, ratios)
    fig.suptitle(textwrap.fill(subtitle, 130), fontsize=7)
    fig.savefig(os.path.join(out, "grid_heatmaps.png"), dpi=90)
    plt.close(fig)
    written.append("grid_heatmaps.png")
    plot_grid_curves(runs, os.path.join(out, "grid_curves.png"), subtitle)
    written.append("grid_curves.png")
    return written


def plot_grid_curves(runs: dict, path: str, subtitle: str) -> None:
    """Per cell (row: num_iterations, top = most; column: batch ratio): per-round reward and exit fraction
    (left axis) and entropy (right axis) against generation round, clip vs cfpo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives, iterations, ratios = _grid_axes(runs)
    rounds = max(int(r["round"]) for rows in runs.values() for r in rows)
    w = max(1, rounds // 20)
    colors = {"clip": "tab:red", "cfpo": "tab:blue"}
    fig, axes = plt.subplots(len(iterations), len(ratios), figsize=(4.6 * len(ratios), 3.2 * len(iterations)),
                             squeeze=False, sharex=True, sharey=True)  # fmt: skip
    twins = []
    for i, k in enumerate(reversed(iterations)):
        for j, b in enumerate(ratios):
            ax = axes[i, j]
            tw = ax.twinx()
            twins.append(tw)
            for o in objectives:
                rows = runs.get((o, k, b))
                if not rows:
                    continue
                for key, style, lw in (("reward", "-", 1.6), ("exit_frac", "--", 1.1)):
                    xs, ys = per_round(rows, key)
                    ax.plot(xs, smooth(ys, w), style, color=colors[o], linewidth=lw, label=f"{o} {key}")
                xs, ys = per_round(rows, "entropy")
                tw.plot(xs, smooth(ys, w), ":", color=colors[o], linewidth=1.3, alpha=0.8, label=f"{o} entropy")
            ax.set_ylim(0, 1)
            tw.set_yscale("log")
            tw.set_ylim(1e-3, 5)
            tw.axhline(ENTROPY_FLOOR, color="grey", linewidth=0.6)
            ax.set_title(f"k = {k}, b = {b}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(iterations) - 1:
                ax.set_xlabel("generation round")
            if j == 0:
                ax.set_ylabel("reward (-), exit frac. (--)")
            if j == len(ratios) - 1:
                tw.set_ylabel("entropy (:), log scale")
            else:
                tw.tick_params(labelright=False)
    handles = [h for ax in (axes[0, 0], twins[0]) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8, ncol=3)
    import textwrap

    fig.suptitle(
        textwrap.fill(subtitle, 160) + f"\nred: clip, blue: cfpo; per-round means"
        f"{f', trailing mean over {w} rounds' if w > 1 else ''}; grey line: entropy {ENTROPY_FLOOR}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_grid_summary(runs: dict, path: str, header: str) -> str:
    """The grid table: one row per cell, clip and cfpo of a cell next to each other."""
    columns = [
        "objective", "num_iterations", "batch ratio", "optimizer steps", "reward, first 10% of rounds",
        "final reward (last 10%)", "reward drop (best 10% - final)", "max exit fraction (per round)",
        "mean exit fraction", "max \\|r-1\\|",
        f"first round with entropy < {ENTROPY_FLOOR}", "final entropy", "mean KL(pi_n \\|\\| pi_n+1)",
    ]  # fmt: skip
    body = []
    for (objective, k, b), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        s = grid_stats(rows)
        body.append(
            [
                objective,
                k,
                b,
                s["steps"],
                f"{s['reward_first']:.3f}",
                f"{s['reward_final']:.3f}",
                f"{s['reward_drop']:.3f}",
                f"{s['exit_max']:.4f}",
                f"{s['exit_mean']:.4f}",
                f"{s['max_abs_dev']:.3f}",
                "never" if s["entropy_collapse"] is None else s["entropy_collapse"],
                f"{s['entropy_final']:.3f}",
                f"{s['kl_consecutive']:.2e}",
            ]
        )
    return write_table(path, header, columns, body)


# ------------------------------------------------------------------------------------------- redraw, main
def read_metrics(out: str) -> dict:
    runs: dict = {}
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        for row in csv.DictReader(f):
            row.setdefault("batch_ratio", "1")  # a metrics.csv written before the batch-ratio axis
            runs.setdefault((row["objective"], int(row["num_iterations"]), int(row["batch_ratio"])), []).append(row)
    return runs


def redraw(out: str, grid: bool) -> int:
    runs = read_metrics(out)
    rounds = max(int(r["round"]) for rows in runs.values() for r in rows)
    old = os.path.join(out, "grid_summary.md" if grid else "summary.md")
    header = f"Stability demo: {rounds} generation rounds"
    if os.path.exists(old):
        with open(old) as f:
            header = f.readline().rstrip("\n")
    if grid:
        plot_grid(runs, out, header)
        print(write_grid_summary(runs, old, header))
    else:
        plot_stability(runs, {k for _, k, _ in runs}, os.path.join(out, "stability.png"), max(1, rounds // 20))
        print(write_summary(runs, old, header))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--trainer", choices=("grpo", "rloo"), default="grpo",
        help="grpo: TRL's GRPOTrainer through CFPOTrainer (token ratio); rloo: TRL's RLOOTrainer through "
        "CFPORLOOTrainer (sequence ratio, leave-one-out advantages). Default: %(default)s",
    )  # fmt: skip
    p.add_argument(
        "--out", default=None,
        help="output folder (default: stability_demo_out; with --trainer rloo, stability_demo_rloo_out)",
    )  # fmt: skip
    p.add_argument(
        "--plot-only", action="store_true", help="no training: redraw the figures and table from --out/metrics.csv"
    )
    p.add_argument(
        "--grid", action="store_true",
        help="the grid: objectives x --iterations (default 1 2 4 8) x --batch-ratios (default 1 2 4 8), heat maps",
    )  # fmt: skip
    p.add_argument(
        "--quick", action="store_true",
        help="a smoke run with the same outputs: 3 rounds (with --grid: 2 rounds, iterations 1 2, batch ratios 1 2)",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int, default=None,
        help=f"generation rounds per run (default {DEFAULT_ROUNDS}, with --grid {DEFAULT_GRID_ROUNDS}; "
        "--quick 3, --grid --quick 2)",
    )  # fmt: skip
    p.add_argument("--iterations", type=int, nargs="+", default=None, help="num_iterations values (default 1 4 16)")
    p.add_argument(
        "--batch-ratios", type=int, nargs="+", default=None,
        help="batch ratios b = optimizer steps per generated batch, each on batch/b completions (default 1; "
        "several need --grid)",
    )  # fmt: skip
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eps", type=float, default=0.2, help="epsilon = epsilon_high (both objectives)")
    p.add_argument(
        "--batch-size", type=int, default=64,
        help="completions per generation round (the generation batch; one optimizer step's mini-batch is this / b)",
    )  # fmt: skip
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (group size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: a model this small runs fastest on one; more threads only contend)",
    )  # fmt: skip
    opts = p.parse_args(argv)
    if opts.out is None:
        opts.out = "stability_demo_rloo_out" if opts.trainer == "rloo" else "stability_demo_out"
    quick_axes = opts.grid and opts.quick
    if opts.rounds is not None:
        rounds = opts.rounds
    elif opts.quick:
        rounds = 2 if opts.grid else 3
    else:
        rounds = DEFAULT_GRID_ROUNDS if opts.grid else DEFAULT_ROUNDS
    iterations = sorted(set(opts.iterations or ([1, 2] if quick_axes else [1, 2, 4, 8] if opts.grid else [1, 4, 16])))
    ratios = sorted(set(opts.batch_ratios or ([1, 2] if quick_axes else [1, 2, 4, 8] if opts.grid else [1])))
    if rounds < 1:
        p.error("--rounds must be >= 1")
    if any(k < 1 for k in iterations):
        p.error("--iterations must be >= 1")
    if any(b < 1 or opts.batch_size % b for b in ratios):
        p.error(f"--batch-ratios must be >= 1 and divide --batch-size ({opts.batch_size})")
    if len(ratios) > 1 and not opts.grid:
        p.error("several --batch-ratios need --grid")

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
        return redraw(opts.out, opts.grid)

    trainer_cls = make_trainer_class(opts.trainer)
    # the GRPO headers are unchanged (the README's tables); RLOO's say so, and that r is one ratio per sequence there
    note = " (RLOOTrainer: r = sequence ratio)" if opts.trainer == "rloo" else ""
    tokenizer = build_tokenizer()
    cells = [(o, k, b) for k in iterations for b in ratios for o in opts.objectives]
    total = rounds * sum(k * b for _, k, b in cells)
    print(
        f"stability demo{' grid' if opts.grid else ''}{note}: {len(opts.objectives)} objectives x num_iterations "
        f"{iterations} x batch ratio {ratios}, {rounds} generation rounds of {opts.batch_size} completions each "
        f"({total} optimizer steps), lr {opts.lr}, eps {opts.eps}, seed {opts.seed} -> {opts.out}/",
        flush=True,
    )
    load_before = os.getloadavg()
    t0, cpu0 = time.time(), time.process_time()
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="cfpo_stability_") as work:
        model_path = build_model(tokenizer, os.path.join(work, "tiny-qwen2"), opts.seed)
        progress = _Progress(total)
        for cell in cells:
            runs[cell] = run_one(trainer_cls, *cell, rounds, model_path, tokenizer, work, opts, progress)
        progress.bar.close()
    elapsed, cpu = time.time() - t0, time.process_time() - cpu0
    load_after = os.getloadavg()

    with open(os.path.join(opts.out, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for rows in runs.values():
            writer.writerows(rows)
    timing = (
        f"training took {elapsed / 60:.1f} min wall, {cpu / 60:.1f} min CPU, torch threads {opts.threads}, "
        f"{os.cpu_count()} CPUs, load average {load_before[1]:.1f} before / {load_after[1]:.1f} after (5-min)."
    )
    if opts.grid:
        header = (
            f"Stability grid{note}: {rounds} generation rounds of {opts.batch_size} completions "
            f"({opts.num_generations} per prompt) per run; batch ratio b = {opts.batch_size}/b completions per "
            f"optimizer step (TRL steps_per_generation = b, gradient_accumulation_steps = 1); lr {opts.lr}, "
            f"eps {opts.eps}, seed {opts.seed}; {timing}"
        )
        written = plot_grid(runs, opts.out, header)
        table = write_grid_summary(runs, os.path.join(opts.out, "grid_summary.md"), header)
        print("\n" + table)
        print(f"wrote {opts.out}/metrics.csv, grid_summary.md, {', '.join(written)}, objectives.png")
        return 0
    plot_stability(runs, iterations, os.path.join(opts.out, "stability.png"), max(1, rounds // 20))
    batch = f"batch {opts.batch_size} completions ({opts.num_generations} per prompt)"
    if ratios != [1]:
        batch += f", batch ratio {ratios[0]} (mini-batch {opts.batch_size // ratios[0]})"
    header = (
        f"Stability demo{note}: {rounds} generation rounds per run, {batch}, lr {opts.lr}, eps {opts.eps}, "
        f"seed {opts.seed}; {timing}"
    )
    table = write_summary(runs, os.path.join(opts.out, "summary.md"), header)
    print("\n" + table)
    print(f"wrote {opts.out}/metrics.csv, stability.png, summary.md, objectives.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
