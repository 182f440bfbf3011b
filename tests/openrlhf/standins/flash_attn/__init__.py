"""TEST-ONLY import stand-in for flash_attn (no CPU build exists). See ../_cfpo_test_standin.py."""

__cfpo_test_standin__ = True
__version__ = "0.0.0+cfpo-test-standin"
