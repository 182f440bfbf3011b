"""TEST-ONLY import stand-in for vllm (its wheels pin a CUDA torch). Every name raises when called."""

from _cfpo_test_standin import standin

__cfpo_test_standin__ = True
__version__ = "0.0.0+cfpo-test-standin"

SamplingParams = standin("vllm.SamplingParams")
