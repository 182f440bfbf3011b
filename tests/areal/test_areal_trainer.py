"""The one-import swap reaches the engine a worker builds, and everything that would bypass the chosen objective is
refused by name.

Single-controller mode (AReaL's default) is followed end to end on AReaL's own code: ``PPOTrainer._create_train_engine``
-> ``FSDPPPOActor.as_controller`` -> AReaL's ``TrainController.initialize``, which derives the engine's import string
and hands it with the config to its scheduler; the scheduler here forwards that request, serialised by AReaL's own
``serialize_value``, to AReaL's worker-side engine service (the Flask blueprint a worker runs, through Flask's test
client instead of HTTP), which imports the class by name and builds the engine.
"""

from __future__ import annotations

import functools

import pytest
from areal.api.alloc_mode import ModelAllocation
from areal.api.cli_args import GRPOConfig, PPOActorConfig, load_expr_config
from areal.engine import FSDPPPOActor
from areal.trainer.ppo.actor import PPOActorController, grpo_loss_fn
from areal_helpers import actor_config

from cfpo_loss.adapters.areal import (
    ADAPTER_MODULE,
    CFPOActorConfig,
    CFPOConfig,
    CFPOFSDPPPOActor,
    PPOTrainer,
    _actor,
)


def bare_trainer():
    """A PPOTrainer without its __init__ (which would start rollout servers): what _create_train_engine needs."""
    trainer = object.__new__(PPOTrainer)
    trainer.scheduler = None
    return trainer


ALLOC = ModelAllocation.from_str("fsdp:d1", name="actor")


class _EngineBuilt(Exception):
    pass


class WorkerScheduler:
    """The scheduler calls TrainController.initialize makes, up to engine creation, sent to AReaL's worker service."""

    def __init__(self):
        from areal.api.scheduler_api import Worker
        from areal.infra.rpc.guard import engine_blueprint
        from flask import Flask

        self.blueprint = engine_blueprint
        app = Flask("cfpo-test-worker")
        app.register_blueprint(engine_blueprint.engine_bp)
        self.client = app.test_client()
        self.worker = Worker(id="actor/0", ip="127.0.0.1", worker_ports=["1", "2"], engine_ports=[])

    def create_workers(self, job):
        return [self.worker.id]

    def get_workers(self, role, timeout=None):
        return [self.worker]

    async def set_worker_env(self, worker_id, env):
        pass

    async def create_engine(self, worker_id, engine, *args, engine_name=None, **kwargs):
        from areal.infra.rpc.serialization import serialize_value

        payload = {"engine": engine, "engine_name": engine_name, "init_args": serialize_value(list(args)),
                   "init_kwargs": serialize_value(kwargs)}  # fmt: skip  # what AReaL's LocalScheduler posts
        response = self.client.post("/create_engine", json=payload)
        assert response.status_code == 200, response.get_json()
        raise _EngineBuilt(engine)  # the rest of initialize (model loading on the worker) is not under test


def test_single_controller_worker_builds_the_cfpo_engine(tiny_model_dir):
    from areal.api import FinetuneSpec

    config = actor_config(CFPOActorConfig, tiny_model_dir, objective="clip")  # not the default: it must travel
    trainer = bare_trainer()
    trainer.scheduler = WorkerScheduler()
    controller = trainer._create_train_engine(config, ALLOC)
    assert isinstance(controller, PPOActorController) and controller.train_engine is CFPOFSDPPPOActor
    with pytest.raises(_EngineBuilt) as built:
        controller.initialize(role="actor", ft_spec=FinetuneSpec(1, 8, 8))
    assert str(built.value) == f"{ADAPTER_MODULE}.CFPOFSDPPPOActor"  # the import string the worker was given
    engine = trainer.scheduler.blueprint._engines.pop("actor/0")
    assert type(engine) is CFPOFSDPPPOActor
    assert type(engine.config) is CFPOActorConfig and engine.config.objective == "clip"
    assert engine.config.eps_clip_higher == 0.28  # AReaL's options travel with it


def test_spmd_mode_builds_the_cfpo_engine(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AREAL_SPMD_MODE", "1")
    engine = bare_trainer()._create_train_engine(actor_config(CFPOActorConfig, tiny_model_dir), ALLOC)
    assert type(engine) is CFPOFSDPPPOActor


def test_reference_engine_stays_areals(tiny_model_dir, monkeypatch):
    """The reference (and teacher) config is AReaL's PPOActorConfig: it only runs forward passes."""
    monkeypatch.setenv("AREAL_SPMD_MODE", "1")
    engine = bare_trainer()._create_train_engine(actor_config(PPOActorConfig, tiny_model_dir), ALLOC)
    assert type(engine) is FSDPPPOActor


@pytest.mark.parametrize("backend", ["megatron:d1", "archon:d1"])
def test_other_actor_backends_are_refused_by_name(tiny_model_dir, backend):
    alloc = ModelAllocation.from_str(backend, name="actor")
    with pytest.raises(NotImplementedError, match=backend.split(":")[0]):
        bare_trainer()._create_train_engine(actor_config(CFPOActorConfig, tiny_model_dir), alloc)


def test_trainer_refuses_a_config_without_the_objective():
    config = GRPOConfig(experiment_name="x", trial_name="y")
    with pytest.raises(TypeError, match="CFPOActorConfig"):
        PPOTrainer(config)


def test_the_config_loads_through_areals_loader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # load_expr_config saves the config under the stats logger's folder
    yaml = tmp_path / "cfpo.yaml"
    names = "  experiment_name: ${experiment_name}\n  trial_name: ${trial_name}\n"
    sections = "".join(f"{key}:\n{names}  fileroot: {tmp_path}\n" for key in ("saver", "recover", "evaluator",
                                                                             "stats_logger"))  # fmt: skip
    yaml.write_text("experiment_name: cfpo\ntrial_name: t0\n" + sections + "train_dataset:\n  path: none\n  type: rl\n"
                    "rollout:\n  backend: sglang:d1\nactor:\n" + names + "  backend: fsdp:d1\n  objective: clip\n"
                    "  eps_clip: 0.2\n")  # fmt: skip
    config, _ = load_expr_config(["--config", str(yaml), "+actor.eps_clip_higher=0.28"], CFPOConfig)
    assert type(config.actor) is CFPOActorConfig
    assert config.actor.objective == "clip" and config.actor.eps_clip_higher == 0.28
    # AReaL's loader overrides keys the YAML has without "+", and adds absent ones with it
    cfpo, _ = load_expr_config(["--config", str(yaml), "actor.objective=cfpo"], CFPOConfig)
    assert cfpo.actor.objective == "cfpo"
    with pytest.raises(Exception, match="c_clip"):
        load_expr_config(["--config", str(yaml), "actor.objective=cfpo", "+actor.c_clip=3.0"], CFPOConfig)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(c_clip=3.0), "c_clip"),
        (dict(use_sapo_loss=True), "use_sapo_loss"),
        (dict(objective="spo"), "objective"),
        (dict(eps_clip=1.2), "eps_clip"),
    ],
)
def test_config_refuses_by_name(tiny_model_dir, options, match):
    with pytest.raises(ValueError, match=match):
        actor_config(CFPOActorConfig, tiny_model_dir, **options)


def test_dual_clip_is_accepted_with_the_clip_objective(tiny_model_dir):
    assert actor_config(CFPOActorConfig, tiny_model_dir, objective="clip", c_clip=3.0).c_clip == 3.0


def test_engine_refuses_a_loss_it_does_not_recognise():
    with pytest.raises(RuntimeError, match="grpo_loss_fn"):
        _actor.cfpo_loss_fn(lambda logprobs, entropy, data, **kw: logprobs.sum(), "cfpo")
    sapo = functools.partial(grpo_loss_fn, eps_clip=0.2, eps_clip_higher=None, c_clip=None, use_sapo_loss=True)
    with pytest.raises(RuntimeError, match="SAPO"):
        _actor.cfpo_loss_fn(sapo, "cfpo")


def test_the_swapped_loss_is_areals_grpo_loss_fn_with_ours_inside():
    partial = functools.partial(grpo_loss_fn, eps_clip=0.2, eps_clip_higher=None, c_clip=None)
    swapped = _actor.cfpo_loss_fn(partial, "cfpo")
    assert swapped.keywords == partial.keywords
    assert swapped.func.__code__ is grpo_loss_fn.__code__  # AReaL's own code, only the loss it calls differs
    inner = swapped.func.__globals__["ppo_actor_loss_fn"]
    assert inner.func is _actor.policy_loss_fn and inner.keywords == {"objective": "cfpo"}
    import areal.trainer.ppo.actor as areal_actor
    from areal.utils.functional import ppo_actor_loss_fn

    assert areal_actor.ppo_actor_loss_fn is ppo_actor_loss_fn  # AReaL's module is untouched


def test_worker_visible_classes_import_by_their_names():
    from areal.utils.dynamic_import import import_from_string

    for cls in (CFPOFSDPPPOActor, CFPOActorConfig, CFPOConfig, PPOTrainer):
        assert cls.__module__ == ADAPTER_MODULE
        assert import_from_string(f"{cls.__module__}.{cls.__qualname__}") is cls
