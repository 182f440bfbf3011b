"""verl's own actor loss entry point with a real ActorConfig(policy_loss.loss_mode="cfpo"), on CPU.

verl 0.8.0 - 0.9.1 train the actor through ``verl.workers.utils.losses.ppo_loss`` (bound by
``engine_workers.py`` as ``partial(ppo_loss, config=actor_config)`` and called by the engine's
``forward_step`` once per micro-batch). The engine itself cannot run on a CPU: on a CPU-only torch, verl
falls back to its CUDA platform (``get_device_name()`` is "cuda"); ``FSDPEngine.forward_backward_batch``
moves the token count to ``get_device_id()`` (torch.cuda.current_device(): "Torch not compiled with
CUDA enabled") and ``create_device_mesh`` builds a "cuda" mesh (``torch._C`` has no
``_cuda_setDevice``); the engine is registered for device=["cuda", "npu"] only
(``workers/engine/fsdp/transformer_impl.py``). It also all-reduces over a torch.distributed group. So this test runs
every piece of that path that is not the sharded model: verl's ``left_right_2_no_padding`` (the engine's input format),
the global-batch bookkeeping the engine writes (``tu.assign_non_tensor`` of ``batch_num_tokens``,
``dp_size``; ``global_batch_size`` as the trainer sets it), verl's ``prepare_micro_batches``, a tiny
torch LM forward producing the engine's nested ``log_probs``, verl's ``ppo_loss`` (which calls
``get_policy_loss_fn(config.policy_loss.loss_mode)`` and ``no_padding_2_padding``), and one backward
per micro-batch with gradient accumulation, as ``forward_backward_batch`` does.

Expected: the paper's objective on the whole mini-batch, aggregated by verl's ``agg_loss`` once -
so the test also proves the loss (and gradient) do not depend on the micro-batch split.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding
from verl_helpers import (
    AGG_MODES,
    HAS_ENTRY_POINTS,
    VERL_VERSION,
    actor_config,
    bigram_log_prob_cond,
    bigram_table_grad_bound,
    rounding_bounds,
    torch_attention_fallback,
)

from cfpo_loss.reference import assert_within

# derived rounding bounds: CI runs these again with scalar kernels (noxfile SECOND_ROUNDING)
pytestmark = pytest.mark.rounding

B, P, R, V = 8, 4, 6, 13


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, P + 1, (B,), generator=g)
    resp_len = torch.randint(1, R + 1, (B,), generator=g)
    prompts = torch.randint(1, V, (B, P), generator=g)
    responses = torch.randint(1, V, (B, R), generator=g)
    prompt_mask = torch.arange(P)[None, :] >= (P - prompt_len)[:, None]  # left padded
    response_mask = torch.arange(R)[None, :] < resp_len[:, None]  # right padded
    prompts = prompts.masked_fill(~prompt_mask, 0)
    responses = responses.masked_fill(~response_mask, 0)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    adv = torch.randn(B, generator=g)[:, None] * response_mask
    weights = (torch.rand(B, R, generator=g) + 0.5) * response_mask
    return prompts, responses, attention_mask, response_mask, position_ids, adv, weights, g


def _token_log_probs(table, input_ids, attention_mask):
    """Padded reference: log p(token_t | token_{t-1}) of a bigram LM whose logits are table rows."""
    logp = torch.log_softmax(table[input_ids[:, :-1]], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp[:, P - 1 :]  # the R response tokens


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss_mode", ["cfpo", "cfpo_seq"])
def test_verl_ppo_loss_with_loss_mode_cfpo_over_micro_batches(mode, loss_mode, monkeypatch):
    torch_attention_fallback(monkeypatch)  # verl < 0.9.1 unpads through flash_attn only (no CPU build)
    prompts, responses, attention_mask, response_mask, position_ids, adv, weights, g = _batch()
    input_ids = torch.cat([prompts, responses], dim=1)
    table0 = torch.randn(V, V, generator=g)
    with torch.no_grad():
        old = _token_log_probs(table0 + 0.3 * torch.randn(V, V, generator=g), input_ids, attention_mask)
    old = old.masked_fill(~response_mask, 0.0)

    cfg = actor_config(loss_mode, mode, clip_ratio_low=0.2, clip_ratio_high=0.28)
    assert cfg.policy_loss.loss_mode == loss_mode

    # ---- verl's path --------------------------------------------------------------------------
    data = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask.long(),
            "position_ids": position_ids,
            "old_log_probs": old,
            "advantages": adv,
            "rollout_is_weights": weights,
        },
        batch_size=[B],
    )
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(
        data,
        dp_size=1,
        batch_num_tokens=int(data["loss_mask"].sum()),  # FSDPEngine: loss_mask.sum(), all-reduced over dp
        global_batch_size=B,  # ray_trainer: global_batch_size=ppo_mini_batch_size
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=2,
    )
    micro_batches, _ = prepare_micro_batches(data, dp_group=None)
    assert len(micro_batches) == B // 2

    table = table0.clone().requires_grad_(True)
    total, metrics_seen = 0.0, []
    for mb in micro_batches:
        ids = mb["input_ids"]  # nested (b, j): prompt + response tokens, no padding
        flat = ids.values()
        labels = torch.roll(flat, shifts=-1, dims=0)  # as the engine rolls input_ids_rmpad
        logp = torch.log_softmax(table[flat], dim=-1).gather(-1, labels[:, None]).squeeze(-1)
        model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(logp, ids.offsets())}
        loss, metrics = ppo_loss(cfg, model_output, mb)
        loss.backward()  # gradient accumulation across micro-batches
        total += loss.item()
        metrics_seen.append(metrics)
    assert cfg.global_batch_info == {
        "dp_size": 1,
        "batch_num_tokens": int(response_mask.sum()),
        "global_batch_size": B,
        "loss_scale_factor": None,
    }
    # actor/cfpo/* keys only come from our loss: ppo_loss really dispatched to it
    keys = {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pg_loss", "actor/cfpo/penalty"}
    assert keys <= set(metrics_seen[0])

    # ---- expected: the paper's objective on the whole mini-batch, verl's agg_loss ---------------
    info = dict(dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=B)
    ref_table = table0.clone().requires_grad_(True)
    expected = _paper_loss(_token_log_probs(ref_table, input_ids, attention_mask), old, adv, weights, response_mask,
                           mode, loss_mode, info)  # fmt: skip
    expected.backward()

    # Both sides are fp32, computed in different orders (micro-batches, jagged vs padded): each within the derived
    # bound of the exact value, so within twice it of each other. The bound: verl_helpers.rounding_bounds with the
    # error of the fp32 log_softmax in each log-ratio, then the bigram LM's backward for d loss / d table, fed the
    # exact d loss / d log p (float64).
    new64 = _token_log_probs(table0.double(), input_ids, attention_mask).requires_grad_(True)
    (logp_grad,) = torch.autograd.grad(
        _paper_loss(new64, old.double(), adv.double(), weights.double(), response_mask, mode, loss_mode, info), new64
    )
    level = "sequence" if loss_mode == "cfpo_seq" else "token"
    bound, _ = rounding_bounds(old, new64, adv, response_mask, mode, info, weights, ratio_level=level,
                               log_prob_cond=bigram_log_prob_cond(table0, input_ids, P))  # fmt: skip
    assert_within(total, expected.item(), 2 * bound.loss, "loss over micro-batches")
    table_bound = bigram_table_grad_bound(table0, input_ids, P, logp_grad, bound.grad)
    assert_within(table.grad, ref_table.grad, 2 * table_bound, "d loss / d table over micro-batches")
    assert ref_table.grad.abs().sum() > 0


def _paper_loss(new, old, adv, weights, response_mask, mode, loss_mode, info):
    """The paper's objective on the whole mini-batch, aggregated by verl's agg_loss (in the inputs' dtype)."""
    log_ratio = torch.where(response_mask, new - old, 0.0)
    if loss_mode == "cfpo_seq":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / response_mask.sum(-1, keepdim=True)).expand_as(new)
    ratio = torch.exp(log_ratio)
    eps = torch.where(adv > 0, 0.28, 0.2).to(adv.dtype)
    per_token = -(ratio * adv - adv.abs() / (2 * eps) * (ratio - 1) ** 2) * weights
    return agg_loss(per_token, response_mask, mode, **info)


@pytest.mark.skipif(torch.cuda.is_available(), reason="documents the CPU-only limitation")
@pytest.mark.skipif(not HAS_ENTRY_POINTS, reason=f"verl {VERL_VERSION} reports device 'cpu'; documents verl 0.9.x")
def test_why_the_fsdp_engine_itself_cannot_run_on_cpu():
    """verl 0.9.x on a CPU-only torch falls back to its CUDA platform; the FSDP engine's
    forward_backward_batch moves data with .to(get_device_id()) and builds its device mesh for
    "cuda" - both fail here, so the test above stops at the engine boundary."""
    from verl.utils.device import get_device_id, get_device_name

    assert get_device_name() == "cuda"
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        get_device_id()
