"""TEST-ONLY import stand-in for flash_attn.utils.distributed. Every name raises when called."""

from _cfpo_test_standin import standin

all_gather = standin("flash_attn.utils.distributed.all_gather")
