"""Thin framework adapters: each imports its framework and the core, and nothing else. Shared by all three:
``_support`` (the supported / tested versions, the one range warning) and ``_metric_names`` (the one table of core
metric names -> each framework's keys).

    cfpo_loss.adapters.trl        CFPOTrainer / CFPOConfig and CFPORLOOTrainer / CFPORLOOConfig, drop-ins for TRL's
                                  GRPOTrainer and RLOOTrainer (python -m cfpo_loss.adapters.trl_check: a new TRL's diff)
    cfpo_loss.adapters.verl       registers loss_mode "cfpo" / "cfpo_seq" (loaded by verl's plugin entry point)
    cfpo_loss.adapters.openrlhf   install() and the train_ppo_ray launcher for --actor.policy_loss_type cfpo
    cfpo_loss.adapters.skyrl      registers policy_loss_type "cfpo" / "cfpo_seq" in SkyRL's PolicyLossRegistry
                                  (trainer.override_entrypoint=cfpo_loss.adapters.skyrl on SkyRL's entry point)
    cfpo_loss.adapters.areal      PPOTrainer / CFPOConfig for AReaL's PPOTrainer / GRPOConfig, policy_loss_fn
                                  (python -m cfpo_loss.adapters.areal_check: a new AReaL's diff)
"""
