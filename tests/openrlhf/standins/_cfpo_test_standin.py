"""Shared helper for the import-only stand-ins in this folder (TEST ENVIRONMENT ONLY).

flash-attn 2.8.3 has no CPU build and vLLM's wheels pin their own CUDA torch, yet OpenRLHF 0.11.2
imports a few of their names at module level (ring-attention helpers in ``openrlhf.models``,
generation helpers in ``openrlhf.trainer.ray``) on paths that the policy loss, the PPO actor module
and the CLI parser never call. These stand-ins only let those modules import on a CPU machine.
Every name raises if it is ever called or instantiated, so no test can pass through them.
"""


class StandInCalled(RuntimeError):
    pass


def standin(qualname: str):
    """A callable/class placeholder that raises on any use."""

    def _raise(*_args, **_kwargs):
        raise StandInCalled(
            f"{qualname} is an import-only TEST stand-in (tests/openrlhf/standins); "
            "it must never be called. Install the real package to use it."
        )

    class _Meta(type):
        def __call__(cls, *args, **kwargs):
            _raise()

        def __getattr__(cls, name):
            _raise()

    return _Meta(
        qualname.rsplit(".", 1)[-1],
        (),
        {"__module__": qualname.rsplit(".", 1)[0], "__doc__": f"TEST stand-in for {qualname}"},
    )
