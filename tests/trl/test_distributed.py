"""CFPOTrainer under 2-process data parallel (DDP on CPU, gloo), launched as users launch: the real GRPOTrainer /
CFPOTrainer in two real torch.distributed processes (tests/trl/dist_train.py), their logged histories and final
parameters compared here.

* clip mode reproduces GRPOTrainer's 2-process trajectory (every logged metric and the parameters);
* cfpo trains, and its cross-rank metrics (cfpo/ratio_max, cfpo/ratio_min, clip_ratio/region_mean) equal the values
  gathered by hand from what each rank saw alone, on micro-batches where the ranks disagree;
* use_fused_loss=True under DDP: its loss / grad-norm / metric trajectory equals the unfused path's (fp32, 1e-5), with
  TRL's default find_unused_parameters=True, with False, and with static_graph (without gradient accumulation, since
  TRL's own GRPOTrainer fails under static_graph with accumulation); ranks hold different numbers of valid tokens;
  after training the parameters are bitwise identical on both ranks;
* the same rank-identity check fails for a fused pass called outside DDP's forward (a negative control), so it would
  catch an unsynchronised gradient;
* one rank with no valid token at all: fused = unfused gradients, identical on both ranks;
* FSDP2 (torch's fully_shard in accelerate's unit layout, applied by hand: accelerate runs FSDP only on accelerators):
  both paths' gradients equal an unsharded copy's averaged over the ranks by hand, also with gradient accumulation;
  an LM head in an FSDP unit of its own is refused by the fused pass, by name.

One `python -m torch.distributed.run --standalone --nproc_per_node 2` launch and one `accelerate launch --multi_gpu
--num_processes 2` launch (on a machine without GPUs that launcher starts CPU processes too; `use_cpu=True` in the
script selects gloo. `accelerate launch --cpu --num_processes 2` would start ONE process). About 50 s here.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_train.py")
TRAINED = ["grpo", "clip", "cfpo", "cfpo_fused", "clip_fused"]  # train() runs of dist_train.RUNS, synchronised
TORCHRUN_RUNS = TRAINED + ["bypass_ddp", "empty_rank", "fsdp2_accelerate", "fsdp2_head_alone"]
ACCELERATE_RUNS = ["cfpo_fused_nofind", "cfpo_ga1", "cfpo_fused_ga1_static"]
# keys that measure time, not training
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd, out, tmp, names):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp / "hf_home"),  # no user accelerate config
        "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        cmd + [SCRIPT, str(out), *names], capture_output=True, text=True, env=env, cwd=HERE, timeout=900
    )
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    out = tmp / "out"
    _launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        out,
        tmp,
        TORCHRUN_RUNS,
    )
    os.rename(out, tmp / "torchrun")
    _launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ],
        out,
        tmp,
        ACCELERATE_RUNS,
    )
    os.rename(out, tmp / "accelerate")
    results = {"empty_rank": [torch.load(tmp / "torchrun" / f"empty_rank.rank{r}.grads.pt") for r in (0, 1)]}
    for name in ("fsdp2_accelerate", "fsdp2_head_alone"):
        results[name] = [torch.load(tmp / "torchrun" / f"{name}.rank{r}.pt") for r in (0, 1)]
    for launcher, names in (("torchrun", TORCHRUN_RUNS), ("accelerate", ACCELERATE_RUNS)):
        for name in names:
            if name not in TRAINED + ACCELERATE_RUNS + ["bypass_ddp"]:
                continue
            ranks = []
            for rank in (0, 1):
                with open(tmp / launcher / f"{name}.rank{rank}.json") as f:
                    record = json.load(f)
                record["params"] = torch.load(tmp / launcher / f"{name}.rank{rank}.params.pt")
                ranks.append(record)
            results[name] = ranks
    return results


def _training_logs(record):
    """Per optimizer step logs (the final train summary dropped), timing keys removed."""
    return [{k: v for k, v in h.items() if k not in TIMING} for h in record["log_history"] if "loss" in h]


def _assert_same_history(got, ref, *, rel, abs_, keys=None):
    got, ref = _training_logs(got), _training_logs(ref)
    assert len(got) == len(ref) > 0
    for step, (g, r) in enumerate(zip(got, ref)):
        for key in keys if keys is not None else r:
            a, b = g[key], r[key]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=abs_), (step, key, a, b)


def test_two_processes_ran(runs):
    for name, ranks in runs.items():
        if name not in TRAINED + ACCELERATE_RUNS + ["bypass_ddp"]:
            continue
        for record in ranks:
            assert record["world_size"] == 2, name
            assert record["distributed_type"] == "DistributedType.MULTI_CPU", name


@pytest.mark.parametrize("name", TRAINED + ACCELERATE_RUNS)
def test_ranks_hold_identical_parameters(runs, name):
    """DDP all-reduces the gradients: after the last step both ranks hold bitwise the same parameters (and log the
    same gradient norm, which each rank computes from its own .grad)."""
    r0, r1 = runs[name]
    assert torch.equal(r0["params"], r1["params"]), name
    _assert_same_history(r0, r1, rel=0, abs_=0, keys=["loss", "grad_norm"])


def test_negative_control_unsynchronised_gradient_is_caught(runs):
    """The fused pass called on the unwrapped model, outside DDP's forward: no error, but each rank steps on its own
    gradient. The check above must see it, or it proves nothing."""
    r0, r1 = runs["bypass_ddp"]
    assert not torch.equal(r0["params"], r1["params"])
    assert [h["grad_norm"] for h in _training_logs(r0)] != [h["grad_norm"] for h in _training_logs(r1)]


def test_clip_equals_grpo(runs):
    """policy_objective='clip' is GRPOTrainer's own 2-process trajectory: every metric GRPOTrainer logs, and the
    parameters (measured here: bitwise equal; checked to fp32 rounding)."""
    for rank in (0, 1):
        clip, grpo = runs["clip"][rank], runs["grpo"][rank]
        _assert_same_history(clip, grpo, rel=1e-6, abs_=1e-7)
        torch.testing.assert_close(clip["params"], grpo["params"], rtol=1e-6, atol=1e-7)


def test_cfpo_trains_off_policy(runs):
    """cfpo differs from clip once the ratio departs from 1 (the second optimizer step of each generation), logs its
    metrics, and the ratios do leave the trust region (so the clip/cfpo difference is exercised)."""
    cfpo, clip = _training_logs(runs["cfpo"][0]), _training_logs(runs["clip"][0])
    assert cfpo[0]["loss"] == clip[0]["loss"]  # on-policy: r = 1, both objectives give A
    assert any(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(cfpo, clip))
    assert max(h["cfpo/penalty"] for h in cfpo) > 0 and max(h["clip_ratio/region_mean"] for h in cfpo) > 0
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in cfpo)


@pytest.mark.parametrize("name", ["cfpo", "cfpo_fused"])
def test_cross_rank_metrics_are_global(runs, name):
    """Each loss call logs, on both ranks, the max / min ratio and the region fraction over BOTH ranks' tokens: equal
    to the values gathered by hand from what each rank saw alone; and on some calls the ranks saw different values,
    so a rank-local statistic would have failed this."""
    s0, s1 = runs[name][0]["local_stats"], runs[name][1]["local_stats"]
    assert len(s0) == len(s1) > 0
    differ = 0
    for a, b in zip(s0, s1):
        want_max, want_min = max(a["ratio_max"], b["ratio_max"]), min(a["ratio_min"], b["ratio_min"])
        want_region = (a["region_sum"] + b["region_sum"]) / max(a["region_count"] + b["region_count"], 1.0)
        for rec in (a, b):
            assert rec["logged_ratio_max"] == pytest.approx(want_max, rel=1e-6)
            assert rec["logged_ratio_min"] == pytest.approx(want_min, rel=1e-6)
            assert rec["logged_region_mean"] == pytest.approx(want_region, rel=1e-6, abs=1e-9)
        differ += (
            a["ratio_max"] != b["ratio_max"]
            and a["region_sum"] / a["region_count"] != b["region_sum"] / b["region_count"]
        )
    assert differ > 0


@pytest.mark.parametrize(
    "fused,ref",
    [
        ("cfpo_fused", "cfpo"),
        ("cfpo_fused_nofind", "cfpo"),  # find_unused_parameters=False: every parameter must get a gradient
        ("cfpo_fused_ga1_static", "cfpo_ga1"),  # static_graph=True
        ("clip_fused", "grpo"),
    ],
)
def test_fused_equals_unfused_under_ddp(runs, fused, ref):
    """The fused pass through the DDP-wrapped model: the same 2-process trajectory as the unfused path (loss, grad
    norm, entropy, every clip_ratio / cfpo metric: fp32, 1e-5) and the same parameters, on both ranks; with different
    numbers of valid tokens on the two ranks (dapo's global token normaliser)."""
    for rank in (0, 1):
        got, want = runs[fused][rank], runs[ref][rank]
        _assert_same_history(got, want, rel=1e-5, abs_=1e-6)
        torch.testing.assert_close(got["params"], want["params"], rtol=1e-5, atol=1e-5)
    if fused == "cfpo_fused":
        counts = [[s["valid_tokens"] for s in runs[fused][rank]["local_stats"]] for rank in (0, 1)]
        assert counts[0] != counts[1], counts


def test_fused_with_an_empty_rank(runs):
    """One rank's micro-batch holds no valid token (find_unused_parameters=False: every parameter must still get a
    gradient there, or DDP errors or waits): after the all-reduce both ranks hold the same gradients, equal to the
    unfused path's (fp32, 1e-5), in two successive rounds."""
    g0, g1 = runs["empty_rank"]
    for key in ("unfused.0", "unfused.1", "fused.0", "fused.1"):
        assert g0[key].keys() == g0["unfused.0"].keys() and len(g0[key]) > 0
        for name in g0[key]:
            assert torch.equal(g0[key][name], g1[key][name]), (key, name)
    for step in (0, 1):
        for name, want in g0[f"unfused.{step}"].items():
            torch.testing.assert_close(g0[f"fused.{step}"][name], want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("path", ["unfused", "fused"])
def test_fsdp2(runs, path):
    """FSDP2 (torch's fully_shard in accelerate 1.15's unit layout, applied by hand: accelerate runs FSDP only on
    accelerators): the gradients, gathered from the shards, equal an unsharded copy's gradients averaged over the
    ranks by hand, for two synchronised steps and for gradient accumulation with set_requires_gradient_sync(False) on
    the first micro-batch; the fused pass to fp32 rounding (1e-5), the default path to 1e-6."""
    tol = dict(rtol=1e-5, atol=1e-5) if path == "fused" else dict(rtol=1e-6, atol=1e-6)
    for rank in (0, 1):
        result = runs["fsdp2_accelerate"][rank]
        assert not isinstance(result[path], str), result[path]
        for round_, grads in result[path].items():
            want = result["reference"]["a+b" if round_ == "a+b" else "a"]
            assert grads.keys() == want.keys() and len(want) > 0
            for name in want:
                torch.testing.assert_close(grads[name], want[name], **tol, msg=f"{round_} {name}")


def test_fsdp2_head_in_a_unit_of_its_own_is_refused(runs):
    """With the LM head sharded in a unit whose forward never runs, the fused pass would read a DTensor shard: it
    refuses, by name, on the first step (both ranks), instead of training on a wrong or unreduced head gradient."""
    for rank in (0, 1):
        message = runs["fsdp2_head_alone"][rank]["fused"]
        assert isinstance(message, str) and "LM head weight is still sharded (a DTensor)" in message
