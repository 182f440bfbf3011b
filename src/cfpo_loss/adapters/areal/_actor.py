"""The actor side: the config that carries the objective, and the FSDP actor engine that trains with it.

AReaL's ``PPOActor._ppo_update`` hands its engine's ``train_batch`` a ``functools.partial(grpo_loss_fn, ...)``, and
``grpo_loss_fn`` (its logging, M2PO masking, proximal log-prob approximation, distillation terms) calls the
module-level ``ppo_actor_loss_fn``. ``CFPOFSDPPPOActor.train_batch`` swaps that partial for the same function run
with ``ppo_actor_loss_fn`` bound to ``policy_loss_fn(objective=config.objective)`` in its globals: everything around
the loss stays AReaL's own code, and no AReaL module is patched (AReaL's own actor in the same process is untouched).
A loss function it does not recognise, or a flag that would pick another loss (SAPO), is refused by name rather
than run with AReaL's loss.
"""

import dataclasses
import functools
import types

from areal.api.cli_args import GRPOConfig, PPOActorConfig
from areal.engine import FSDPPPOActor
from areal.trainer.ppo import actor as areal_actor

from ._loss import check_options, policy_loss_fn
from ._names import ADAPTER_MODULE, OBJECTIVES


@dataclasses.dataclass
class CFPOActorConfig(PPOActorConfig):
    """AReaL's ``PPOActorConfig`` plus ``objective``; every AReaL option keeps its meaning (``eps_clip`` is ε_low,
    ``eps_clip_higher`` ε_high, the decoupled loss, rejection sampling, ``importance_sampling_level``)."""

    objective: str = dataclasses.field(
        default="cfpo",
        metadata={
            "help": "Per-token policy objective: 'cfpo' (clipping-free, quadratic trust-region penalty) or 'clip' "
            "(AReaL's clipped PPO objective, computed by cfpo_loss).",
            "choices": list(OBJECTIVES),
        },
    )

    def __post_init__(self):
        check_options(self.objective, self.c_clip, self.importance_sampling_level, self.eps_clip, self.eps_clip_higher)
        if self.use_sapo_loss:
            raise ValueError(
                "use_sapo_loss=True makes AReaL train with its SAPO loss instead of the PPO loss, so the chosen "
                f"objective {self.objective!r} would never run. Use areal.PPOTrainer for SAPO, or set "
                "actor.use_sapo_loss=false."
            )
        super().__post_init__()


@dataclasses.dataclass
class CFPOConfig(GRPOConfig):
    """AReaL's ``GRPOConfig`` whose ``actor`` is a ``CFPOActorConfig`` (``load_expr_config(argv, CFPOConfig)``
    reads ``actor.objective`` from the YAML or the command line like any other AReaL option)."""

    actor: CFPOActorConfig = dataclasses.field(default_factory=CFPOActorConfig)


class CFPOFSDPPPOActor(FSDPPPOActor):
    """AReaL's ``FSDPPPOActor`` whose PPO updates use ``policy_loss_fn(objective=config.objective)``."""

    def __init__(self, config: CFPOActorConfig):
        if not isinstance(config, CFPOActorConfig):
            raise TypeError(
                f"{type(self).__name__} needs a CFPOActorConfig (it carries the objective), got {type(config).__name__}"
            )
        super().__init__(config)

    def train_batch(self, input_, loss_fn, loss_weight_fn):
        return super().train_batch(input_, cfpo_loss_fn(loss_fn, self.config.objective), loss_weight_fn)


def cfpo_loss_fn(loss_fn, objective: str):
    """``loss_fn`` (the actor's ``functools.partial(grpo_loss_fn, ...)``) with the PPO loss inside it replaced."""
    if not (isinstance(loss_fn, functools.partial) and loss_fn.func is areal_actor.grpo_loss_fn):
        raise RuntimeError(
            f"{ADAPTER_MODULE}: the actor engine was handed the loss function {loss_fn!r}, not a "
            "functools.partial of areal.trainer.ppo.actor.grpo_loss_fn; training it would bypass the "
            f"{objective!r} objective, so it is refused"
        )
    if loss_fn.keywords.get("use_sapo_loss"):
        raise RuntimeError(f"{ADAPTER_MODULE}: use_sapo_loss=True would train with AReaL's SAPO loss")
    return functools.partial(grpo_loss_with(objective), *loss_fn.args, **loss_fn.keywords)


@functools.cache
def grpo_loss_with(objective: str):
    """AReaL's ``grpo_loss_fn`` whose global ``ppo_actor_loss_fn`` is ``policy_loss_fn(objective=objective)``:
    the same code object, a private copy of its module's globals (the module itself is not touched)."""
    original = areal_actor.grpo_loss_fn
    scope = dict(original.__globals__)
    scope["ppo_actor_loss_fn"] = functools.partial(policy_loss_fn, objective=objective)
    rebound = types.FunctionType(original.__code__, scope, original.__name__, original.__defaults__,
                                 original.__closure__)  # fmt: skip
    rebound.__kwdefaults__ = original.__kwdefaults__
    rebound.__qualname__ = f"{original.__qualname__}[{objective}]"
    return rebound


for _cls in (CFPOActorConfig, CFPOConfig, CFPOFSDPPPOActor):
    _cls.__module__ = ADAPTER_MODULE  # what workers import the class by (see _names.py)
