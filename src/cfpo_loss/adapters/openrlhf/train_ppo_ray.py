"""Drop-in launcher for ``python -m openrlhf.cli.train_ppo_ray`` that adds ``--actor.policy_loss_type cfpo``.

    python -m cfpo_loss.adapters.openrlhf.train_ppo_ray  <exactly openrlhf.cli.train_ppo_ray's arguments>
    cfpo-openrlhf-train-ppo-ray                          <the same>

It runs OpenRLHF's own CLI module as ``__main__`` (its parser, its checks, its ``train(args)``) with three
changes, and nothing else in the command changes:

1. the ``--actor.policy_loss_type`` choices are widened with ``cfpo`` and ``cfpo_seq``;
2. ``cfpo_loss.adapters.openrlhf.install()`` runs in this (driver) process;
3. every ``ray.init`` call made while the CLI runs gets ``worker_process_setup_hook =
   "cfpo_loss.adapters.openrlhf.install_on_import"`` added to its ``runtime_env``, so every Ray worker
   (the PPO actors that build ``PolicyLoss``) has the loss before any OpenRLHF actor is created. The
   hook patches ``PolicyLoss`` when a worker imports ``openrlhf.models.loss`` and imports nothing of
   OpenRLHF or DeepSpeed itself (OpenRLHF keeps DeepSpeed out of its vLLM engine processes). The rest of the
   ``ray.init`` call is OpenRLHF's own: its ``env_vars``, and the cluster it connects to (``RAY_ADDRESS``,
   a ``ray start`` cluster on this node, or ``ray job submit``'s, merged by Ray as usual).

cfpo_loss must be installed in the Python environment of every node of the Ray cluster (the hook imports
it there). If your job already sets its own ``worker_process_setup_hook``, Ray refuses a second one: call
``cfpo_loss.adapters.openrlhf.install_on_import()`` from your hook and set ``CFPO_OPENRLHF_SETUP_HOOK=0``
(the launcher then leaves ``ray.init`` alone).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import runpy
import sys
from collections.abc import Iterator, Sequence

from . import CFPO_LOSS_TYPES, install

__all__ = [
    "OPENRLHF_CLI",
    "SETUP_HOOK",
    "SETUP_HOOK_ENV",
    "main",
    "ray_init_with_setup_hook",
    "widened_policy_loss_choices",
    "with_setup_hook",
]

OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"
#: what Ray workers import and call at start (a module path, so nothing is pickled): it patches PolicyLoss
#: when the worker imports openrlhf.models.loss, and imports nothing of OpenRLHF itself
SETUP_HOOK = "cfpo_loss.adapters.openrlhf.install_on_import"
#: set to "0" to leave ray.init's runtime_env alone (your own worker_process_setup_hook calls SETUP_HOOK)
SETUP_HOOK_ENV = "CFPO_OPENRLHF_SETUP_HOOK"
_OPTIONS = ("--actor.policy_loss_type", "--policy_loss_type")  # 0.11's dotted name; the flat one of older CLIs


@contextlib.contextmanager
def widened_policy_loss_choices() -> Iterator[None]:
    """While active, an argparse option named ``--actor.policy_loss_type`` with ``choices`` also accepts
    cfpo / cfpo_seq. OpenRLHF builds its parser inside ``if __name__ == "__main__":``, so the option can
    only be widened as it is added."""
    native = argparse._ActionsContainer.add_argument

    @functools.wraps(native)
    def add_argument(self, *args, **kwargs):
        choices = kwargs.get("choices")
        if choices is not None and any(a in _OPTIONS for a in args):
            kwargs["choices"] = list(choices) + [t for t in CFPO_LOSS_TYPES if t not in choices]
        return native(self, *args, **kwargs)

    argparse._ActionsContainer.add_argument = add_argument
    try:
        yield
    finally:
        argparse._ActionsContainer.add_argument = native


def with_setup_hook(runtime_env: dict | None) -> dict | None:
    """``runtime_env`` plus our ``worker_process_setup_hook`` (a copy; the caller's dict is untouched).

    With ``CFPO_OPENRLHF_SETUP_HOOK=0`` in the environment, ``runtime_env`` is returned as given: for
    jobs that bring their own hook (Ray runs one), which must then call ``install_on_import()`` itself.
    """
    if os.environ.get(SETUP_HOOK_ENV, "1") == "0":
        return runtime_env
    runtime_env = dict(runtime_env or {})
    hook = runtime_env.get("worker_process_setup_hook")
    if hook is not None and hook != SETUP_HOOK:
        raise ValueError(
            f"runtime_env already has worker_process_setup_hook={hook!r}; Ray runs one hook per worker. "
            f"Call {SETUP_HOOK}() from that hook and set {SETUP_HOOK_ENV}=0 for this launcher."
        )
    runtime_env["worker_process_setup_hook"] = SETUP_HOOK
    return runtime_env


@contextlib.contextmanager
def ray_init_with_setup_hook() -> Iterator[None]:
    """While active, ``ray.init(...)`` runs with ``runtime_env`` carrying our worker setup hook; every
    other argument (address, env_vars, ...) is passed through unchanged."""
    import ray

    native = ray.init

    @functools.wraps(native)
    def init(*args, **kwargs):
        kwargs["runtime_env"] = with_setup_hook(kwargs.get("runtime_env"))
        return native(*args, **kwargs)

    ray.init = init
    try:
        yield
    finally:
        ray.init = native


def main(argv: Sequence[str] | None = None, *, cli_module: str = OPENRLHF_CLI) -> None:
    """Run OpenRLHF's ``train_ppo_ray`` CLI with the cfpo policy losses available in driver and workers.

    ``argv`` defaults to ``sys.argv[1:]`` and reaches OpenRLHF's parser unchanged. ``cli_module`` is the
    module run as ``__main__`` (OpenRLHF's CLI; other values are for tests).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    import ray

    if ray.is_initialized():
        raise RuntimeError(
            "Ray is already initialised in this process without the cfpo worker setup hook; start the "
            "launcher in a fresh process (it connects to an existing cluster through RAY_ADDRESS)"
        )
    install()
    saved_argv = sys.argv
    sys.argv = [f"{cli_module.rsplit('.', 1)[-1]}.py", *argv]
    try:
        with widened_policy_loss_choices(), ray_init_with_setup_hook():
            runpy.run_module(cli_module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    main()
