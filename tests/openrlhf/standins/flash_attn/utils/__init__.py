"""TEST-ONLY import stand-in for flash_attn.utils."""
