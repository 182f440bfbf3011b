"""CFPO on RLOO's sequence ratio as completions get longer: a measurement, on a CPU in minutes.

    python examples/rloo_ratio_study.py                       # lengths 32 16 8 4 x seeds 0 1 2 x 5 variants, 160 steps
    python examples/rloo_ratio_study.py --lengths 32 --seeds 0 --steps 40     # one cell, quickly

TRL's RLOOTrainer uses ONE ratio per completion, r = exp(sum_t log pi_theta - sum_t log pi_old): a product of token
ratios, which grows with the completion's length. CFPO's restoring gradient on it, dJ/dlog pi_t = (A - |A|/eps (r-1))
r for every token of the completion, grows like r^2. This script trains the same tiny Qwen2 (2 layers, 64 wide, built
from a config; nothing downloaded) with TRL's real RLOOTrainer machinery on the test suite's digit task (reward = the
fraction of completion words that are digits), num_iterations = 4, lr 2e-3, and compares five objectives:

    clip (TRL RLOO)              CFPORLOOTrainer(policy_objective="clip"), i.e. RLOOTrainer's own loss
    cfpo, RLOO sequence ratio    CFPORLOOTrainer(policy_objective="cfpo"), the adapter's default
    cfpo, token ratio            built HERE from the core (compute_policy_loss, ratio_level="token",
                                 agg="seq-mean-token-mean"): OpenRLHF's RLOO shape, per-token ratios
    cfpo, GSPO mean ratio        built HERE from the core (ratio_level="sequence": r = exp(mean_t log r_t))
    cfpo, sequence_ratio="mean"  CFPORLOOTrainer(sequence_ratio="mean"), the adapter's opt-in for that ratio

The token ratio is not an option of the adapter (it changes RLOO's estimator); the GSPO mean ratio is, as the opt-in
sequence_ratio="mean", and the core-built variant beside it is the cross-check. The first four log the RLOO (summed)
sequence ratio's statistics (``cfpo/ratio_*``), so "max |r-1|" compares the same quantity; the opt-in logs those of
the mean ratio it uses (smaller by construction). Printed: one row per (length, variant) with the values of each seed;
training outcomes on one toy task, not evidence about real models.
"""

from __future__ import annotations

import argparse
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

from cfpo_loss import compute_policy_loss  # noqa: E402

WORDS = [f"w{i}" for i in range(40)] + [str(i) for i in range(10)] + ["a", "b", "c", "+", "=", "say", "count"]
VARIANTS = (
    "clip (TRL RLOO)",
    "cfpo, RLOO sequence ratio",
    "cfpo, token ratio",
    "cfpo, GSPO mean ratio",
    "cfpo, sequence_ratio='mean'",
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")  # fmt: skip


def build_model(tokenizer, path: str, seed: int) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


def digit_reward(completions, **kwargs):
    return [sum(w.isdigit() for w in c.split()) / max(len(c.split()), 1) for c in completions]


def trainer_classes():
    from cfpo_loss.adapters.trl import CFPORLOOTrainer

    class CoreRatio(CFPORLOOTrainer):
        """RLOO with the CFPO loss computed by the core on a token (or GSPO mean) ratio instead of RLOO's sum. Needs the
        rollout policy's per-token log-probs, which RLOOTrainer sums into old_logps: kept from its first log-prob
        call in `_generate_and_score_completions`."""

        ratio_level = "token"

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if getattr(self, "_old_capture", None) is not None:
                self._old_capture.append(out[0].detach())
            return out

        def _generate_and_score_completions(self, inputs):
            self._old_capture = []
            try:
                out = super()._generate_and_score_completions(inputs)
            finally:
                captured, self._old_capture = self._old_capture, None
            out["old_per_token_logps"] = captured[0]
            return out

        def _compute_loss(self, model, inputs):
            mask = inputs["completion_mask"]
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attention = torch.cat([inputs["prompt_mask"], mask], 1)
            logps, entropies, _ = self._get_per_token_logps_and_entropies(model, ids, attention, mask.size(1),
                                                                          compute_entropy=True)  # fmt: skip
            old = inputs["old_per_token_logps"]
            out = compute_policy_loss(logps, old, inputs["advantages"], mask.bool(), objective="cfpo",
                                      eps_low=self.epsilon_low, eps_high=self.epsilon_high, agg="seq-mean-token-mean",
                                      ratio_level=self.ratio_level, check_finite=False)  # fmt: skip
            metrics = self._metrics["train" if self.model.training else "eval"]
            metrics["entropy"].append(((entropies * mask).sum() / mask.sum().clamp(min=1)).item())
            r = torch.exp(((logps.detach() - old) * mask).sum(1))  # RLOO's sequence ratio, for the same statistics
            metrics["cfpo/ratio_dev"].append((r - 1).abs().mean().item())
            metrics["cfpo/ratio_max"].append(r.max().item())
            metrics["cfpo/ratio_min"].append(r.min().item())
            return out.loss

    class GspoRatio(CoreRatio):
        ratio_level = "sequence"

    # variant -> (trainer class, CFPORLOOConfig options)
    return {VARIANTS[0]: (CFPORLOOTrainer, dict(policy_objective="clip")),
            VARIANTS[1]: (CFPORLOOTrainer, dict(policy_objective="cfpo")),
            VARIANTS[2]: (CoreRatio, dict(policy_objective="cfpo")),
            VARIANTS[3]: (GspoRatio, dict(policy_objective="cfpo")),
            VARIANTS[4]: (CFPORLOOTrainer, dict(policy_objective="cfpo", sequence_ratio="mean"))}  # fmt: skip


def run(cls, options, model_path, tokenizer, length, seed, opts, work) -> dict:
    from datasets import Dataset

    from cfpo_loss.adapters.trl import CFPORLOOConfig

    prompts = [f"say a count {i % 10} w{i % 40} =" for i in range(opts.batch_size * opts.steps)]
    args = CFPORLOOConfig(
        output_dir=work, **options, learning_rate=opts.lr, per_device_train_batch_size=opts.batch_size,
        num_generations=4, max_completion_length=length, max_steps=opts.steps, num_iterations=opts.iterations,
        epsilon=opts.eps, beta=0.0, logging_steps=1, report_to="none", use_cpu=True, seed=seed, save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = cls(model=model_path, reward_funcs=digit_reward, args=args,
                  train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)  # fmt: skip
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rewards = [h["reward"] for h in logs if "reward" in h]
    n = max(1, len(rewards) // 10)
    grad_norms = sorted(h["grad_norm"] for h in logs)
    return {
        "finite": all(math.isfinite(h["loss"]) for h in logs),
        "reward_first": sum(rewards[:n]) / n,
        "reward_final": sum(rewards[-n:]) / n,
        "max_dev": max(max(h["cfpo/ratio_max"] - 1, 1 - h["cfpo/ratio_min"]) for h in logs),
        "grad_norm_median": grad_norms[len(grad_norms) // 2],
        "grad_norm_max": grad_norms[-1],
        "entropy_final": next(h["entropy"] for h in reversed(logs) if "entropy" in h),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 16, 8, 4], help="max_completion_length values")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (also the initial weights)")
    p.add_argument("--steps", type=int, default=160, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--iterations", type=int, default=4, help="num_iterations (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="completions per step, 4 per prompt")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--variants", nargs="+", type=int, default=list(range(len(VARIANTS))),
                   help="indices into: " + "; ".join(f"{i} {v}" for i, v in enumerate(VARIANTS)))  # fmt: skip
    opts = p.parse_args(argv)
    if opts.steps < 1 or opts.iterations < 1 or any(n < 1 for n in opts.lengths):
        p.error("--steps, --iterations and --lengths must be >= 1")
    if any(not 0 <= v < len(VARIANTS) for v in opts.variants):
        p.error(f"--variants are indices 0..{len(VARIANTS) - 1}")

    import logging
    import warnings

    import datasets
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    classes = trainer_classes()
    tokenizer = build_tokenizer()
    load_before, t0 = os.getloadavg(), time.time()
    results = {}
    with tempfile.TemporaryDirectory(prefix="cfpo_rloo_ratio_") as work:
        for seed in opts.seeds:
            model_path = build_model(tokenizer, os.path.join(work, f"model-{seed}"), seed)
            for length in opts.lengths:
                for i in opts.variants:
                    cls, options = classes[VARIANTS[i]]
                    results[(length, VARIANTS[i], seed)] = run(cls, options, model_path, tokenizer, length, seed,
                                                               opts, os.path.join(work, "out"))  # fmt: skip
                    print(f"  done: length {length}, {VARIANTS[i]}, seed {seed}", file=sys.stderr, flush=True)
    print(
        f"RLOO ratio study: num_iterations {opts.iterations}, {opts.steps} steps of {opts.batch_size} completions, lr "
        f"{opts.lr}, eps {opts.eps}, seeds {opts.seeds} (values per seed, in that order); "
        f"{(time.time() - t0) / 60:.1f} min wall, load average {load_before[1]:.1f} before / {os.getloadavg()[1]:.1f} "
        "after (5-min).\n"
    )
    columns = ["length", "objective", "all losses finite", "reward, first 10% of rounds",
               "final reward (last 10% of rounds)", "max \\|r-1\\| (RLOO sequence ratio; opt-in: its mean ratio)",
               "max grad norm (before clipping to 1)", "median grad norm", "final entropy"]  # fmt: skip
    print("| " + " | ".join(columns) + " |\n|---:|---|---|" + "---:|" * (len(columns) - 3))
    for length in opts.lengths:
        for i in opts.variants:
            rs = [results[(length, VARIANTS[i], s)] for s in opts.seeds]
            cell = lambda key, fmt, rs=rs: " / ".join(format(r[key], fmt) for r in rs)
            print(
                f"| {length} | {VARIANTS[i]} | {'yes' if all(r['finite'] for r in rs) else 'NO'} | "
                f"{cell('reward_first', '.2f')} | {cell('reward_final', '.2f')} | {cell('max_dev', '.3g')} | "
                f"{cell('grad_norm_max', '.3g')} | {cell('grad_norm_median', '.2g')} | "
                f"{cell('entropy_final', '.2f')} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
