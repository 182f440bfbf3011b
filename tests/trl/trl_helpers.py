"""Tiny model, tokenizer, dataset and reward for the TRL adapter tests and examples (no hub, no network)."""

from __future__ import annotations

import torch

WORDS = [f"w{i}" for i in range(40)] + [str(i) for i in range(10)] + ["a", "b", "c", "+", "=", "say", "count"]
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build_model(tokenizer, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def prompt_dataset(n: int = 16):
    from datasets import Dataset

    prompts = [f"say a count {i % 10} w{i % 40} =" for i in range(n)]
    return Dataset.from_dict({"prompt": prompts})


def reward_digits(completions, **kwargs):
    """Verifiable reward: the fraction of completion words that are a digit 0-9 (a tiny random model emits one
    about 1 time in 6, so rewards vary within a group from the first step)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w.isdigit() for w in words) / max(len(words), 1))
    return out


# ---- `_compute_loss` inputs in TRL's layout ----------------------------------------------------------

B, P, T = 8, 5, 6  # sequences, prompt length, completion length (max_completion_length)


def make_args(config_cls, out_dir, **overrides):
    kwargs = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=B,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=T,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def make_trainer(trainer_cls, config_cls, model_dir, tokenizer, out_dir, **overrides):
    args = make_args(config_cls, out_dir, **overrides)
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=reward_digits,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()
    # Set by Trainer's training loop before each compute_loss; fixed here to exercise the accumulation normaliser.
    trainer.current_gradient_accumulation_steps = 2
    return trainer


@torch.no_grad()
def current_logps(trainer, inputs):
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, T)
    return logps


def make_inputs(trainer, *, seed=0, noise=0.6, ref_noise=0.3, per_token_adv=False, old="perturbed"):
    """A generation batch as `_generate_and_score_completions` leaves it: left-padded prompts, completions
    with an EOS and padding after it, advantages of both signs, old log-probs = current log-probs plus
    N(0, noise) so that ratios land outside [1 - eps_low, 1 + eps_high] (old="none": on-policy, key absent)."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, T, 3, 5, 1, T, 4, 2])
    completion_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    completion_ids = torch.where(completion_mask.bool(), completion_ids, torch.zeros_like(completion_ids))
    if per_token_adv:
        advantages = torch.randn(B, T, generator=g)
    else:
        advantages = torch.randn(B, generator=g)
        advantages[1] = 0.0  # a zero-advantage sequence
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        # dapo: token count of the whole generation batch (two accumulation steps' worth here)
        "num_items_in_batch": completion_mask.sum() * 2,
    }
    logps = current_logps(trainer, inputs)
    if old == "perturbed":
        inputs["old_per_token_logps"] = logps + noise * torch.randn(B, T, generator=g)
    elif old != "none":
        raise ValueError(old)
    inputs["ref_per_token_logps"] = logps + ref_noise * torch.randn(B, T, generator=g)
    return inputs


def loss_and_grads(trainer, inputs, method=None):
    """Run a `_compute_loss` (the trainer's own, or `method(trainer, model, inputs)`) and backprop it."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    fn = trainer._compute_loss if method is None else (lambda m, i: method(trainer, m, i))
    loss = fn(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def make_rloo_inputs(trainer, *, seed=0, noise=0.6, old="perturbed"):
    """A generation batch as RLOOTrainer's `_generate_and_score_completions` leaves it: left-padded prompts,
    completions of different lengths (one with no valid token, as `mask_truncated_completions` leaves a truncated
    one), leave-one-out advantages of both signs and one zero, and `old_logps`: the per-sequence sum of the current
    per-token log-probs plus N(0, noise) per sequence, so that sequence ratios land on both sides of
    [1 - eps_low, 1 + eps_high] (old="current": exactly the current sum, r = 1)."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, T, 3, 5, 0, T, 4, 2])
    completion_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    completion_ids = torch.where(completion_mask.bool(), completion_ids, torch.zeros_like(completion_ids))
    advantages = torch.randn(B, generator=g)
    advantages[1] = 0.0
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
    }
    logps = (current_logps(trainer, inputs) * completion_mask).sum(1)
    if old == "perturbed":
        inputs["old_logps"] = logps + noise * torch.randn(B, generator=g)
    elif old == "current":
        inputs["old_logps"] = logps
    else:
        raise ValueError(old)
    return inputs


def sequence_ratio_bounds(logps, inputs, *, objective="cfpo", mean=False, eps_low=0.2, eps_high=0.28):
    """Rounding bounds (cfpo_loss.reference.rounding_bound) for RLOO's fp32 loss on its sequence ratio
    r_i = exp((sum_t m_it log pi_it - old_i) / (n_i if mean else 1)), mean over the B sequences, and its gradient
    w.r.t. the per-token log-probs. log r_i sums n_i + 1 fp32 terms (recursive summation: error <= (n_i + 1)·u·
    sum of their magnitudes); the mean's division scales value and error alike and adds one rounding of |log r_i|.
    Returns (RoundingBound, (B, T) gradient bound, metric bounds)."""
    from cfpo_loss.reference import metric_bounds, rounding_bound

    m = inputs["completion_mask"].double()
    n = m.sum(1)
    lp, old = logps.detach().double() * m, inputs["old_logps"].double()
    log_r = lp.sum(1) - old
    cond = (n + 1) * (lp.abs().sum(1) + old.abs())
    if mean:
        log_r, cond = log_r / n.clamp(min=1), cond / n.clamp(min=1) + log_r.abs() / n.clamp(min=1)
    r, adv = log_r.exp(), inputs["advantages"].double()
    coef = torch.full_like(r, 1 / len(r))
    kw = dict(eps_low=eps_low, eps_high=eps_high)
    bound = rounding_bound(r, adv, coef, cond, objective=objective, **kw)
    per_token = bound.grad[:, None] * m / (n.clamp(min=1)[:, None] if mean else 1.0)
    return bound, per_token, metric_bounds(r, adv, cond, **kw)
