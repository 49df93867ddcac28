"""GPU check and timings for model.py at real sizes, with random weights (no real weights travel).

    python bench/gpu.py                 # Llama-3-8B and Mistral-7B shapes, bf16
    python bench/gpu.py --quick         # smaller runs

1. Correctness on the GPU: a tiny random Llama in fp32 against transformers on the same device (when
   transformers is installed), and batched ragged generation against one prompt at a time.
2. Speed at real shapes in bf16: prefill, batch-1 decode and batched decode tok/s, with the bound that
   memory bandwidth sets for batch-1 decode (all weight bytes read once per token); decoding eager,
   with the torch.compile'd step the scripts use on a GPU, and with CUDA graphs (reduce-overhead).
Prints the card's name with every number.
"""

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as gen  # noqa: E402
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
    if torch.cuda.is_available():
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
            from tiny_models import tiny_hf_model  # tests/, put on sys.path above
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
        batched = gen.generate(ours, tok, prompts, max_new_tokens=12, batch_size=2)
        single = [gen.generate(ours, tok, [p], max_new_tokens=12).tokens[0] for p in prompts]
        print(f"continuous batching, ragged, greedy == one at a time (fp32, {device}): {batched.tokens == single}")
        for mode in (None, "reduce-overhead"):
            gen.compile_decode(mode=mode)
            compiled = gen.generate(ours, tok, prompts, max_new_tokens=12, batch_size=2)
            print(f"compiled decode step ({mode or 'default'}) greedy == eager (fp32, {device}): {compiled.tokens == batched.tokens}")
        gen.use_eager_decode()


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
    gen.generate(model, NoTokenizer(), prompts, max_new_tokens=new_tokens, batch_size=batch)  # warm-up (and compilation)
    sync()
    start = time.perf_counter()
    gen.generate(model, NoTokenizer(), prompts, max_new_tokens=new_tokens, batch_size=batch)
    sync()
    return batch * new_tokens / (time.perf_counter() - start)


def speed(name, config, quick, compile_modes=("default", "reduce-overhead")):
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
    print(f"== {name} shapes, bf16, random weights, {card}")
    print(f"weights {weight_bytes / 1e9:.1f} GB; copy bandwidth {bandwidth / 1e12:.2f} TB/s; batch-1 decode bound "
          f"{bandwidth / weight_bytes:.0f} tok/s; prefill 1x512: {prefill_tps:,.0f} tok/s")
    # Eager decoding, then the torch.compile'd step that evaluate.py / adapt.py / train.py use on a GPU
    # (generate.compile_decode), then with CUDA graphs; each warmed up (and compiled) at the timed shapes.
    for mode in ("eager", *compile_modes):
        gen.use_eager_decode()
        if mode != "eager":
            gen.compile_decode(mode=None if mode == "default" else mode)
        start = time.perf_counter()
        single = time_generate(model, 1, 32, 64 if quick else 128)
        batched = time_generate(model, 32, 32, 64 if quick else 256)
        print(f"decode {mode:>15}: batch 1 {single:.1f} tok/s ({single * weight_bytes / bandwidth:.0%} of the bound) | "
              f"batch 32 {batched:.0f} tok/s aggregate | {time.perf_counter() - start:.0f} s with warm-up and compilation")
    gen.use_eager_decode()
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


def attention_probe(lengths=range(33, 65), batch=1):
    """Time one decode-shaped attention call (Llama-3-8B heads, a boolean mask, growing key length) twice
    over the same lengths: the first pass meets each shape for the first time. If the first pass is much
    slower under the default backends but not with cuDNN attention left out, per-shape plan building
    (cuDNN SDPA) explains why the first model timed in a run decoded 3-4x slower than later ones with
    the same attention shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def one_pass(length_offset):
        times = []
        for n in lengths:
            q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, 8, n + length_offset, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            mask = torch.ones(batch, 1, 1, n + length_offset, dtype=torch.bool, device="cuda")
            sync()
            start = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            sync()
            times.append(time.perf_counter() - start)
        return 1e3 * sum(times) / len(times)

    variants = {"default backends": None,
                "no cuDNN (flash, efficient, math)": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}
    for i, (label, backends) in enumerate(variants.items()):  # each variant on key lengths not met before
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            first, again = one_pass(i * 1000), one_pass(i * 1000)
        print(f"attention probe, {label}: new shapes {first:.2f} ms per call, same shapes again {again:.2f} ms")


def svf_step(name, config, batch=8, seq=256, repeats=5, device="cuda", dtype=torch.bfloat16):
    """Forward+backward of one batch with SVF on the MLP matrices against the frozen base model's
    (backward through every layer to the embeddings, no weight gradients). The factors are random
    orthonormal matrices of the right shapes, not a real SVD: the cost of a step does not depend on
    the values, and 96 fp32 SVDs of 4096x14336 would spend the device time on a one-off."""
    import svf as svf_lib

    device = torch.device(device)
    model = random_model(config, device, dtype)

    def random_factors(model, names, cache=True, progress=True):
        factors = {}
        for n in names:
            out_features, in_features = model.get_submodule(n).weight.shape
            r = min(out_features, in_features)
            U = torch.linalg.qr(torch.randn(out_features, r, device=device))[0].to(dtype)
            Vh = torch.linalg.qr(torch.randn(in_features, r, device=device))[0].T.contiguous().to(dtype)
            factors[n] = (U, torch.rand(r, device=device).sort(descending=True).values, Vh)
        return factors

    svf_lib.decompose = random_factors
    adapter = svf_lib.SVF(model, targets="mlp", parametrization="mask", progress=False)
    tokens = torch.randint(0, config["vocab_size"], (batch, seq), device=device)

    def step():
        loss = model(tokens).logsumexp(-1).mean()  # any scalar of the logits: the cost is the same
        loss.backward()

    def timed(mode):
        times = []
        for i in range(repeats + 1):
            with adapter.mode(mode):
                for p in adapter.parameters():
                    p.requires_grad_(mode == "train")
                model.embed.weight.requires_grad_(mode == "disabled")  # the base step still runs a full backward
                sync()
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
                for p in adapter.parameters():
                    p.grad = None
        model.embed.weight.requires_grad_(False)
        return sorted(times[1:])[len(times[1:]) // 2]

    base, svf_time = timed("disabled"), timed("train")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"== SVF training step, {name} shapes, {dtype}, batch {batch} x {seq}, {card}")
    print(f"base fwd+bwd {base * 1e3:.0f} ms | SVF (mask, MLP, factored) fwd+bwd {svf_time * 1e3:.0f} ms | "
          f"ratio {svf_time / base:.2f}x | {adapter.num_parameters():,} trainable" +
          (f" | peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--no-svf", action="store_true", help="skip the SVF training-step timing")
    parser.add_argument("--compile-modes", nargs="*", default=["default", "reduce-overhead"],
                        help="torch.compile modes of the decode step to time besides eager (none: eager only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    correctness(torch.device("cuda"))
    attention_probe()
    warm_up_gpu()
    for name in args.shapes:
        speed(name, SHAPES[name], args.quick, args.compile_modes)
    if not args.no_svf:
        svf_step(args.shapes[0], SHAPES[args.shapes[0]])


if __name__ == "__main__":
    main()
