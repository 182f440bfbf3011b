"""The test matrix: one virtual environment per framework, each built from nothing.

The three frameworks cannot share one environment (their transformers / ray / tensordict pins
conflict, see shared DESIGN.md §5), so every framework gets its own nox session. `nox` with no
arguments runs them all; `nox -s core` runs only the framework-free core.

torch is pinned to 2.13.0 everywhere: that CPU wheel lies on the build machines' disk, and an
unpinned torch pulls a multi-GB CUDA build. Every later install keeps it (`_install` passes it as
a constraint), so no framework can swap it for a CUDA build.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["core", "trl", "verl", "openrlhf"]

TORCH = "torch==2.13.0"
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "numpy"]
TRL = "trl==1.16.0"
VERL = "verl==0.9.1"
OPENRLHF = "openrlhf==0.11.2"

ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "PYTHONHASHSEED": "0",
}


def _install(session: nox.Session, *args: str) -> None:
    """pip install that can never replace the pinned torch."""
    session.install("-q", *args, f"--constraint={_constraints(session)}")


def _constraints(session: nox.Session) -> str:
    path = f"{session.virtualenv.location}/torch-pin.txt"
    with open(path, "w") as f:
        f.write(TORCH + "\n")
    return path


def _base(session: nox.Session, *extra: str) -> None:
    _install(session, TORCH)  # first and alone, so nothing later drags in a CUDA build
    _install(session, *TEST_DEPS, *extra)
    _install(session, "--no-deps", "-e", ".")


def _pytest(session: nox.Session, *paths: str) -> None:
    args = session.posargs or ["-q", "-p", "no:cacheprovider", *paths]
    session.run("python", "-m", "pytest", *args, env=ENV)


@nox.session
def core(session: nox.Session) -> None:
    """Framework-free core: only torch, pytest and hypothesis."""
    _base(session)
    session.run("python", "-c", "import sys, cfpo_loss; assert not {'trl','verl','openrlhf'} & set(sys.modules)")
    session.run("python", "-m", "cfpo_loss", env=ENV)
    _pytest(session, "tests/core")


@nox.session
def trl(session: nox.Session) -> None:
    """TRL adapter against the real trl==1.16.0 GRPOTrainer; then the example, briefly, so it cannot rot."""
    _base(session, TRL, "matplotlib", "tqdm")
    _pytest(session, "tests/trl")
    if not session.posargs:
        session.run("python", "examples/trl_cfpo.py", "--steps", "8", env=ENV)
        session.run("python", "examples/trl_cfpo.py", "--steps", "8", "--objective", "cfpo", "--fused", env=ENV)


@nox.session
def verl(session: nox.Session) -> None:
    """verl plugin against the real verl==0.9.1 registry, loss path and a local Ray worker.

    Then verl's own CPU tests of its core algorithms, run against the installed verl with our plugin
    loaded (verl's wheel ships no tests; its PyPI sdist does: fetched with pip, only tests/ unpacked,
    so the installed verl - not a source tree - is what they import).
    """
    import glob
    import os
    import tarfile

    _base(session, VERL)  # `pip install -e .` in _base writes the `verl.plugins` entry point metadata
    session.run("python", "-m", "cfpo_loss", env=ENV)  # must say "verl plugin: REGISTERED"
    _pytest(session, "tests/verl")

    tmp = session.create_tmp()
    session.run("python", "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", VERL, "-d", tmp)
    (sdist,) = glob.glob(os.path.join(tmp, "verl-*.tar.gz"))
    upstream = os.path.join(tmp, "verl_upstream")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"] and m.isfile()]
        for m in members:
            m.name = m.name.split("/", 1)[1]
        tar.extractall(upstream, members=members, filter="data")
    with session.chdir(upstream):
        session.run(
            "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/trainer/ppo/test_core_algos_on_cpu.py",
            "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",
            "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
            "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",
            "tests/trainer/ppo/test_rollout_corr.py",
            "tests/trainer/ppo/test_rollout_corr_integration.py",
            "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py",
            "tests/trainer/ppo/test_metric_utils_on_cpu.py",
            "tests/test_base_config_on_cpu.py",
            env={**ENV, "VERL_USE_EXTERNAL_PLUGINS": "auto"},
        )  # fmt: skip


@nox.session
def openrlhf(session: nox.Session) -> None:
    """OpenRLHF adapter against the real openrlhf==0.11.2 PolicyLoss and CLI.

    OpenRLHF's declared pins cannot install on a CPU machine (flash-attn has no CPU build), so it is
    installed with --no-deps plus what its loss / actor / CLI modules really import. See
    tests/openrlhf/README.md for what is left out and why.
    """
    import os

    _base(session)
    _install(session, "--no-deps", OPENRLHF)
    # deepspeed ships only an sdist; build isolation would pull a second (CUDA) torch into the build env
    _install(session, "setuptools", "wheel", "packaging")
    _install(session, "--no-build-isolation", "deepspeed==0.19.6")
    # what openrlhf.models / openrlhf.trainer.ray.ppo_actor / openrlhf.cli.train_ppo_ray import at module
    # level, at OpenRLHF's own pins (flash-attn and vllm excepted: import-only test stand-ins; the rest of
    # OpenRLHF's declared dependencies is imported only by training / data code: tests/openrlhf/README.md)
    _install(session, "transformers==5.15.0", "ray[default]==2.55.0", "peft", "torchdata", "tqdm",
             "sympy", "pylatexenc", "pillow")
    # the stand-ins go on sys.path of this venv only (also seen by Ray workers and subprocesses)
    site = session.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True)
    standins = os.path.abspath("tests/openrlhf/standins")
    with open(os.path.join(site.strip(), "cfpo_openrlhf_test_standins.pth"), "w") as f:
        f.write(standins + "\n")
    _pytest(session, "tests/openrlhf")


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main command: build an environment from nothing and run examples/stability_demo.py.

    Not a test (not in nox.options.sessions). `nox -s demo` runs the default configuration (clip vs cfpo x
    num_iterations 1/4/16 with the real TRL GRPOTrainer, <= 15 min on 2 CPU cores) and writes
    stability_demo_out/; `nox -s demo -- --quick` is the < 2 minute smoke run; arguments after `--` go to the
    script (`nox -s demo -- --out my_dir --rounds 100`).
    """
    _install(session, TORCH)  # first and alone, so nothing later drags in a CUDA build
    _install(session, "-e", ".[trl,demo]")  # trl==1.16.0, matplotlib, tqdm: what a user installs
    session.run("python", "examples/stability_demo.py", *session.posargs, env=ENV)
