"""Subprocess probe for the launcher tests (run as a script; not a test module).

    python cli_probe.py native|launcher OUT.json ARGS...

Runs OpenRLHF's real ``openrlhf.cli.train_ppo_ray`` as ``__main__`` - natively (``runpy``, what
``python -m openrlhf.cli.train_ppo_ray`` does) or through our launcher - with every argument in ARGS,
and stops it at its first step after ``ray.init``: ``get_strategy(args)``. Two things are replaced
here, both in this probe only, so no GPU and no Ray cluster are needed:

- ``ray.init`` records its arguments instead of starting Ray (the launcher wraps whatever ``ray.init``
  it finds, so the record shows exactly what OpenRLHF's call hands to Ray under the launcher);
- ``openrlhf.utils.get_strategy`` writes the fully parsed and validated ``args`` to OUT.json and exits.
"""

import json
import runpy
import sys
import types


def main():
    mode, out_path, *argv = sys.argv[1:]
    import openrlhf.utils
    import ray

    record = {"ray_init": []}

    def fake_ray_init(*args, **kwargs):
        record["ray_init"].append({"args": list(args), "kwargs": kwargs})

    def to_plain(x):
        if isinstance(x, types.SimpleNamespace):
            return {k: to_plain(v) for k, v in vars(x).items()}
        if isinstance(x, (list, tuple)):
            return [to_plain(v) for v in x]
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        return repr(x)

    def capture_and_stop(args):
        from openrlhf.models.loss import PolicyLoss

        record["args"] = to_plain(args)
        record["driver_policy_loss_patched"] = "__cfpo_loss_patch__" in vars(PolicyLoss)
        with open(out_path, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        raise SystemExit(0)

    ray.init = fake_ray_init
    openrlhf.utils.get_strategy = capture_and_stop
    if mode == "native":
        sys.argv = ["train_ppo_ray.py", *argv]
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
    elif mode == "launcher":
        from cfpo_loss.adapters.openrlhf.train_ppo_ray import main as launcher_main

        launcher_main(argv)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    raise SystemExit("the CLI returned without reaching get_strategy")


if __name__ == "__main__":
    main()
