"""The adapter's identity and vocabulary, imported by every module of the package (standard library only).

AReaL's single-controller workers import the engine class by the string ``f"{cls.__module__}.{cls.__name__}"``
and rebuild the config dataclass from its class path, so the classes a worker must find say they live in
``ADAPTER_MODULE`` (the public package), not in the private module that defines them: moving code between
the package's files then cannot break a running cluster's imports.
"""

from __future__ import annotations

#: the public module the worker-visible classes (engine, configs, trainer) are imported from
ADAPTER_MODULE = "cfpo_loss.adapters.areal"
#: the values of ``CFPOActorConfig.objective`` and ``policy_loss_fn(objective=...)``
OBJECTIVES = ("cfpo", "clip")
#: AReaL's ``importance_sampling_level`` -> the core's ``ratio_level`` (the same words)
RATIO_LEVELS = ("token", "sequence")
