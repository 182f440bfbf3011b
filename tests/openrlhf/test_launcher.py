"""The launcher runs OpenRLHF's own train_ppo_ray CLI: same arguments, same parse, same ray.init -
plus the cfpo choices and the worker setup hook, and nothing else.

Each case runs in a subprocess (see cli_probe.py): the real OpenRLHF CLI module is executed as
__main__ and stopped at get_strategy(args), right after its ray.init call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from orl_compat import IS_CLI, LOSS_AGG_CLI

from cfpo_loss.adapters.openrlhf import train_ppo_ray as launcher

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

# An RLOO run as in the paper's RLHF setup, with options of every kind (flags, nargs, floats, lists)
RLOO = [
    "--ref.num_nodes",
    "1",
    "--ref.num_gpus_per_node",
    "8",
    "--reward.num_nodes",
    "1",
    "--reward.num_gpus_per_node",
    "8",
    "--actor.num_nodes",
    "1",
    "--actor.num_gpus_per_node",
    "8",
    "--vllm.num_engines",
    "4",
    "--vllm.tensor_parallel_size",
    "2",
    "--vllm.gpu_memory_utilization",
    "0.5",
    "--train.colocate_all",
    "--vllm.enable_sleep",
    "--ds.enable_sleep",
    "--actor.model_name_or_path",
    "OpenRLHF/Llama-3-8b-sft-mixture",
    "--reward.model_name_or_path",
    "OpenRLHF/Llama-3-8b-rm-700k",
    "--ckpt.output_dir",
    "/tmp/ckpt/llama3-8b-rloo-cfpo",
    "--algo.advantage.estimator",
    "rloo",
    "--rollout.n_samples_per_prompt",
    "4",
    "--train.batch_size",
    "128",
    "--rollout.batch_size",
    "1024",
    "--train.max_epochs",
    "1",
    "--data.max_len",
    "2048",
    "--rollout.max_new_tokens",
    "1024",
    "--data.max_samples",
    "100000",
    "--ds.zero_stage",
    "3",
    "--ds.param_dtype",
    "bf16",
    "--actor.adam.lr",
    "5e-7",
    "--actor.eps_clip_low_high",
    "0.2",
    "0.28",
    "--algo.kl.init_coef",
    "0.01",
    *IS_CLI,
    "--algo.advantage.is_correction_threshold",
    "0.5",
    "5.0",
    "--data.prompt_dataset",
    "OpenRLHF/prompt-collection-v0.1",
    "--data.input_key",
    "context_messages",
    "--data.apply_chat_template",
    "--reward.normalize_enable",
    "--actor.gradient_checkpointing_enable",
    *LOSS_AGG_CLI,
    # its default is "ppo_" + the current minute, which differs between two processes across a minute
    "--logger.wandb.run_name",
    "rloo-cfpo",
]


def _env():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def _probe(mode, loss_type, tmp_path):
    out = tmp_path / f"{mode}-{loss_type}.json"
    argv = [*RLOO, "--actor.policy_loss_type", loss_type]
    proc = subprocess.run(
        [sys.executable, str(HERE / "cli_probe.py"), mode, str(out), *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    cases = {
        "native-ppo": ("native", "ppo"),
        "launcher-ppo": ("launcher", "ppo"),
        "launcher-cfpo_seq": ("launcher", "cfpo_seq"),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(_probe, *v, tmp) for k, v in cases.items()}
        return {k: f.result() for k, f in futures.items()}


def test_every_argument_reaches_openrlhf_unchanged(probes):
    native = probes["native-ppo"]
    assert native["args"]["algo"]["advantage"]["estimator"] == "rloo"
    assert native["args"]["actor"]["eps_clip_low_high"] == [0.2, 0.28]
    assert native["driver_policy_loss_patched"] is False
    # same command through the launcher: the identical parsed-and-validated args
    assert probes["launcher-ppo"]["args"] == native["args"]
    ours = probes["launcher-cfpo_seq"]
    assert ours["args"]["actor"]["policy_loss_type"] == "cfpo_seq"
    ours["args"]["actor"]["policy_loss_type"] = "ppo"
    assert ours["args"] == native["args"]  # everything but the loss type
    assert ours["driver_policy_loss_patched"] is True


def test_ray_init_is_openrlhfs_own_call_plus_the_worker_setup_hook(probes):
    (native,) = probes["native-ppo"]["ray_init"]
    assert "worker_process_setup_hook" not in native["kwargs"]["runtime_env"]
    for case in ("launcher-ppo", "launcher-cfpo_seq"):
        (ours,) = probes[case]["ray_init"]
        runtime_env = dict(ours["kwargs"]["runtime_env"])
        assert runtime_env.pop("worker_process_setup_hook") == "cfpo_loss.adapters.openrlhf.install_on_import"
        assert runtime_env == native["kwargs"]["runtime_env"]  # OpenRLHF's env_vars, untouched
        assert ours["args"] == native["args"] == []
        assert set(ours["kwargs"]) == set(native["kwargs"])  # no address forced: Ray resolves it as usual


def test_help_lists_cfpo_and_is_otherwise_openrlhfs():
    script = BIN / "cfpo-openrlhf-train-ppo-ray"
    assert script.exists(), "console script not installed"
    with ThreadPoolExecutor(2) as pool:
        ours_f = pool.submit(_run, [str(script), "--help"])
        native_f = pool.submit(_run, [sys.executable, "-m", "openrlhf.cli.train_ppo_ray", "--help"])
        ours, native = ours_f.result(), native_f.result()
    assert ours.returncode == native.returncode == 0, ours.stderr[-2000:]
    assert "--actor.policy_loss_type {ppo,gspo,cfpo,cfpo_seq}" in ours.stdout
    ours_help, native_help = _without_log_lines(ours.stdout), _without_log_lines(native.stdout)
    assert ours_help.replace("{ppo,gspo,cfpo,cfpo_seq}", "{ppo,gspo}") == native_help
    assert "usage: train_ppo_ray.py" in native_help


def _without_log_lines(text):
    """Drop time-stamped log lines (DeepSpeed prints its accelerator warning on stdout)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("[20"))


def test_an_unknown_loss_type_is_still_refused_by_openrlhfs_parser():
    proc = _run([sys.executable, "-m", "cfpo_loss.adapters.openrlhf.train_ppo_ray", "--actor.policy_loss_type", "spo"])
    assert proc.returncode == 2
    assert "invalid choice: 'spo'" in proc.stderr and "cfpo_seq" in proc.stderr


def test_with_setup_hook_adds_the_hook_without_touching_the_rest():
    env = {"env_vars": {"A": "1"}, "working_dir": "/x"}
    merged = launcher.with_setup_hook(env)
    assert merged == {
        "env_vars": {"A": "1"},
        "working_dir": "/x",
        "worker_process_setup_hook": "cfpo_loss.adapters.openrlhf.install_on_import",
    }
    assert "worker_process_setup_hook" not in env
    assert launcher.with_setup_hook(None) == {"worker_process_setup_hook": launcher.SETUP_HOOK}
    assert launcher.with_setup_hook(merged) == merged
    with pytest.raises(ValueError, match="worker_process_setup_hook"):
        launcher.with_setup_hook({"worker_process_setup_hook": "my.hook"})


def test_the_hook_can_be_left_to_the_users_own(monkeypatch):
    monkeypatch.setenv("CFPO_OPENRLHF_SETUP_HOOK", "0")
    own = {"worker_process_setup_hook": "my.hook", "env_vars": {"A": "1"}}
    assert launcher.with_setup_hook(own) is own
    assert launcher.with_setup_hook(None) is None


def test_widening_is_scoped_to_the_policy_loss_option():
    native_add = argparse._ActionsContainer.add_argument
    with launcher.widened_policy_loss_choices():
        parser = argparse.ArgumentParser()
        parser.add_argument("--actor.policy_loss_type", default="ppo", choices=["ppo", "gspo"])
        parser.add_argument("--actor.loss_agg_mode", choices=["token-mean", "seq-mean-token-mean"])
    assert argparse._ActionsContainer.add_argument is native_add
    assert vars(parser.parse_args(["--actor.policy_loss_type", "cfpo_seq"]))["actor.policy_loss_type"] == "cfpo_seq"
    with pytest.raises(SystemExit):
        parser.parse_args(["--actor.loss_agg_mode", "cfpo"])


def test_launcher_refuses_a_ray_already_started_without_the_hook(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already initialised"):
        launcher.main(["--help"])
