"""``--train.async_enable`` / ``--train.partial_rollout_enable`` with ``--actor.policy_loss_type cfpo``: the real
OpenRLHF ``train(args)``, through the launcher, on a real Ray cluster, until its first CUDA call.

Each run (async_probe.py, a subprocess) starts the launcher with an RLOO command against the shared Ray cluster
(conftest.py: logical GPUs, no real one), and OpenRLHF's unmodified ``train(args)`` goes as far as a CPU lets it:
ray.init (through the launcher), its strategy, its ``PolicyModelActor`` group, its trainer - ``PPOTrainerAsync``
with its sample-generator and training actors in async mode, ``PPOTrainer`` in sync mode - which loads the prompt
data with the tokenizer, and then ``PolicyModelActor.init_model_from_pretrained``, which fails at
``torch.cuda.set_device`` in ``DeepspeedStrategy.setup_distributed``. In that real PolicyModelActor the probe then
runs OpenRLHF's ``ActorPPOTrainer.__init__`` (which builds ``self.actor_loss_fn = PolicyLoss(...)`` from the args
``train`` sent, in every mode) until its first CUDA call, and calls that ``actor_loss_fn`` on fixed tensors.

The three runs (concurrent, one logical GPU each): sync (the control), async, and async with partial rollout
plus OpenRLHF's ICEPOP train/rollout IS correction (the off-policy case: the loss gets vLLM's rollout log-probs;
0.10.4: without ICEPOP, see RUNS). Expected values are the paper's equation, written here in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from orl_bounds import rounding_bounds
from orl_compat import ICEPOP_CLI, OPENRLHF_VERSION

from cfpo_loss.adapters._support import version_key
from cfpo_loss.reference import assert_within

HERE = Path(__file__).resolve().parent
EPS_LOW, EPS_HIGH = 0.2, 0.28
ICEPOP_BAND = (0.8, 1.25)  # ICEPOP_CLI's threshold

#: OpenRLHF 0.10.4's train() sets max_len only when vLLM engines are configured (UnboundLocalError without them;
#: 0.11.2 sets it first), so there every run configures one engine: its actor is created (one more logical GPU)
#: and fails in its own process at OpenRLHF's check of vllm.__version__ (an import-only stand-in here)
WITH_ENGINE = version_key(OPENRLHF_VERSION) < (0, 11, 2)
#: with an engine, the IS correction makes create_vllm_engines assert vllm.__version__ > 0.10.0 in the driver
#: (the stand-in's 0.0.0 fails it): there partial rollout runs without ICEPOP (test_policy_loss.py covers the
#: IS correction of that PolicyLoss)
RUNS = {
    "sync": [],
    "async": ["--train.async_enable"],
    **({"async-partial": ["--train.async_enable", "--train.partial_rollout_enable"]} if WITH_ENGINE else
       {"async-partial-icepop": ["--train.async_enable", "--train.partial_rollout_enable", *ICEPOP_CLI]}),
}  # fmt: skip
ASYNC_TRAINER = "openrlhf.trainer.ppo_trainer_async"
POLICY_ACTOR = "openrlhf.trainer.ray.ppo_actor.PolicyModelActor"
VLLM_ENGINE = "openrlhf.trainer.ray.vllm_engine.RolloutRayActor"


def _command(data_dir: Path):
    """An RLOO run: one actor GPU, a remote reward (no reward-model actor), no KL (no reference actor), no vLLM
    engine (one with OpenRLHF 0.10.4: WITH_ENGINE)."""
    return [
        "--actor.policy_loss_type", "cfpo", "--actor.eps_clip_low_high", str(EPS_LOW), str(EPS_HIGH),
        "--algo.advantage.estimator", "rloo", "--rollout.n_samples_per_prompt", "2", "--algo.kl.init_coef", "0",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--actor.model_name_or_path", str(data_dir / "tokenizer"), "--reward.remote_url", "http://127.0.0.1:9/reward",
        "--data.prompt_dataset", str(data_dir / "prompts.jsonl"), "--data.input_key", "input",
        "--rollout.batch_size", "4", "--train.batch_size", "4", "--train.micro_batch_size", "1",
        "--rollout.micro_batch_size", "1", "--logger.wandb.run_name", "cfpo-async",
        *(["--vllm.num_engines", "1"] if WITH_ENGINE else []),
    ]  # fmt: skip


def _make_data(data_dir: Path) -> None:
    """A word-level tokenizer and eight prompts (what train(args) loads before it builds the models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "what", "is", "one", "plus", "two", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(data_dir / "tokenizer")
    with open(data_dir / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"input": "what is one plus two ?"}) + "\n" for _ in range(8))


def _probe(name, address, tmp):
    out = tmp / f"{name}.json"
    env = dict(os.environ, RAY_ADDRESS=address, HF_DATASETS_CACHE=str(tmp / f"hf-{name}"))
    proc = subprocess.run(
        [sys.executable, str(HERE / "async_probe.py"), str(out), *_command(tmp), *RUNS[name]],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(cluster_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("async")
    _make_data(tmp)
    with ThreadPoolExecutor(len(RUNS)) as pool:
        futures = {name: pool.submit(_probe, name, cluster_address, tmp) for name in RUNS}
        return {name: f.result() for name, f in futures.items()}


def _batch():
    sys.path.insert(0, str(HERE))
    try:
        from async_probe import BATCH
    finally:
        sys.path.remove(str(HERE))
    # the numbers the actor computes with: BATCH's decimals rounded to fp32 (then held exactly in float64)
    return {k: torch.tensor(v, dtype=torch.float32).double() for k, v in BATCH.items()}


def _paper(icepop: bool):
    """The paper's CFPO objective, J = r*A - |A|/(2*eps) * (r - 1)^2 (eps = eps_high where A > 0, eps_low where
    A < 0), as OpenRLHF's token-mean loss -sum(mask * w * J) / sum(mask); w = 1, or with ICEPOP the IS weight
    pi_train/pi_rollout = exp(old - rollout), 0 outside ICEPOP_BAND. Also the trust-region exit fraction."""
    b = _batch()
    log_probs = b["log_probs"].clone().requires_grad_(True)
    mask, advantages = b["action_mask"], b["advantages"]
    ratio = (log_probs - b["old_log_probs"]).exp()
    eps = torch.where(advantages > 0, EPS_HIGH, EPS_LOW)
    objective = ratio * advantages - advantages.abs() / (2 * eps) * (ratio - 1) ** 2
    weight = torch.ones_like(objective)
    if icepop:
        is_weight = (b["old_log_probs"] - b["rollout_log_probs"]).exp()
        weight = torch.where((is_weight >= ICEPOP_BAND[0]) & (is_weight <= ICEPOP_BAND[1]), is_weight, 0.0)
    loss = -(mask * weight * objective).sum() / mask.sum()
    loss.backward()
    exits = ((advantages > 0) & (ratio > 1 + EPS_HIGH)) | ((advantages < 0) & (ratio < 1 - EPS_LOW))
    vllm_kl = ((b["rollout_log_probs"] - b["old_log_probs"]) * mask).sum() / mask.sum()
    return {
        "loss": loss.item(),
        "grad": log_probs.grad,
        "clip_ratio": ((exits * mask).sum() / mask.sum()).item(),
        "vllm_kl": vllm_kl.item() if icepop else None,
        # how far the actor's fp32 evaluation may lie from these float64 values (derived: orl_bounds)
        "bounds": rounding_bounds(b, eps=(EPS_LOW, EPS_HIGH), is_coef=weight.detach() if icepop else None),
    }


def _result(record, key):
    entry = record[key]
    assert "error" not in entry, entry["error"]["text"][-3000:]
    return entry["result"]


def test_the_flags_reach_openrlhf_and_select_its_async_trainer(runs):
    for name, record in runs.items():
        is_async = name != "sync"
        args = _result(record, "policy_actor")["args"]
        assert args == {
            "async_enable": is_async,
            "partial_rollout_enable": "partial" in name,
            "policy_loss_type": "cfpo",
            "eps_clip_low_high": [EPS_LOW, EPS_HIGH],
        }, name
        trainer = f"{ASYNC_TRAINER}.PPOTrainerAsync" if is_async else "openrlhf.trainer.ppo_trainer.PPOTrainer"
        assert record["driver_created"] == [VLLM_ENGINE] * WITH_ENGINE + [POLICY_ACTOR, trainer], name
        workers = [w.get("result", {}).get("class") for w in record["workers"]]
        started_by_trainer = workers[len(record["driver_created"]) :]
        if is_async:  # PPOTrainerAsync starts a sample generator and a training actor, told the partial-rollout mode
            assert started_by_trainer == [f"{ASYNC_TRAINER}.GenerateSamplesActor", f"{ASYNC_TRAINER}.TrainingActor"]
            partial = [w["result"]["partial_rollout"] for w in record["workers"][-2:]]
            assert partial == [args["partial_rollout_enable"]] * 2, name
        else:
            assert started_by_trainer == [], name


def test_the_setup_hook_reaches_every_actor_of_every_mode(runs):
    for name, record in runs.items():
        assert record["job_runtime_env"]["worker_process_setup_hook"] == "cfpo_loss.adapters.openrlhf.install_on_import"
        workers = record["workers"]
        if WITH_ENGINE:  # the vLLM engine failed in its __init__ (the stand-in), so it cannot be asked
            assert "Streaming VLLM version must be greater than 0.8.5" in workers[0]["error"]["text"], workers[0]
            workers = workers[1:]
        assert len(workers) == (4 if name != "sync" else 2), name
        for worker in workers:  # every one imports openrlhf.models: PolicyLoss is patched in all of them
            state = worker["result"]
            assert state["cfpo_loss_imported"] and state["policy_loss_patched"], (name, state)


def test_the_real_path_stops_at_the_policy_actors_first_cuda_call(runs):
    for name, record in runs.items():
        error = record["driver_error"]
        # train(args) got through its trainer (async: PPOTrainerAsync's actors loaded tokenizer and prompts) to
        # ray.get on the actor group's init_model_from_pretrained, which failed at the first CUDA call
        assert error["type"] == "RayTaskError(AttributeError)", (name, error["text"][-3000:])
        for step in (
            "ray::PolicyModelActor.init_model_from_pretrained()",
            "in _setup_distributed",
            "in setup_distributed\n    torch.cuda.set_device(local_rank)",
            "_cuda_setDevice",
        ):
            assert step in error["text"], (name, step, error["text"][-3000:])
        # ActorPPOTrainer.__init__ builds actor_loss_fn, then stops at its replay buffer's CUDA device
        init_error = _result(record, "policy_actor")["init_error"]
        assert init_error["type"] == "AssertionError", (name, init_error)
        assert "NaiveReplayBuffer(" in init_error["text"] and "torch.cuda.current_device()" in init_error["text"]
        assert "Torch not compiled with CUDA enabled" in init_error["text"]


def test_the_policy_actors_loss_is_cfpo_and_computes_the_papers_equation(runs):
    for name, record in runs.items():
        actor = _result(record, "policy_actor")
        assert actor["loss_fn"] == {
            "class": "openrlhf.models.loss.PolicyLoss",
            "policy_loss_type": "cfpo",
            "clip_eps_low": EPS_LOW,
            "clip_eps_high": EPS_HIGH,
            "token_level_loss": True,
        }
        assert "penalty" in actor["cfpo_metrics"]  # the adapter's forward ran, not OpenRLHF's
        expected = _paper(icepop="icepop" in name)
        # the actor's fp32 values against the float64 equation on the same (fp32) inputs: the derived bound
        bound, metric_bound = expected["bounds"]
        assert_within(actor["loss"], expected["loss"], bound.loss, f"{name} loss")
        # a count of exits (exact) over the count of valid tokens, divided in fp32: against the exact fraction rounded
        # to fp32, which a correctly rounded division gives exactly (the bound leaves room for a reciprocal product)
        exits = float(torch.tensor(expected["clip_ratio"], dtype=torch.float32))
        assert_within(actor["clip_ratio"], exits, metric_bound["clip_ratio"], f"{name} clip_ratio")
        assert_within(torch.tensor(actor["grad"]), expected["grad"], bound.grad, f"{name} d loss / d log_probs")
        if expected["vllm_kl"] is None:
            assert actor["vllm_kl"] is None, name
        else:
            assert_within(actor["vllm_kl"], expected["vllm_kl"], metric_bound["vllm_kl"], f"{name} vllm_kl")
