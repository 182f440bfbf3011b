"""CFPO with TRL: the one-line swap from GRPOTrainer to CFPOTrainer, on a CPU in a few minutes.

    pip install "cfpo-loss[trl]"            # trl==1.16.0
    python examples/trl_cfpo.py             # trains GRPO (clip) and CFPO side by side, prints a comparison
    python examples/trl_cfpo.py --objective cfpo --steps 200 --fused

The swap, in your own script:

    - from trl import GRPOConfig, GRPOTrainer
    + from cfpo_loss.adapters.trl import CFPOConfig as GRPOConfig, CFPOTrainer as GRPOTrainer
      args = GRPOConfig(..., num_iterations=4)            # policy_objective="cfpo" is the default

Nothing is downloaded: the policy is a tiny 2-layer Qwen2 built from a config and the tokenizer a WordLevel
vocabulary built with the `tokenizers` package (pass --model PATH to use a real local checkpoint instead).
The task has a verifiable reward: the fraction of completion words that are digits 0-9.

CFPO differs from GRPO only when the policy ratio departs from 1, i.e. with num_iterations > 1 (as here) or
steps_per_generation > gradient_accumulation_steps; with one on-policy update per batch both are identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from cfpo_loss.adapters.trl import CFPOConfig, CFPOTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)] + [str(i) for i in range(10)] + ["a", "b", "c", "+", "=", "say", "count"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build_tiny_model(tokenizer, path: str) -> str:
    """Save a randomly initialised 2-layer Qwen2 to `path` (TRL loads the beta>0 reference model from a path)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


def digit_reward(completions, **kwargs):
    """Verifiable reward: fraction of completion words that are a digit 0-9."""
    return [sum(w.isdigit() for w in c.split()) / max(len(c.split()), 1) for c in completions]


def train(objective, model_path, tokenizer, out_dir, steps, num_iterations, beta, lr, fused=False):
    args = CFPOConfig(
        output_dir=out_dir,
        policy_objective=objective,  # "cfpo" (default) or "clip" (TRL's own GRPO objective)
        use_fused_loss=fused,  # True: LM head + objective in one chunked pass of cfpo_loss (same loss, less memory)
        loss_type="dapo",  # only the aggregation, as in TRL
        epsilon=0.2,
        epsilon_high=0.28,
        num_iterations=num_iterations,
        beta=beta,
        learning_rate=lr,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        temperature=1.0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    prompts = [f"say {i % 10} count w{i % 40} =" for i in range(64)]
    trainer = CFPOTrainer(
        model=model_path,
        reward_funcs=digit_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def summarise(logs, key, first=False):
    values = [h[key] for h in logs if key in h]
    if not values:
        return float("nan")
    tail = values[: max(len(values) // 4, 1)] if first else values[-max(len(values) // 4, 1) :]
    return sum(tail) / len(tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objective", choices=["both", "cfpo", "clip"], default="both")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-iterations", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--fused", action="store_true", help="use_fused_loss=True (cfpo_loss's fused LM-head pass)")
    parser.add_argument("--model", default=None, help="local checkpoint folder (default: a tiny Qwen2 built here)")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    if args.model is None:  # a 2-layer, 64-wide model: thread synchronisation costs more than it gains
        torch.set_num_threads(1)
    work = args.output_dir or tempfile.mkdtemp(prefix="trl_cfpo_")
    if args.model is None:
        tokenizer = build_tokenizer()
        model_path = build_tiny_model(tokenizer, os.path.join(work, "tiny-qwen2"))
    else:
        from transformers import AutoTokenizer

        tokenizer, model_path = AutoTokenizer.from_pretrained(args.model), args.model

    objectives = ["clip", "cfpo"] if args.objective == "both" else [args.objective]
    results = {}
    for obj in objectives:
        out_dir = os.path.join(work, obj)
        results[obj] = train(
            obj, model_path, tokenizer, out_dir, args.steps, args.num_iterations, args.beta, args.lr, args.fused
        )

    rows = [
        ("reward (first quarter)", "reward", True),
        ("reward (last quarter)", "reward", False),
        ("clip_ratio/region_mean", "clip_ratio/region_mean", False),
        ("cfpo/ratio_dev  mean|r-1|", "cfpo/ratio_dev", False),
        ("cfpo/ratio_max", "cfpo/ratio_max", False),
        ("cfpo/penalty", "cfpo/penalty", False),
        ("entropy", "entropy", False),
    ]
    print(f"\n{'metric (mean over the quarter of logged steps)':<48}" + "".join(f"{o:>12}" for o in objectives))
    for label, key, first in rows:
        print(f"{label:<48}" + "".join(f"{summarise(results[o], key, first):>12.4f}" for o in objectives))
    print(
        "\n(clip = TRL's GRPO objective through CFPOTrainer, identical to trl.GRPOTrainer; "
        "cfpo = the clipping-free objective)"
    )


if __name__ == "__main__":
    main()
