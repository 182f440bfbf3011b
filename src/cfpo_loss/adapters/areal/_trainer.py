"""``PPOTrainer``: AReaL's ``PPOTrainer`` whose actor engine is ``CFPOFSDPPPOActor``.

AReaL builds its train engines in ``PPOTrainer._create_train_engine``: the FSDP / Megatron / Archon actor class
by ``alloc.backend``, then either the engine itself (SPMD mode) or ``actor_cls.as_controller(...)`` (single-controller
mode, the default), whose workers import the class by ``f"{cls.__module__}.{cls.__name__}"``. This override builds
the CFPO engine for the config that carries the objective (the actor's); the reference and teacher engines, which
never train, stay AReaL's. Megatron and Archon actors are refused by name: their engines were not tested here
(Megatron needs Python >= 3.12 and CUDA), and building AReaL's would silently train with AReaL's own loss.
"""

from areal.trainer.rl_trainer import PPOTrainer as AReaLPPOTrainer
from areal.utils.environ import is_single_controller

from ._actor import CFPOActorConfig, CFPOFSDPPPOActor
from ._names import ADAPTER_MODULE


class PPOTrainer(AReaLPPOTrainer):
    """``from cfpo_loss.adapters.areal import PPOTrainer, CFPOConfig`` in place of AReaL's ``PPOTrainer`` and
    ``GRPOConfig``; ``actor.objective`` ("cfpo" or "clip") picks the objective."""

    def __init__(self, config, *args, **kwargs):
        if not isinstance(getattr(config, "actor", None), CFPOActorConfig):
            raise TypeError(
                f"{ADAPTER_MODULE}.PPOTrainer needs config.actor to be a CFPOActorConfig (it carries the objective); "
                f"got {type(getattr(config, 'actor', None)).__name__}. Load the config with "
                f"load_expr_config(argv, {ADAPTER_MODULE}.CFPOConfig)."
            )
        super().__init__(config, *args, **kwargs)

    def _create_train_engine(self, actor_config, alloc):
        if not isinstance(actor_config, CFPOActorConfig):  # ref / teacher: forward passes only
            return super()._create_train_engine(actor_config, alloc)
        if alloc.backend != "fsdp":
            raise NotImplementedError(
                f"{ADAPTER_MODULE}: the actor backend {alloc.backend!r} is not supported (only 'fsdp'); AReaL's "
                f"{alloc.backend} actor would train with AReaL's own loss, not objective {actor_config.objective!r}"
            )
        if is_single_controller():
            actor = CFPOFSDPPPOActor.as_controller(actor_config, self.scheduler)
        else:
            actor = CFPOFSDPPPOActor(config=actor_config)
        actor.create_process_group(parallel_strategy=alloc.parallel)
        return actor


PPOTrainer.__module__ = ADAPTER_MODULE  # what workers and pickles see (see _names.py)
