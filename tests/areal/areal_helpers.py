"""Builders shared by the AReaL adapter tests: loss inputs, a tiny Qwen2, an FSDP actor, rollout trajectories."""

from __future__ import annotations

import torch

VOCAB = 48  # ordinary tokens w0..w47, then <pad>, <eos>, <unk>


def loss_batch(seed=0, B=6, T=9, *, spread=0.5, behave_spread=0.4, garbage=False):
    """ppo_actor_loss_fn inputs (2-D padded) whose ratios leave [1 - 0.2, 1 + 0.28] on both sides, with token
    advantages of both signs and one fully masked sequence; ``garbage``: NaN / -inf at the masked positions (AReaL's
    own loss then has NaN gradients there, through its exp; the adapter must not)."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g) * 3 - 0.05
    proximal = logprobs - torch.randn(B, T, generator=g) * spread
    proximal[0, :3] = logprobs[0, :3] - torch.tensor([1.4, -1.5, 0.9])  # r ~ 4, ~0.2, ~2.5: clip and dual clip
    proximal[1] += 0.4  # whole sequences drift (a sequence ratio ~0.67 and one ~1.6: GSPO leaves the region too)
    proximal[2] -= 0.45
    old = proximal - torch.randn(B, T, generator=g) * behave_spread
    advantages = torch.randn(B, T, generator=g)
    advantages[0, :3] = torch.tensor([-1.0, -0.5, 0.7])
    advantages[1], advantages[2] = -advantages[1].abs(), advantages[2].abs()  # the drifted sequences leave the region
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0, :3] = True
    mask[-1] = False
    if garbage:
        logprobs = torch.where(mask, logprobs, torch.nan)
        old = torch.where(mask, old, -torch.inf)
    return dict(logprobs=logprobs, proximal_logprobs=proximal, old_logprobs=old, advantages=advantages,
                loss_mask=mask)  # fmt: skip


def packed(batch):
    """The same batch in AReaL's packed 1-D layout (valid rows concatenated with their padding) + cu_seqlens."""
    lengths = [batch["loss_mask"].shape[1]] * batch["loss_mask"].shape[0]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return {k: v.reshape(-1) for k, v in batch.items()}, cu


def save_tiny_model(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<pad>": VOCAB, "<eos>": VOCAB + 1, "<unk>": VOCAB + 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
                            ).save_pretrained(path)  # fmt: skip
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=VOCAB,
        eos_token_id=VOCAB + 1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def actor_config(config_cls, path, **overrides):
    """An actor config as a decoupled (asynchronous) GRPO run would set it: fp32, 2 mini-batches per update."""
    from areal.api.cli_args import MicroBatchSpec, OptimizerConfig

    kwargs = dict(experiment_name="cfpo-test", trial_name="t0", path=path, backend="fsdp:d1", dtype="float32",
                  optimizer=OptimizerConfig(lr=1e-2), ppo_n_minibatches=2, use_decoupled_loss=True, eps_clip=0.2,
                  eps_clip_higher=0.28, mb_spec=MicroBatchSpec(n_mbs=1), attn_impl="sdpa")  # fmt: skip
    kwargs.update(overrides)
    return config_cls(**kwargs)


def make_actor(engine_cls, config):
    from areal.api import FinetuneSpec

    actor = engine_cls(config)
    actor.create_process_group()
    actor.initialize(None, FinetuneSpec(total_train_epochs=1, dataset_size=8, train_batch_size=8))
    return actor


def trajectories(seed=1, B=8, L=12, loss_tokens=8):
    """B single-sequence trajectories, as a rollout returns them: every sequence has `loss_tokens` response tokens,
    so each mini-batch of B/2 sequences holds a power-of-two count (see test_areal_actor.py)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (B, L), generator=g)
    attention = torch.ones(B, L, dtype=torch.bool)
    loss_mask = torch.zeros(B, L, dtype=torch.int32)
    for b in range(B):
        n = L - b % 3
        attention[b, n:] = False
        loss_mask[b, n - loss_tokens : n] = 1
    data = dict(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask,
                logprobs=-torch.rand(B, L, generator=g) * 3, rewards=torch.randn(B, generator=g),
                versions=torch.zeros(B, L, dtype=torch.int32))  # fmt: skip
    return [{k: v[b : b + 1] for k, v in data.items()} for b in range(B)]


def train(actor, rounds=2, seed=1):
    """`rounds` asynchronous-RL steps as AReaL's trainer runs them: compute_logp (the proximal policy),
    compute_advantages, ppo_update; returns the full parameters afterwards."""
    data = trajectories(seed)
    for _ in range(rounds):
        for traj, logp in zip(data, actor.compute_logp(data)):
            traj["prox_logp"] = logp
        actor.ppo_update(actor.compute_advantages([dict(t) for t in data]))
    return {n: p.full_tensor().detach().clone() for n, p in actor.model.named_parameters()}
