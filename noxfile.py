"""The test matrix: one virtual environment per framework, each built from nothing.

The three frameworks cannot share one environment (their transformers / ray / tensordict pins
conflict: a version of one that another cannot import), so every framework gets its own nox session. `nox` with no
arguments runs them all; `nox -s core` runs only the framework-free core.

torch is pinned to 2.13.0 everywhere and installed first, alone; every later install keeps it (`_install` passes
the pin as a constraint), so no framework can swap it for another torch. The pin does not choose the build: pip
takes the torch 2.13.0 it finds. CI's build machines hold the CPU wheel (2.13.0+cpu) in a local wheel folder that
their pip configuration points at; from PyPI alone, on Linux x86-64, it is the CUDA build with about 20 nvidia
packages (several GB; it runs on a CPU too). For the CPU build elsewhere, add PyTorch's CPU index:
`PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu python3 -m nox` (2.13.0+cpu satisfies `torch==2.13.0`
and sorts above 2.13.0, so pip takes it). `core(2.6.0)` runs the lowest torch pyproject.toml claims (`TORCH_FLOOR`
in _support.py); from PyPI that is the CUDA build, run on the CPU.
`package` builds the wheel and tests it installed as a user installs it (not editable). `docs` builds the
documentation site strictly and runs every Python block of the docs (the framework sessions run them too, so the
blocks that need a framework run where it is installed).

`skyrl` runs on Python 3.12 (skyrl needs it), found at load time (`_find_python`); the others on nox's Python.

Every framework version the adapters claim is tested: the `verl`, `openrlhf`, `skyrl` and `areal` sessions are
parametrised over `TESTED` in src/cfpo_loss/adapters/_support.py (`nox -s verl` runs them all, `nox -s "verl(0.8.0)"`
one; `nox -l` lists them). The first version of each is the extra's default and also runs the framework's own
test suite with our adapter loaded (skyrl's PyPI sdist ships none of its trainer tests); the others run our adapter
tests against that version.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import shutil
import subprocess

import nox

# the one table of supported / tested versions, read without importing cfpo_loss (which needs torch)
_spec = importlib.util.spec_from_file_location(
    "_cfpo_support", os.path.join(os.path.dirname(os.path.abspath(__file__)), "src/cfpo_loss/adapters/_support.py")
)
_support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_support)
TESTED = _support.TESTED

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["lint", "core", "package", "docs", "trl", "verl", "openrlhf", "skyrl", "areal"]

TORCH_VERSIONS = list(_support.TORCH_TESTED)  # the newest first: every framework session runs on it
TORCH = f"torch=={TORCH_VERSIONS[0]}"
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "numpy"]
RUFF = "ruff==0.17.5"  # pinned: a new ruff release brings new rules and a new format
SYBIL = "sybil==10.1.0"  # the docs' code blocks as tests (conftest.py); the same pin as the `docs` extra
#: the Markdown whose ```python blocks are tests (conftest.py collects exactly these): the README, the PyPI text,
#: the files the site includes, docs/
DOC_TESTS = ["README.md", "README.pypi.md", "CHANGELOG.md", "CONTRIBUTING.md", "benchmarks/README.md", "docs"]
TRL = f"trl=={TESTED['trl'][0]}"
VERL_VERSIONS = list(TESTED["verl"])
OPENRLHF_VERSIONS = list(TESTED["openrlhf"])
#: what each verl needs beyond its declared dependencies to run the tests on CPU
VERL_EXTRA = {
    # verl 0.8.0 requires numpy<2; pip then picks pyarrow 26, which refuses numpy 1.x (23.0.1 accepts it)
    "0.8.0": ["pyarrow<24"],
}
#: verl.trainer.main_ppo (run_ppo, used by tests/verl/test_verl_ray.py) imports these; verl does not declare them
VERL_MAIN_PPO_DEPS = ["cachetools", "uvicorn", "fastapi"]
#: OpenRLHF's own pins of the packages its loss / actor / CLI modules import (from each wheel's metadata)
OPENRLHF_PINS = {
    "0.11.2": ["deepspeed==0.19.6", "transformers==5.15.0", "ray[default]==2.55.0"],
    "0.10.4": ["deepspeed==0.19.1", "transformers==5.7.0", "ray[default]==2.55.0"],
}
assert set(OPENRLHF_PINS) == set(OPENRLHF_VERSIONS), "every tested OpenRLHF needs its pins here"
SKYRL_VERSIONS = list(TESTED["skyrl"])
#: what skyrl's loss / worker / trainer / entry-point modules import beyond skyrl's own dependencies: its
#: `skyrl-train` extra at its pins, less what needs a GPU or the network (flash-attn, vllm, nixl, s5cmd, cloud storage)
SKYRL_DEPS = ["ray==2.57.0", "skyrl-gym", "loguru", "jaxtyping", "omegaconf", "tensordict", "torchdata", "orjson",
              "pybase64", "aiohttp"]  # fmt: skip


def _find_python(version: str) -> str | None:
    """An interpreter of ``version`` that runs: $CFPO_PYTHON<major><minor>, ``python<version>`` on PATH, or a pyenv
    install (whose shim on PATH may not run when that version is not selected). None if there is none."""
    env = os.environ.get("CFPO_PYTHON" + version.replace(".", ""))
    pyenv = os.path.expanduser(os.environ.get("PYENV_ROOT", "~/.pyenv"))
    candidates = [
        env,
        shutil.which(f"python{version}"),
        *sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python{version}"), reverse=True),
    ]
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return os.path.realpath(candidate) if candidate != env else candidate
    return None


#: skyrl 0.4.0 needs Python >= 3.12 (on 3.11 it fails at import)
SKYRL_PYTHON = _find_python("3.12")

AREAL_VERSIONS = list(TESTED["areal"])
#: AReaL declares torch>=2.9.1,<2.11, outside TORCH_TESTED: its session runs on PyPI's torch 2.10.0 (a CUDA build,
#: ~2 min and ~7 GB with its nvidia libraries, run on the CPU), pinned like TORCH everywhere else
AREAL_TORCH = "torch==2.10.0"
#: what the AReaL adapter's import path imports (areal's trainer, FSDP engine, worker service, config loader), at
#: AReaL's own pins where it has them (peft<=0.18.1, networkx==3.3, transformers<=5.3.0, omegaconf / hydra-core
#: pre-releases); the rest of its ~80 declared dependencies (agent SDKs, sglang, litellm, ...) is never imported
AREAL_IMPORT_DEPS = [
    "transformers==5.3.0", "omegaconf==2.4.0.dev2", "hydra-core==1.4.0.dev1", "peft==0.18.1", "networkx==3.3",
    "ray==2.55.0", "datasets==5.2.0", "torchdata==0.11.0", "numba==0.68.1", "wandb==0.31.0", "swanlab==0.10.3",
    "trackio==0.43.0", "tensorboardX==2.6.5", "openai==3.63.0", "aiohttp==3.14.5", "aiofiles==25.1.0",
    "flask==3.1.3", "uvloop==0.23.0", "lark==1.3.1", "einops==0.8.2", "orjson==3.13.0", "tabulate==0.10.0",
    "pybase64==1.5.1", "colorlog==6.12.0", "tenacity==9.2.1", "pillow==12.3.0",
]  # fmt: skip

ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "PYTHONHASHSEED": "0",
}


def _install(session: nox.Session, *args: str, torch: str = TORCH) -> None:
    """pip install that can never replace the pinned torch."""
    session.install("-q", *args, f"--constraint={_constraints(session, torch)}")


def _constraints(session: nox.Session, torch: str = TORCH) -> str:
    path = f"{session.virtualenv.location}/torch-pin.txt"
    with open(path, "w") as f:
        f.write(torch + "\n")
    return path


def _base(session: nox.Session, *extra: str, torch: str = TORCH) -> None:
    _install(session, torch, torch=torch)  # first and alone: every later install keeps it (the module docstring)
    _install(session, *TEST_DEPS, *extra, torch=torch)
    _install(session, "--no-deps", "-e", ".", torch=torch)


def _expect_report(session: nox.Session, needles: tuple[str, ...], env: dict | None = None) -> None:
    """Print `python -m cfpo_loss` and fail the session unless it contains every one of ``needles``. Under
    `nox --install-only` nothing runs (session.run returns None) and nothing is checked."""
    status = session.run("python", "-m", "cfpo_loss", env=env or ENV, silent=True)
    if status is None:
        return
    print(status)
    missing = [needle.strip() for needle in needles if needle not in status]
    if missing:
        session.error(f"`python -m cfpo_loss` does not report {missing}")


def _pruned(func):
    """With CFPO_PRUNE_VENVS=1 (CI sets it) the session's virtualenv is deleted when the session ends, pass or fail:
    the matrix's environments together take ~30 GB, one at a time at most ~8 GB (AReaL's)."""

    @functools.wraps(func)
    def run(session: nox.Session, *args, **kwargs) -> None:
        try:
            func(session, *args, **kwargs)
        finally:
            if os.environ.get("CFPO_PRUNE_VENVS") == "1" and session.virtualenv.location:
                shutil.rmtree(session.virtualenv.location, ignore_errors=True)

    return run


def _pytest(session: nox.Session, *paths: str) -> None:
    args = session.posargs or ["-q", "-p", "no:cacheprovider", "-rs", *paths]  # -rs: every skip with its reason
    session.run("python", "-m", "pytest", *args, env=ENV)


#: a second rounding: torch's scalar CPU kernels (no AVX2 / AVX-512) sum in another order and use another exp / log,
#: as a CPU with another vector width would; one thread; dynamo off (inductor's C++ does not build without the
#: vector headers this selects). The `rounding` tests' derived bounds must hold there too.
SECOND_ROUNDING = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}


def _pytest_second_rounding(session: nox.Session, *paths: str) -> None:
    """The `rounding`-marked tests of ``paths`` again under SECOND_ROUNDING (not when posargs pick the tests)."""
    if not session.posargs:
        args = ["-q", "-p", "no:cacheprovider", "-m", "rounding", *paths]
        session.run("python", "-m", "pytest", *args, env={**ENV, **SECOND_ROUNDING})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, pinned: the rules and their reasons are in pyproject.toml's [tool.ruff]. `nox -s lint -- --fix` fixes."""
    session.install("-q", RUFF)
    session.run("ruff", "check", *session.posargs, ".")
    session.run("ruff", "format", "--check" if "--fix" not in session.posargs else "--quiet", ".")


@nox.session
@nox.parametrize("torch", TORCH_VERSIONS, ids=TORCH_VERSIONS)
@_pruned
def core(session: nox.Session, torch: str) -> None:
    """Framework-free core: only torch, pytest and hypothesis; once on each torch of TORCH_TESTED (the newest, and
    the floor pyproject claims: that one is PyPI's CUDA build, ~3 GB with its nvidia libraries, run on the CPU)."""
    _base(session, torch=f"torch=={torch}")
    frameworks = repr(set(TESTED))  # `import cfpo_loss` imports none of them
    session.run("python", "-c", f"import sys, cfpo_loss; assert not {frameworks} & set(sys.modules)")
    session.run("python", "-m", "cfpo_loss", env=ENV)
    _pytest(session, "tests/core")
    if torch == TORCH_VERSIONS[0]:
        _pytest_second_rounding(session, "tests/core")


@nox.session
@_pruned
def package(session: nox.Session) -> None:
    """The package as users get it: build the sdist and the wheel, check them, install the WHEEL (not editable)
    with the trl extra into this fresh environment, and use it from outside the source tree: `python -m cfpo_loss`,
    an import of every adapter, the TRL mirror shipped as package data, the verl entry point, the core tests."""
    import glob
    import shutil

    _install(session, "build==1.6.1", "twine==7.0.0")
    dist = os.path.join(session.create_tmp(), "dist")
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", dist, ".", silent=True)
    files = sorted(glob.glob(os.path.join(dist, "*")))
    session.run("python", "-m", "twine", "check", "--strict", *files)
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    session.log(f"wheel: {os.path.abspath(wheel)}")  # `pip install "<this path>[trl]"` anywhere (README: Install)
    _install(session, TORCH)
    _install(session, f"{wheel}[trl]", *TEST_DEPS)
    tests = os.path.abspath("tests/core")
    with session.chdir(session.create_tmp()):  # outside the repo: only the installed wheel can be imported
        session.run("python", "-c", PACKAGE_CHECK, env=ENV)
        session.run("python", "-m", "cfpo_loss", env=ENV)
        session.run("python", "-m", "cfpo_loss.adapters.trl_check", env=ENV)  # reads the mirror from package data
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", ".", tests, env=ENV)


PACKAGE_CHECK = """
import importlib.metadata as md, pathlib, cfpo_loss
where = pathlib.Path(cfpo_loss.__file__).parent
assert "site-packages" in str(where), f"cfpo_loss imported from {where}, not from the installed wheel"
assert md.version("cfpo-loss") == cfpo_loss.__version__, (md.version("cfpo-loss"), cfpo_loss.__version__)
assert (where / "py.typed").is_file(), "py.typed missing from the wheel"
eps = [e for e in md.entry_points(group="verl.plugins") if e.name == "cfpo_loss"]
assert [e.value for e in eps] == ["cfpo_loss.adapters.verl"], eps
import cfpo_loss.adapters.trl, cfpo_loss.adapters.openrlhf, cfpo_loss.adapters.openrlhf.train_ppo_ray
import cfpo_loss.adapters.verl  # verl is not installed here: the adapter says so and imports
import cfpo_loss.adapters.skyrl  # nor skyrl (Python >= 3.12): the adapter warns and imports
print("wheel ok:", where)
"""


@nox.session
@_pruned
def docs(session: nox.Session) -> None:
    """The documentation site, which cannot go stale: `mkdocs build --strict` (any warning fails: a broken link or
    anchor, an unresolved API reference, a page missing from the nav) into .nox/docs/tmp/site, then every Python
    block of the docs as a test (Sybil; a block that needs a framework or a GPU is skipped with its reason shown, and
    runs in its framework's session) and tests/core/test_docs.py (the metric table, the nav, the README)."""
    _install(session, TORCH)  # first and alone: the later installs keep it (see the module docstring)
    _install(session, "-e", ".[docs]")  # the pinned toolchain of pyproject's `docs` extra
    site = os.path.join(session.create_tmp(), "site")
    session.run("mkdocs", "build", "--strict", "--clean", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})
    session.log(f"site: file://{os.path.abspath(site)}/index.html (no search there: a browser runs no web worker")
    session.log(
        f"from file://; with search: `python3 -m http.server -d {os.path.relpath(site)}`, http://localhost:8000)"
    )
    # tests/docs: nothing behind a horizontal scroll bar at 1280 px (a headless Chromium; skipped, saying why, without)
    session.env["CFPO_SITE"] = os.path.abspath(site)
    _pytest(session, *DOC_TESTS, "tests/core/test_docs.py", "tests/docs")


@nox.session
@_pruned
def trl(session: nox.Session) -> None:
    """TRL adapter against the real trl==1.16.0 GRPOTrainer and RLOOTrainer; then the examples, briefly, so they
    cannot rot."""
    _base(session, TRL, "matplotlib", "tqdm", SYBIL)
    session.run("python", "-m", "cfpo_loss.adapters.trl_check", env=ENV)  # MATCH, or the diff to review
    _pytest(session, "tests/trl", *DOC_TESTS)
    _pytest_second_rounding(session, "tests/trl")
    if not session.posargs:
        session.run("python", "examples/trl_cfpo.py", "--steps", "8", env=ENV)
        session.run("python", "examples/trl_cfpo.py", "--steps", "8", "--objective", "cfpo", "--fused", env=ENV)
        session.run("python", "examples/rloo_ratio_study.py", "--lengths", "4", "--seeds", "0", "--steps", "4", env=ENV)


@nox.session
@nox.parametrize("version", VERL_VERSIONS, ids=VERL_VERSIONS)
@_pruned
def verl(session: nox.Session, version: str) -> None:
    """verl plugin against a real verl (each of TESTED["verl"]): registry, loss path, verl's own Ray workers.

    verl 0.8.0 has no `verl.plugins` entry-point group: there the plugin is loaded through
    VERL_USE_EXTERNAL_MODULES (the adapter's documented switch), which `python -m cfpo_loss` must report.
    For the first (default) version also verl's own CPU tests of its core algorithms, run against the
    installed verl with our plugin loaded (verl's wheel ships no tests; its PyPI sdist does: fetched with
    pip, only tests/ unpacked, so the installed verl - not a source tree - is what they import).
    """
    import glob
    import tarfile

    spec = f"verl=={version}"
    _base(session, spec, *VERL_EXTRA.get(version, []), *VERL_MAIN_PPO_DEPS, SYBIL)  # `-e .` writes the entry point
    entry_points = _support.version_key(version) >= (0, 9, 0)
    env = dict(ENV) if entry_points else {**ENV, "VERL_USE_EXTERNAL_MODULES": "cfpo_loss.adapters.verl"}
    mechanism = "entry point" if entry_points else "VERL_USE_EXTERNAL_MODULES"
    _expect_report(session, ("verl plugin: REGISTERED", f"mechanism: {mechanism}\n"), env=env)
    _pytest(session, "tests/verl", *DOC_TESTS)
    if version == VERL_VERSIONS[0]:
        _pytest_second_rounding(session, "tests/verl")
    if version != VERL_VERSIONS[0] or session.posargs:
        return

    tmp = session.create_tmp()
    session.run_install("python", "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", spec, "-d", tmp)
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
@nox.parametrize("version", OPENRLHF_VERSIONS, ids=OPENRLHF_VERSIONS)
@_pruned
def openrlhf(session: nox.Session, version: str) -> None:
    """OpenRLHF adapter against a real OpenRLHF (each of TESTED["openrlhf"]): its PolicyLoss, its CLI, Ray actors
    and its own wheel tests. 0.11.2 has the is_correction_* PolicyLoss API, 0.10.4 (like 0.11.0 / 0.11.1) the
    older vllm_is_* one.

    OpenRLHF's declared pins cannot install on a CPU machine (flash-attn has no CPU build), so it is
    installed with --no-deps plus what its loss / actor / CLI modules really import, at its own pins. See
    tests/openrlhf/README.md for what is left out and why.
    """
    _base(session, SYBIL)
    _install(session, "--no-deps", f"openrlhf=={version}")
    deepspeed, *pins = OPENRLHF_PINS[version]
    # deepspeed ships only an sdist; build isolation would pull a second (CUDA) torch into the build env
    _install(session, "setuptools", "wheel", "packaging")
    _install(session, "--no-build-isolation", deepspeed)
    # what openrlhf.models / openrlhf.trainer.ray.ppo_actor / openrlhf.cli.train_ppo_ray import at module
    # level, at OpenRLHF's own pins (flash-attn and vllm excepted: import-only test stand-ins; the rest of
    # OpenRLHF's declared dependencies is imported only by training / logging code: tests/openrlhf/README.md);
    # datasets: openrlhf.trainer.ppo_trainer(_async) load the prompts with it (tests/openrlhf/test_async.py)
    _install(session, *pins, "peft", "torchdata", "tqdm", "sympy", "pylatexenc", "pillow", "datasets")
    # the stand-ins go on sys.path of this venv only (also seen by Ray workers and subprocesses)
    # run_install: the .pth is part of installing, so `nox --install-only` writes it too
    site = session.run_install("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True)
    if site is not None:  # None under `nox -R` (installs skipped): the .pth the install wrote stays
        with open(os.path.join(site.strip(), "cfpo_openrlhf_test_standins.pth"), "w") as f:
            f.write(os.path.abspath("tests/openrlhf/standins") + "\n")
    session.run("python", "-m", "cfpo_loss", env=ENV)
    _pytest(session, "tests/openrlhf", *DOC_TESTS)
    if version == OPENRLHF_VERSIONS[0]:
        _pytest_second_rounding(session, "tests/openrlhf")


@nox.session(python=SKYRL_PYTHON or False)
@nox.parametrize("version", SKYRL_VERSIONS, ids=SKYRL_VERSIONS)
@_pruned
def skyrl(session: nox.Session, version: str) -> None:
    """SkyRL adapter against a real skyrl (each of TESTED["skyrl"]) on Python 3.12: its loss registry, its losses,
    its worker's forward_backward, a local Ray worker, its entry point and its fully-async trainer.

    skyrl's `skyrl-train` extra pins flash-attn (no CPU build) and vllm, so skyrl is installed with its own
    dependencies plus SKYRL_DEPS. On cp312, torch 2.13.0 from the index is the CUDA build (it runs on the CPU).
    """
    if SKYRL_PYTHON is None:
        session.error("skyrl needs Python 3.12: none found (python3.12 on PATH, a pyenv 3.12, or $CFPO_PYTHON312)")
    _base(session, f"skyrl=={version}", *SKYRL_DEPS, SYBIL)
    _expect_report(session, ("skyrl loss registry: REGISTERED",))
    _pytest(session, "tests/skyrl", *DOC_TESTS)
    _pytest_second_rounding(session, "tests/skyrl")


@nox.session
@nox.parametrize("version", AREAL_VERSIONS, ids=AREAL_VERSIONS)
@_pruned
def areal(session: nox.Session, version: str) -> None:
    """AReaL adapter against a real AReaL (each of TESTED["areal"]): its loss function, its FSDP actor on a tiny Qwen2
    (FSDP2 over gloo, CPU), its trainer's engine swap and worker service, its config loader.

    AReaL declares ~80 dependencies (agent SDKs, sglang, litellm, ...) that its training path never imports: it is
    installed with --no-deps plus AREAL_IMPORT_DEPS, on AREAL_TORCH (inside AReaL's declared torch range).
    """
    _base(session, SYBIL, torch=AREAL_TORCH)
    _install(session, "--no-deps", f"areal=={version}", torch=AREAL_TORCH)
    _install(session, *AREAL_IMPORT_DEPS, torch=AREAL_TORCH)
    session.run("python", "-m", "cfpo_loss.adapters.areal_check", env=ENV)  # MATCH, or the diff to review
    _expect_report(session, ("areal adapter: READY",))
    _pytest(session, "tests/areal", *DOC_TESTS)
    _pytest_second_rounding(session, "tests/areal")


MUTMUT = "mutmut==3.8.1"
#: `nox -s mutation`: each core module with the test files that hold it to its contract (its test subset)
MUTATION_SCOPE = {
    "surrogates": ["test_surrogates.py", "test_loss.py"],
    "metrics": ["test_metrics.py", "test_ratio_sums.py", "test_loss.py"],
    "_per_token": ["test_per_token.py", "test_metrics.py", "test_loss.py"],
    "loss": ["test_loss.py", "test_validation.py", "test_metrics.py"],
    "aggregation": ["test_loss.py", "test_validation.py"],
    "_checks": ["test_validation.py", "test_loss.py"],
    "advantages": ["test_advantages.py"],
    "fused": ["test_fused.py"],
}
#: mutmut's settings for every module; lines that only raise or word an error message are not mutated (messages
#: are pinned where they matter by test_validation.py, and their mutants survive expensively)
MUTMUT_CONFIG = """[tool.mutmut]
source_paths = ["src"]
only_mutate = ["src/cfpo_loss/{module}.py"]
do_not_mutate_patterns = ['^\\s*raise ', '^\\s*f?"[^"]*"\\)?$']
mutate_only_covered_lines = true
pytest_add_cli_args_test_selection = [{tests}]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
process_isolation = "forkserver"
"""


@nox.session
def mutation(session: nox.Session) -> None:
    """Mutation testing of the core with mutmut (not a CI session: not in nox.options.sessions).

    For each core module (MUTATION_SCOPE) mutmut copies src/ into a work folder, rewrites that module's functions
    so that each mutant can be switched on alone, records which tests of the module's test subset reach which
    function, then runs, per mutant, only those tests, fastest first, stopping at the first failure (`-x`), in a
    worker forked from a process that has already imported torch and the tests. torch.compile is off
    (TORCHDYNAMO_DISABLE=1): the compiled path then runs the same Python functions eagerly, and no mutant pays
    for a compilation. Prints the survivors and mutmut's score ((killed + timeout) / tested). A full run took 56 min
    on the shared 2-core machine (fused alone 21 min): run it in two halves, `-- fused` and the other seven modules,
    about 30 min each. Score and survivors: CONTRIBUTING.md, "Testing".

    `nox -s mutation` runs every module; `nox -s mutation -- metrics _per_token` some. The work folders stay in
    .nox/mutation-work/MODULE: `cd` there and `../../mutation/bin/mutmut show NAME` prints a survivor's diff.
    cfpo_loss itself is not installed: the tests must import mutmut's mutated copy (mutants/src).
    """
    import json
    import shutil

    modules = session.posargs or list(MUTATION_SCOPE)
    unknown = set(modules) - set(MUTATION_SCOPE)
    if unknown:
        session.error(f"unknown module(s) {sorted(unknown)}; valid: {', '.join(MUTATION_SCOPE)}")
    _install(session, TORCH)  # first and alone, so nothing later drags in a CUDA build
    _install(session, *TEST_DEPS, MUTMUT)
    env = {**ENV, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.abspath(__file__))
    survivors = []
    counts = {"killed": 0, "timeout": 0, "survived": 0, "no tests": 0, "skipped": 0, "not checked": 0}
    # not inside the venv: coverage (mutate_only_covered_lines) does not measure files under it
    base = os.path.join(root, ".nox", "mutation-work")
    snapshot = os.path.join(base, "_snapshot")  # the tree as it is now: edits during the run change nothing
    shutil.rmtree(snapshot, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(os.path.join(root, "src"), os.path.join(snapshot, "src"), ignore=ignore)
    shutil.copytree(os.path.join(root, "tests", "core"), os.path.join(snapshot, "tests", "core"), ignore=ignore)
    for module in modules:
        work = os.path.join(base, module)
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(snapshot, work)
        tests = ", ".join(f'"tests/core/{name}"' for name in MUTATION_SCOPE[module])
        with open(os.path.join(work, "pyproject.toml"), "w") as f:
            f.write(MUTMUT_CONFIG.format(module=module, tests=tests))
        with session.chdir(work):
            session.run("mutmut", "run", "--max-children", "2", env=env)
        with open(os.path.join(work, "mutants", "src", "cfpo_loss", f"{module}.py.meta")) as f:
            codes = json.load(f)["exit_code_by_key"]
        for name, code in codes.items():  # mutmut's exit codes (mutmut/stats.py)
            key = {
                1: "killed",
                3: "killed",
                0: "survived",
                5: "no tests",
                33: "no tests",
                34: "skipped",
                None: "not checked",
            }.get(code)
            key = key or ("timeout" if code in (24, -24, 36, 152, 255) else "survived")  # suspicious: not killed
            counts[key] += 1
            if key == "survived":
                survivors.append(name)
    session.log("survivors:\n  " + "\n  ".join(survivors))
    tested = sum(counts.values()) - counts["skipped"] - counts["not checked"]
    score = (counts["killed"] + counts["timeout"]) / max(tested, 1)  # mutmut's own score (its `badge` command)
    session.log(f"mutation score (killed + timeout) / tested = {score:.1%}; {counts}")


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main command: build an environment from nothing and run examples/stability_demo.py.

    Not a test (not in nox.options.sessions). `nox -s demo` runs the default configuration (clip vs cfpo x
    num_iterations 1/4/16 with the real TRL GRPOTrainer, <= 15 min on 2 CPU cores) and writes
    stability_demo_out/; `nox -s demo -- --quick` is the < 2 minute smoke run; arguments after `--` go to the
    script (`nox -s demo -- --out my_dir --rounds 100`). `nox -s demo -- --grid` runs the paper's second axis:
    clip/cfpo x num_iterations 1/2/4/8 x batch ratio 1/2/4/8 (32 runs of 100 rounds; 15 min of CPU time, 23 min
    wall measured on the shared 2-core machine), heat maps per metric (README, "batch ratio x iterations").
    """
    _install(session, TORCH)  # first and alone, so nothing later drags in a CUDA build
    _install(session, "-e", ".[trl,demo]")  # trl 1.16.x, matplotlib, tqdm: what a user installs
    session.run("python", "examples/stability_demo.py", *session.posargs, env=ENV)
