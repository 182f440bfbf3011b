"""Thin framework adapters: each imports its framework and the core, and nothing else.

    cfpo_loss.adapters.trl        CFPOTrainer / CFPOConfig, a drop-in for TRL's GRPOTrainer
    cfpo_loss.adapters.verl       registers loss_mode "cfpo" / "cfpo_seq" (loaded by verl's plugin entry point)
    cfpo_loss.adapters.openrlhf   install() and the train_ppo_ray launcher for --actor.policy_loss_type cfpo
"""
