"""One process of a multi-process GRPOTrainer / CFPOTrainer run, launched as users launch:

    python -m torch.distributed.run --nproc_per_node 2 tests/trl/dist_train.py OUT_DIR RUN [RUN ...]

(or `accelerate launch --cpu --num_processes 2 ...`). CPU, gloo (``use_cpu=True``), fp32, one torch thread, a tiny
Qwen2 built here (nothing downloaded). Each RUN trains a fresh model for a few optimizer steps and writes, per rank,
``OUT_DIR/RUN.rank{R}.json`` (TRL's logged history, per-micro-batch local statistics gathered by nothing but this
rank, and a flat copy of the parameters after training) for tests/trl/test_distributed.py to compare across ranks
and across runs. Not a test module itself (pytest collects test_*.py only).
"""

from __future__ import annotations

import json
import os
import sys

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

torch.set_num_threads(1)

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_helpers import build_model, build_tokenizer, prompt_dataset, reward_digits  # noqa: E402

from cfpo_loss.adapters.trl import CFPOConfig, CFPOTrainer  # noqa: E402

STEPS = 4  # optimizer steps; 2 generation batches (steps_per_generation = 2 x gradient_accumulation_steps)


class _LocalStats:
    """Records, for every loss call, what THIS rank alone saw (before any cross-rank reduction), next to the value
    the trainer logged, so the test can gather by hand across the ranks' files and compare with the logged one."""

    def _log_trust_region_metrics(self, mode, coef_1, advantages, mask):
        super()._log_trust_region_metrics(mode, coef_1, advantages, mask)
        ratio = coef_1.detach().float()
        valid = mask.bool() if ratio.shape[1] != 1 else torch.ones_like(ratio, dtype=torch.bool)
        values = ratio[valid] if ratio.shape[1] != 1 else ratio.reshape(-1)
        low = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
        high = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
        region = (low | high).float()
        self._local_stats.append(
            {
                "mode": mode,
                "valid_tokens": int(mask.sum()),
                "ratio_max": float(values.max()) if values.numel() else float("nan"),
                "ratio_min": float(values.min()) if values.numel() else float("nan"),
                "region_sum": float((region * mask).sum()),
                "region_count": float(mask.sum()),
                "logged_ratio_max": self._metrics[mode]["cfpo/ratio_max"][-1],
                "logged_ratio_min": self._metrics[mode]["cfpo/ratio_min"][-1],
                "logged_region_mean": self._metrics[mode]["clip_ratio/region_mean"][-1],
            }
        )


class ProbedCFPOTrainer(_LocalStats, CFPOTrainer):
    _local_stats: list


class BypassDDPTrainer(CFPOTrainer):
    """Negative control, NOT a supported setup: the fused pass called on the unwrapped model, outside DDP's forward
    (what use_fused_loss=True did single-process). DDP's reducer is then never armed and each rank steps on its own
    gradient, silently; the test checks that its rank-identity check sees exactly that."""

    def _compute_loss_fused(self, model, inputs):
        return super()._compute_loss_fused(self.accelerator.unwrap_model(model), inputs)


RUNS = {
    # name: (trainer, config class, config overrides)
    "grpo": (GRPOTrainer, GRPOConfig, {}),
    "clip": (CFPOTrainer, CFPOConfig, {"policy_objective": "clip"}),
    "cfpo": (ProbedCFPOTrainer, CFPOConfig, {"policy_objective": "cfpo"}),
    "cfpo_fused": (ProbedCFPOTrainer, CFPOConfig, {"policy_objective": "cfpo", "use_fused_loss": True}),
    # DDP without the unused-parameter graph walk (TrainingArguments' default is find_unused_parameters=True)
    "cfpo_fused_nofind": (CFPOTrainer, CFPOConfig, {"use_fused_loss": True, "ddp_find_unused_parameters": False}),
    # static_graph: TRL's own GRPOTrainer fails under it with gradient accumulation (reducer.cpp "expect_autograd_hooks_
    # INTERNAL ASSERT FAILED" in the first backward), so it is compared without accumulation
    "cfpo_ga1": (CFPOTrainer, CFPOConfig, {"gradient_accumulation_steps": 1}),
    "cfpo_fused_ga1_static": (
        CFPOTrainer,
        CFPOConfig,
        {
            "use_fused_loss": True,
            "gradient_accumulation_steps": 1,
            "ddp_find_unused_parameters": False,
            "ddp_static_graph": True,
        },
    ),
    "clip_fused": (CFPOTrainer, CFPOConfig, {"policy_objective": "clip", "use_fused_loss": True}),
    "bypass_ddp": (BypassDDPTrainer, CFPOConfig, {"use_fused_loss": True}),
}


def make_args(config_cls, out_dir, **overrides):
    kwargs = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=4,  # > gradient_accumulation_steps: the second optimizer step is off-policy (r != 1)
        num_generations=4,
        max_completion_length=8,
        max_steps=STEPS,
        optim="sgd",  # parameter changes proportional to the gradients (Adam would amplify rounding in tiny ones)
        learning_rate=1.0,  # large enough that the ratios of the second step leave [1 - eps, 1 + eps]
        beta=0.0,
        loss_type="dapo",
        bf16=False,
        use_cpu=True,
        seed=0,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        ddp_timeout=120,  # a desynchronised collective fails in 2 minutes instead of hanging for 30
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def run(name, out_dir):
    trainer_cls, config_cls, overrides = RUNS[name]
    tokenizer = build_tokenizer()
    trainer = trainer_cls(
        model=build_model(tokenizer, seed=0),
        reward_funcs=reward_digits,
        args=make_args(config_cls, os.path.join(out_dir, name), **overrides),
        train_dataset=prompt_dataset(32),
        processing_class=tokenizer,
    )
    trainer._local_stats = []
    trainer.train()
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    torch.save(params, os.path.join(out_dir, f"{name}.rank{rank}.params.pt"))
    record = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "log_history": trainer.state.log_history,
        "local_stats": trainer._local_stats,
    }
    with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
        json.dump(record, f)


def _loss_step_trainer(out_dir, path, seeds, empty=False, **overrides):
    """A CFPOTrainer (fused or not) for calling `_compute_loss` by hand, no accumulation normaliser, and this rank's
    micro-batches (trl_helpers.make_inputs, one per seed; `empty`: no valid token) with dapo's token count summed over
    the ranks, as TRL's generation batch carries it."""
    import torch.distributed as dist
    from trl_helpers import make_inputs

    tokenizer = build_tokenizer()
    trainer = CFPOTrainer(
        model=build_model(tokenizer, seed=0),
        reward_funcs=reward_digits,
        args=make_args(
            CFPOConfig,
            os.path.join(out_dir, path),
            per_device_train_batch_size=8,
            use_fused_loss=path.endswith("/fused"),
            **overrides,
        ),
        train_dataset=prompt_dataset(32),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    batches = []
    for seed in seeds:
        inputs = make_inputs(trainer, seed=seed)
        if empty:
            inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
        counts = inputs["completion_mask"].sum().reshape(1)
        dist.all_reduce(counts)
        inputs["num_items_in_batch"] = counts
        batches.append(inputs)
    return trainer, batches


def run_empty_rank(out_dir):
    """One rank with NO valid token in its micro-batch (rank 1), the other with some: the fused and the unfused loss,
    each through its own DDP wrapper (find_unused_parameters=False, the strictest: every parameter must get a
    gradient on every rank, or the next forward raises), two forward/backward rounds on the same inputs. Writes each
    rank's gradients after the all-reduce, per path and round, to ``OUT_DIR/empty_rank.rank{R}.grads.pt``."""
    rank = int(os.environ["RANK"])  # set by the launcher; the process group starts with the first trainer
    grads = {}
    for path in ("unfused", "fused"):
        trainer, (inputs,) = _loss_step_trainer(
            out_dir, f"empty_rank/{path}", [rank], empty=rank == 1, ddp_find_unused_parameters=False
        )
        model = trainer.accelerator.prepare(trainer.model)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
        model.train()
        for step in range(2):
            model.zero_grad(set_to_none=True)
            trainer._compute_loss(model, inputs).backward()
            grads[f"{path}.{step}"] = {n: p.grad.detach().clone() for n, p in model.module.named_parameters()}
    torch.save(grads, os.path.join(out_dir, f"empty_rank.rank{rank}.grads.pt"))


def _fsdp2_shard(model, layout):
    """torch's FSDP2 `fully_shard`, applied by hand in the unit layout accelerate 1.15's fsdp2_prepare_model builds
    (decoder layers by TRANSFORMER_BASED_WRAP, the input embedding, the tail [final norm, LM head] with
    reshard_after_forward=False, the root), since accelerate runs FSDP only on accelerators; or ("head_alone") with the
    LM head in a unit of its own, a layout the fused pass refuses."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    if layout == "accelerate":
        fully_shard(model.model.embed_tokens)
        fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False)
    else:
        fully_shard(model.lm_head)
    fully_shard(model)


def run_fsdp2(out_dir, layout):
    """Gradients of the unfused and the fused loss under FSDP2 (layout as in _fsdp2_shard), each rank on its own
    micro-batches, against a reference: the same loss on an unsharded copy, gradients averaged over the ranks by hand
    (what data parallelism must give). Rounds: two synchronised steps on micro-batch a, then gradient accumulation over
    micro-batches a (set_requires_gradient_sync(False), accelerate's no_sync for FSDP2) and b. Writes
    ``OUT_DIR/fsdp2_{layout}.rank{R}.pt``: {path: {round: {name: full gradient}} or the error text}."""
    import copy

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    def full_grads(model):
        return {
            n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for n, p in model.named_parameters()
        }

    rank = int(os.environ["RANK"])  # set by the launcher; the process group starts with the first trainer
    result = {}
    for path in ("unfused", "fused"):
        trainer, batches = _loss_step_trainer(out_dir, f"fsdp2_{layout}/{path}", [rank, 10 + rank])
        model = trainer.model
        model.train()
        if path == "unfused":  # the reference, on an unsharded copy
            ref = copy.deepcopy(model)
            local = []
            for inputs in batches:
                ref.zero_grad(set_to_none=True)
                trainer._compute_loss(ref, inputs).backward()
                local.append(full_grads(ref))
            for g in local:
                for t in g.values():
                    dist.all_reduce(t)
                    t /= dist.get_world_size()
            result["reference"] = {"a": local[0], "a+b": {n: local[0][n] + local[1][n] for n in local[0]}}
        _fsdp2_shard(model, layout)
        rounds = {}
        try:
            for name in ("a0", "a1"):
                model.zero_grad(set_to_none=True)
                trainer._compute_loss(model, batches[0]).backward()
                rounds[name] = full_grads(model)
            model.zero_grad(set_to_none=True)
            model.set_requires_gradient_sync(False)
            trainer._compute_loss(model, batches[0]).backward()
            model.set_requires_gradient_sync(True)
            trainer._compute_loss(model, batches[1]).backward()
            rounds["a+b"] = full_grads(model)
            result[path] = rounds
        except RuntimeError as exc:
            result[path] = str(exc)
    torch.save(result, os.path.join(out_dir, f"fsdp2_{layout}.rank{rank}.pt"))


if __name__ == "__main__":
    out, names = sys.argv[1], sys.argv[2:]
    os.makedirs(out, exist_ok=True)
    for n in names:
        if n == "empty_rank":
            run_empty_rank(out)
        elif n.startswith("fsdp2_"):
            run_fsdp2(out, n[len("fsdp2_") :])
        else:
            run(n, out)
