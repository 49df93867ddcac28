"""GPU check and timings for model.py at real sizes, with random weights (no real weights travel).

    python bench/gpu.py                 # Llama-3-8B and Mistral-7B shapes, bf16
    python bench/gpu.py --quick         # smaller runs

1. Correctness on the GPU: a tiny random Llama in fp32 against transformers on the same device (when
   transformers is installed), and batched ragged generation against one prompt at a time.
2. Speed at real shapes in bf16: prefill, batch-1 decode and batched decode tok/s, with the bound that
   memory bandwidth sets for batch-1 decode (all weight bytes read once per token).
Prints the card's name with every number.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as m  # noqa: E402

SHAPES = {
    "Llama-3-8B": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009),
    "Mistral-7B": dict(architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                       rms_norm_eps=1e-5, max_position_embeddings=32768, rope_theta=1000000.0,
                       sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


class NoTokenizer:
    """Enough of a tokenizer for timing random models: never stops, decodes to nothing."""
    eos_ids, pad_id = [], 0

    def decode(self, ids):
        return ""


def sync():
    torch.cuda.synchronize()


def copy_bandwidth(n_bytes=2 * 2**30) -> float:
    x = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * n_bytes * 10 / (time.perf_counter() - start)  # read + write


def correctness(device):
    print("== correctness on", torch.cuda.get_device_name())
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        try:
            from conftest import tiny_hf_model
            hf = tiny_hf_model("llama", folder).to(device)
            ours, tok = m.load(folder, dtype=torch.float32, device=device)
            tokens = torch.randint(3, 96, (2, 24), device=device)
            with torch.no_grad():
                diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
            print(f"tiny Llama fp32 logits vs transformers on {device}: max |diff| {diff:.2e}")
        except ImportError as e:
            print(f"transformers not available ({e}); skipping the parity check")
            return
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
        batched = m.generate(ours, tok, prompts, max_new_tokens=12)
        single = [m.generate(ours, tok, [p], max_new_tokens=12).tokens[0] for p in prompts]
        print(f"batched ragged greedy == one at a time (fp32, {device}): {batched.tokens == single}")


def random_model(config: dict, device, dtype=torch.bfloat16):
    args = m.ModelArgs.from_config(config)
    with torch.device("meta"):
        model = m.Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0)
    model.inv_freq = m.rope_frequencies(args).to(device)
    return model.eval().requires_grad_(False)


def time_generate(model, batch, prompt_len, new_tokens):
    prompts = [torch.randint(0, model.args.vocab_size, (prompt_len,)).tolist() for _ in range(batch)]
    m.generate(model, NoTokenizer(), prompts, max_new_tokens=4)  # warm-up
    sync()
    start = time.perf_counter()
    m.generate(model, NoTokenizer(), prompts, max_new_tokens=new_tokens)
    sync()
    return batch * new_tokens / (time.perf_counter() - start)


def speed(name, config, quick):
    device = torch.device("cuda")
    model = random_model(config, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    tokens = torch.randint(0, config["vocab_size"], (1, 512), device=device)
    with torch.inference_mode():
        model(tokens, last_only=True)
        sync()
        start = time.perf_counter()
        for _ in range(5):
            model(tokens, last_only=True)
        sync()
    prefill_tps = 5 * 512 / (time.perf_counter() - start)
    single = time_generate(model, 1, 32, 64 if quick else 128)
    batched = time_generate(model, 32, 32, 64 if quick else 256)
    print(f"== {name} shapes, bf16, random weights, {card}")
    print(f"weights {weight_bytes / 1e9:.1f} GB; copy bandwidth {bandwidth / 1e12:.2f} TB/s; batch-1 decode bound "
          f"{bandwidth / weight_bytes:.0f} tok/s")
    print(f"prefill 1x512: {prefill_tps:,.0f} tok/s | decode batch 1: {single:.1f} tok/s "
          f"({single * weight_bytes / bandwidth:.0%} of the bound) | decode batch 32: {batched:.0f} tok/s aggregate")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def warm_up_gpu(seconds: float = 3.0):
    """Run large matrix products for a few seconds first: the first model timed otherwise ran 3-4x slower
    (clocks ramping up, lazy kernel loading), which a short warm-up generation did not hide."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        sync()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    correctness(torch.device("cuda"))
    warm_up_gpu()
    for name in args.shapes:
        speed(name, SHAPES[name], args.quick)


if __name__ == "__main__":
    main()
