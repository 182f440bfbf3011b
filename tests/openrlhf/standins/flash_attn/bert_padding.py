"""TEST-ONLY import stand-in for flash_attn.bert_padding. Every name raises when called."""

from _cfpo_test_standin import standin

index_first_axis = standin("flash_attn.bert_padding.index_first_axis")
pad_input = standin("flash_attn.bert_padding.pad_input")
unpad_input = standin("flash_attn.bert_padding.unpad_input")
rearrange = standin("flash_attn.bert_padding.rearrange")
