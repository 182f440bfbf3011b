"""CFPOTrainer._compute_loss forward+backward: TRL's chunked log-prob kernel (use_fused_loss=False) vs cfpo_loss's
fused pass (use_fused_loss=True), same model and inputs, each configuration in a fresh process.

    .nox/trl/bin/python benchmarks/bench_trl_fused.py     # from the repo root, in the trl nox env
Prints time per step (mean of 3 after 1 warm-up) and the process's peak RSS (model + activations + loss)."""
import json, os, resource, subprocess, sys, tempfile, time

CASES = [(v, fused, bf16) for v in (32768, 131072) for bf16 in (False, True) for fused in (False, True)]


def child(vocab, fused, bf16):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from tokenizers import Tokenizer, models
    from cfpo_loss.adapters.trl import CFPOConfig, CFPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    B, P, T, H = 8, 32, 256, 256
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    d = tempfile.mkdtemp()
    Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=False)).save_pretrained(d)
    args = CFPOConfig(output_dir=d + "/o", per_device_train_batch_size=B, num_generations=4, max_completion_length=T,
                      report_to="none", use_cpu=True, bf16=bf16, use_fused_loss=fused, disable_tqdm=True)
    tr = CFPOTrainer(model=d, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
                     train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}), processing_class=tok)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(0)
    inputs = dict(prompt_ids=torch.randint(3, vocab, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.long),
                  completion_ids=torch.randint(3, vocab, (B, T), generator=g), completion_mask=torch.ones(B, T, dtype=torch.long),
                  advantages=torch.randn(B, generator=g), num_items_in_batch=torch.tensor(B * T),
                  old_per_token_logps=-torch.rand(B, T, generator=g) * 3 - 9)
    def step():
        tr.model.zero_grad(set_to_none=True)
        loss = tr._compute_loss(tr.model, inputs)
        loss.backward()
        return loss.item()
    step()
    t = time.perf_counter()
    for _ in range(3):
        loss = step()
    dt = (time.perf_counter() - t) / 3
    print(json.dumps(dict(vocab=vocab, fused=fused, bf16=bf16, s_per_step=round(dt, 3), loss=loss,
                          peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1")
    else:
        for v, f, b in CASES:
            out = subprocess.run([sys.executable, __file__, str(v), str(int(f)), str(int(b))], capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-2000:], flush=True)
