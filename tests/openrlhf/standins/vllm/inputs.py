"""TEST-ONLY import stand-in for vllm.inputs. Every name raises when called."""

from _cfpo_test_standin import standin

TokensPrompt = standin("vllm.inputs.TokensPrompt")
