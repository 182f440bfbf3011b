"""TEST-ONLY import stand-in for vllm.utils. Every name raises when called."""

from _cfpo_test_standin import standin

random_uuid = standin("vllm.utils.random_uuid")
