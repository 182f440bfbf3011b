"""AReaL adapter: CFPO (or the clipped objective, computed by cfpo_loss) in AReaL 1.0.x's PPO/GRPO actor.

One import swap::

    from cfpo_loss.adapters.areal import PPOTrainer, CFPOConfig   # for: from areal import PPOTrainer
    config, _ = load_expr_config(argv, CFPOConfig)                  # for: load_expr_config(argv, GRPOConfig)
    # actor.objective=cfpo (default) or clip, on the command line or in the YAML

``CFPOConfig.actor`` is a ``CFPOActorConfig`` (AReaL's ``PPOActorConfig`` + ``objective``); ``PPOTrainer`` builds
``CFPOFSDPPPOActor`` for the actor, in SPMD and in single-controller mode (whose workers import it by
``cfpo_loss.adapters.areal.CFPOFSDPPPOActor``). ``policy_loss_fn`` is AReaL's ``ppo_actor_loss_fn`` with an
``objective`` keyword. AReaL's ε (``eps_clip`` / ``eps_clip_higher``), decoupled loss, rejection sampling and
token / sequence importance-sampling levels keep their meaning; ``c_clip`` (dual clip) and ``use_sapo_loss`` are
refused with cfpo by name, and so are actor backends other than FSDP.

The import checks the installed AReaL (version and the text of every AReaL function the adapter relies on:
``python -m cfpo_loss.adapters.areal_check``) and refuses a mismatch.
"""

from ._guard import check_areal

check_areal()

from ._actor import CFPOActorConfig, CFPOConfig, CFPOFSDPPPOActor  # noqa: E402
from ._loss import policy_loss_fn  # noqa: E402
from ._names import ADAPTER_MODULE, OBJECTIVES  # noqa: E402
from ._trainer import PPOTrainer  # noqa: E402

__all__ = [
    "ADAPTER_MODULE",
    "OBJECTIVES",
    "CFPOActorConfig",
    "CFPOConfig",
    "CFPOFSDPPPOActor",
    "PPOTrainer",
    "policy_loss_fn",
]
