"""Speed and correctness at the paper's scale on a GPU, with random weights (no real weights travel).

    python bench/gpu.py                                      # every part, Llama-3-8B shapes, bf16
    python bench/gpu.py --parts decode rl --quick            # some parts, shorter workloads
    python bench/gpu.py --device cpu --shapes tiny --quick   # a smoke run of every part on a CPU

Parts (each line printed names the device):
  check   correctness on the device: a tiny random Llama in fp32 against transformers; batched
          generation with rows ending and refilled against one prompt at a time; every decode setting
          (static shapes, CUDA graphs, compiled, compiled + graphs), and overlap on and off, token for
          token against the plain eager step.
  decode  useful tok/s of three workloads (the paper's RL batch: 256 prompts x 128 tokens -> 512 new at
          batch 256; 32 x 32 -> 256 at batch 32; 1 x 32 -> 128) for each decode setting and for
          transformers' generate (eager, sdpa); the batch-1 share of the memory-bandwidth bound; each
          setting's first run (compilation, graph capture) and how many shapes it captured.
  rl      one paper-preset RL step (train.py's PAPER settings): SVD of the MLP matrices on the device
          (--svd-matrices of them timed, the others given random factors), rollouts of 256 prompts x up to
          512 tokens with z merged (random weights never emit EOS: every reply is 512 tokens, the worst
          case), the packed policy-gradient update with the KL term (reinforce.train_step, --kl), AdamW;
          seconds per phase and peak memory.
  svf     the SVF training step (forward + backward, mask on the MLP matrices, factored) eager and
          torch.compile'd, against the frozen model's forward + backward.
  attention  per-shape cost of attention at the model's head shapes: each call on a shape met for the
          first time against the same shapes again, for the decode step (model.decode_attention against
          SDPA with a boolean mask, keys growing by one) and the packed training forward (SDPA with a
          boolean mask), under torch's default SDPA backends and with cuDNN attention left out. A first
          pass much slower than the second means plans built per shape.
"""

import argparse
import contextlib
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the transformers reference of the check
import generate as gen  # noqa: E402
import model as m  # noqa: E402
import reinforce  # noqa: E402
import svf as svf_lib  # noqa: E402
import train  # noqa: E402

SHAPES = {
    "Llama-3-8B": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009),
    "Mistral-7B": dict(architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                       rms_norm_eps=1e-5, max_position_embeddings=32768, rope_theta=1000000.0,
                       sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "tiny": dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
# (name, prompts, prompt tokens, new tokens, batch); --quick divides prompts and tokens by 4
WORKLOADS = [("RL batch", 256, 128, 512, 256), ("batch 32", 32, 32, 256, 32), ("batch 1", 1, 32, 128, 1)]
SETTINGS = {  # name -> generate.configure_decode arguments
    "eager": {}, "static": dict(static=True), "graphs": dict(graphs=True), "compiled": dict(compile=True),
    "compiled+graphs": dict(compile=True, graphs=True),
}


class NoTokenizer:
    """Enough of a tokenizer for timing random models: never stops, decodes to nothing."""
    eos_ids, pad_id = [], 0

    def decode(self, ids):
        return ""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def peak_memory(device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a on a CPU"


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


def random_prompts(n, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


# ---- check


def check(device, settings):
    name = device_name(device)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        try:
            from tiny_models import tiny_hf_model
            hf = tiny_hf_model("llama", folder).to(device)
        except ImportError as e:
            print(f"check: transformers not available ({e}); skipping the parity check")
            return
        ours, tokenizer = m.load(folder, dtype=torch.float32, device=device)
        tokens = torch.randint(3, 96, (2, 24), device=device)
        with torch.no_grad():
            diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
        print(f"check: tiny Llama fp32 logits vs transformers on {name}: max |diff| {diff:.2e}")
        prompts = [random_prompts(1, n, 96, seed=i)[0] for i, n in enumerate((3, 11, 7, 1, 6, 9, 2))]
        gen.use_eager_decode()
        tokenizer.eos_ids = []
        free = gen.generate(ours, tokenizer, prompts, max_new_tokens=24)
        tokenizer.eos_ids = [free.tokens[0][9]]  # rows end at different steps
        single = [gen.generate(ours, tokenizer, [p], max_new_tokens=24).tokens[0] for p in prompts]
        plain = gen.generate(ours, tokenizer, prompts, max_new_tokens=24, batch_size=3, return_logprobs=True, overlap=False)
        reference, reference_logp = plain.tokens, plain.logprobs
        lengths = sorted({len(t) for t in reference})
        print(f"check: batched (3 rows, 7 prompts, reply lengths {lengths}) == one prompt at a time: {reference == single}")
        for setting in dict.fromkeys(["eager", *settings]):
            if setting not in SETTINGS or (device.type != "cuda" and "graphs" in setting):
                continue
            gen.configure_decode(**SETTINGS[setting])
            for overlap in (False, True):
                if setting == "eager" and not overlap:
                    continue
                out = gen.generate(ours, tokenizer, prompts, max_new_tokens=24, batch_size=3, return_logprobs=True,
                                   overlap=overlap)
                worst = max(((a - b).abs().max().item() for a, b in zip(out.logprobs, reference_logp) if len(a) == len(b)),
                            default=float("nan"))
                print(f"check: decode {setting}, overlap {'on' if overlap else 'off'} == eager, overlap off (fp32, {name}): "
                      f"{out.tokens == reference}; max |log p diff| {worst:.1e}")
        gen.use_eager_decode()


# ---- decode


def copy_bandwidth(device, n_bytes=2 * 2**30) -> float:
    x = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 2 * n_bytes * 5 / (time.perf_counter() - start)  # read + write


def warm_up_device(device, seconds: float = 3.0):
    """Large matrix products for a few seconds first: the first model timed once ran 3-4x slower."""
    if device.type != "cuda":
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        sync(device)


class Captures:
    """Counts the CUDA graphs the static steps capture, and their seconds, while timing."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        real = gen.StaticStep._capture

        def counted(step, rows, n_keys):
            start = time.perf_counter()
            graph = real(step, rows, n_keys)
            self.count += 1
            self.seconds += time.perf_counter() - start
            return graph

        gen.StaticStep._capture = counted


def time_ours(model, prompts, new_tokens, batch, device, captures):
    """(first run s, timed run s, graphs captured in the timed run, their seconds): the first run meets
    every shape (compiles) at the timed ones; graphs are captured anew in each generate() call."""
    times = []
    for _ in range(2):
        captures.count, captures.seconds = 0, 0.0
        sync(device)
        start = time.perf_counter()
        gen.generate(model, NoTokenizer(), prompts, max_new_tokens=new_tokens, batch_size=batch)
        sync(device)
        times.append(time.perf_counter() - start)
    return (*times, captures.count, captures.seconds)


def hf_model(config, device):
    import transformers

    hf_config = transformers.AutoConfig.for_model("llama" if "Llama" in config["architectures"][0] else "mistral",
                                                  **{k: v for k, v in config.items() if k != "architectures"})
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def time_hf(model, prompts, new_tokens, batch, device):
    """transformers' generate in static batches of the same size, exactly new_tokens each (no EOS)."""
    def run(tokens):
        for start in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[start:start + batch], device=device)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)

    times = []
    for tokens in (min(new_tokens, 16), new_tokens):  # a short warm-up: nothing to compile
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            run(tokens)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def decode(name, config, device, settings, quick, with_hf):
    card = device_name(device)
    scale = 4 if quick else 1
    workloads = [(w, max(n // scale, 1), p, t // scale, max(b // scale, 1)) for w, n, p, t, b in WORKLOADS]
    model = random_model(config, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    bound = bandwidth / weight_bytes
    print(f"== decode, {name} shapes, bf16, random weights, {card}: weights {weight_bytes / 1e9:.1f} GB, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, batch-1 bound {bound:.0f} tok/s")
    captures = Captures()
    results = {}
    for setting in settings:
        gen.configure_decode(**SETTINGS[setting])
        for workload, n, prompt_len, new_tokens, batch in workloads:
            prompts = random_prompts(n, prompt_len, config["vocab_size"])
            compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            first, timed, captured, capture_seconds = time_ours(model, prompts, new_tokens, batch, device, captures)
            results[(setting, workload)] = n * new_tokens / timed
            compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled_before
            print(f"ours {setting:>15} | {workload:>8} ({n} x {prompt_len} -> {new_tokens}, batch {batch}) | "
                  f"{results[(setting, workload)]:,.1f} tok/s" +
                  (f" ({results[(setting, workload)] / bound:.0%} of the bound)" if batch == 1 else "") +
                  f" | timed run {timed:.1f} s incl. {captured} graphs captured in {capture_seconds:.1f} s | first run "
                  f"{first:.1f} s incl. {compiled} compilations | {card}")
    gen.use_eager_decode()
    gen._compiled_steps.clear()
    torch._dynamo.reset()  # compiled code may hold the model: free its memory before transformers' copy
    del model
    if with_hf:
        try:
            hf = hf_model(config, device)
        except ImportError as e:
            print(f"transformers not available ({e}): no comparison")
            return results
        for workload, n, prompt_len, new_tokens, batch in workloads:
            prompts = random_prompts(n, prompt_len, config["vocab_size"])
            first, timed = time_hf(hf, prompts, new_tokens, batch, device)
            results[("hf", workload)] = n * new_tokens / timed
            print(f"transformers eager sdpa | {workload:>8} | {results[('hf', workload)]:,.1f} tok/s | {card}")
        del hf
        print(f"| setting | {' | '.join(w for w, *_ in workloads)} |")
        print(f"|---|{'---:|' * len(workloads)}")
        for setting in [*settings, "hf"]:
            cells = [f"{results[(setting, w)]:,.0f} ({results[(setting, w)] / results[('hf', w)]:.2f}x)"
                     for w, *_ in workloads]
            print(f"| {'transformers' if setting == 'hf' else 'ours ' + setting} | {' | '.join(cells)} |")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# ---- rl


def random_factors(out_features, in_features, device, dtype):
    """Factors of the SVD's shapes without computing one: a step costs the same whatever their values."""
    r = min(out_features, in_features)
    U = (torch.randn(out_features, r, device=device) / math.sqrt(out_features)).to(dtype)
    Vh = (torch.randn(r, in_features, device=device) / math.sqrt(in_features)).to(dtype)
    return U, torch.rand(r, device=device).sort(descending=True).values, Vh


def rl_step(name, config, device, quick, svd_matrices, kl, decode_setting):
    card = device_name(device)
    paper = train.PAPER
    scale = 4 if quick else 1
    prompts_n, prompt_len, new_tokens = paper.batch_size // scale, 128 // scale, 512 // scale
    gen_batch = paper.gen_batch // scale if quick else paper.gen_batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = random_model(config, device)
    names = svf_lib.target_names(model, paper.targets)
    timed = names[:svd_matrices]
    sync(device)
    start = time.perf_counter()
    factors = {}
    for n in timed:  # what svf.decompose does for each matrix
        U, S, Vh = torch.linalg.svd(model.get_submodule(n).weight.float(), full_matrices=False)
        factors[n] = (U.to(torch.bfloat16).contiguous(), S, Vh.to(torch.bfloat16).contiguous())
    sync(device)
    svd_seconds = time.perf_counter() - start
    for n in names[svd_matrices:]:
        factors[n] = random_factors(*model.get_submodule(n).weight.shape, device, torch.bfloat16)
    real_decompose = svf_lib.decompose
    svf_lib.decompose = lambda model, names, cache=True, progress=True: {n: factors[n] for n in names}
    try:
        adapter = svf_lib.SVF(model, targets=paper.targets, parametrization=paper.param, progress=False)
    finally:
        svf_lib.decompose = real_decompose
    factors = None  # the SVF layers hold them now
    per_matrix = svd_seconds / max(len(timed), 1)
    print(f"== RL step, {name} shapes, bf16, random weights, train.py's PAPER settings, {card}")
    print(f"SVD (fp32) of {len(timed)} of the {len(names)} {paper.targets.upper()} matrices: {svd_seconds:.1f} s, "
          f"{per_matrix:.2f} s each; all {len(names)} at that rate: {per_matrix * len(names):.0f} s (a one-off per model, "
          f"cached on disk) | {card}")

    optimizer, scheduler = reinforce.make_optimizer(adapter.parameters(), paper.lr, total_steps=10)
    prompts = random_prompts(prompts_n, prompt_len, config["vocab_size"])
    gen.configure_decode(**SETTINGS[decode_setting])
    phases = {}
    micro = paper.micro_batch
    for attempt in ("first", "timed"):  # the first step meets every shape (compiles, captures)
        sync(device)
        start = time.perf_counter()
        with adapter.merged():
            out = gen.generate(model, NoTokenizer(), prompts, max_new_tokens=new_tokens, batch_size=gen_batch)
        sync(device)
        rollout_seconds = time.perf_counter() - start
        rewards = torch.tensor([1.0 if i % 3 == 0 else -1.0 for i in range(prompts_n)])  # a reward is a number
        rollouts = reinforce.Rollouts(prompts, out.tokens, out.texts, [r > 0 for r in rewards.tolist()], rewards)
        start = time.perf_counter()
        stats, micro = update(model, adapter, rollouts, optimizer, scheduler, paper, kl, micro, device)
        sync(device)
        phases[attempt] = (rollout_seconds, time.perf_counter() - start, stats)
    gen.use_eager_decode()
    rollout_seconds, update_seconds, stats = phases["timed"]
    tokens = prompts_n * new_tokens
    print(f"rollouts: {prompts_n} prompts x {prompt_len} tokens -> {new_tokens} new each ({tokens:,} tokens), "
          f"{gen_batch} rows, decode {decode_setting}: {rollout_seconds:.1f} s, {tokens / rollout_seconds:,.0f} tok/s "
          f"(first step {phases['first'][0]:.1f} s) | {card}")
    print(f"update: packed policy gradient + KL (λ = {kl}) over {prompts_n} replies in micro-batches of "
          f"{micro}{'' if micro == paper.micro_batch else f' (the paper preset {paper.micro_batch} ran out of memory)'}, AdamW: {update_seconds:.1f} s (first step {phases['first'][1]:.1f} s); "
          f"kl {stats['kl']:.2e}, grad norm {stats['grad_norm']:.2e} | {card}")
    step = rollout_seconds + update_seconds
    print(f"one RL step: {step:.1f} s; peak memory {peak_memory(device)} | {card}")
    import tasks

    examples = len(tasks.get("gsm8k").load("train"))
    steps = math.ceil(examples / paper.batch_size)
    print(f"one epoch of train.py's GSM8K train split ({examples} examples, {steps} steps of {paper.batch_size}) at "
          f"this rate, every reply {new_tokens} tokens: {steps * step / 60:.0f} min, evaluations not included | {card}")
    adapter.remove()
    del model, adapter, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- attention


def attention_probe(config, device, quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    card = device_name(device)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    dtype = torch.bfloat16

    def timed(call, shapes):
        times = []
        for shape in shapes:
            inputs = call(shape, None)
            sync(device)
            start = time.perf_counter()
            call(shape, inputs)
            sync(device)
            times.append(time.perf_counter() - start)
        return 1e3 * sum(times) / len(times)

    def decode_inputs(batch, n):
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype)
        return q, k, torch.randn_like(k), torch.ones(batch, 1, 1, n, dtype=torch.bool, device=device)

    def sdpa_decode(shape, inputs):
        if inputs is None:
            return decode_inputs(*shape)
        q, k, v, mask = inputs
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def ours_decode(shape, inputs):
        if inputs is None:
            return decode_inputs(*shape)
        q, k, v, mask = inputs
        return m.decode_attention(q, k, v, mask)

    def packed(shape, inputs):  # the training forward: replies packed after their prompt, a boolean mask
        if inputs is None:
            batch, n = shape
            q = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
            k = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype)
            mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None].expand(batch, 1, n, n)
            return q, k, torch.randn_like(k), mask
        q, k, v, mask = inputs
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    steps = 8 if quick else 32
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    print(f"== attention per shape, {heads} heads / {kv_heads} key-value heads of {head_dim}, bf16, {card} "
          f"(ms per call: shapes met the first time / the same shapes again)")
    for offset, (label, backends) in enumerate((("default SDPA backends", None), ("cuDNN attention left out", no_cudnn))):
        if backends is not None and device.type != "cuda":
            continue
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            for name, call, shapes in (
                    ("decode, SDPA with a mask, batch 1", sdpa_decode, [(1, 100 + 500 * offset + i) for i in range(steps)]),
                    ("decode, SDPA with a mask, batch 32", sdpa_decode, [(32, 200 + 500 * offset + i) for i in range(steps)]),
                    ("decode, model.decode_attention, batch 32", ours_decode, [(32, 300 + 500 * offset + i) for i in range(steps)]),
                    ("training forward, packed mask, batch 4", packed, [(4, 600 + 64 * offset + 8 * i) for i in range(steps // 4)])):
                print(f"{label} | {name}: {timed(call, shapes):.2f} / {timed(call, shapes):.2f} | {card}")


def update(model, adapter, rollouts, optimizer, scheduler, paper, kl, micro, device):
    """reinforce.train_step at micro-batch `micro`, halved until it fits in memory; (stats, micro used)."""
    while True:
        try:
            return reinforce.train_step(model, adapter, rollouts, optimizer, scheduler, baseline=paper.baseline,
                                        kl_coef=kl, micro_batch=micro, clip=paper.clip), micro
        except torch.cuda.OutOfMemoryError:
            pass  # retried outside the except block: the traceback's frames hold the activations
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if micro == 1:
            raise SystemExit("update: out of memory at micro-batch 1")
        micro //= 2
        print(f"update: out of memory; again at micro-batch {micro}", flush=True)


# ---- svf


def svf_step(name, config, device, quick, batch=8, seq=256, repeats=5):
    """Forward+backward of one batch with SVF on the MLP matrices against the frozen base model's
    (backward through every layer to the embeddings, no weight gradients), the SVF forward eager and
    torch.compile'd."""
    card = device_name(device)
    if quick:
        batch, seq, repeats = 2, 64, 3
    model = random_model(config, device)
    real_decompose = svf_lib.decompose
    svf_lib.decompose = lambda model, names, cache=True, progress=True: {
        n: random_factors(*model.get_submodule(n).weight.shape, device, torch.bfloat16) for n in names}
    try:
        adapter = svf_lib.SVF(model, targets="mlp", parametrization="mask", progress=False)
    finally:
        svf_lib.decompose = real_decompose
    tokens = torch.randint(0, config["vocab_size"], (batch, seq), device=device)

    def timed(mode, use_compile=False):
        adapter.configure_forward(svf_lib.TRAINING_FORWARD, use_compile=use_compile)
        times = []
        for _ in range(repeats + 1):  # the first call compiles
            with adapter.mode(mode):
                for p in adapter.parameters():
                    p.requires_grad_(mode == "train")
                model.embed.weight.requires_grad_(mode == "disabled")  # the base step still runs a full backward
                sync(device)
                start = time.perf_counter()
                model(tokens).logsumexp(-1).mean().backward()  # any scalar of the logits: the cost is the same
                sync(device)
                times.append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
                for p in adapter.parameters():
                    p.grad = None
        model.embed.weight.requires_grad_(False)
        return sorted(times[1:])[len(times[1:]) // 2], times[0]

    base, _ = timed("disabled")
    eager, _ = timed("train")
    compiled, first = timed("train", use_compile=True)
    adapter.configure_forward(svf_lib.TRAINING_FORWARD, use_compile=False)
    print(f"== SVF training step, {name} shapes, bf16, batch {batch} x {seq}, {card}")
    print(f"base fwd+bwd {base * 1e3:.0f} ms | SVF (mask, MLP, {svf_lib.TRAINING_FORWARD}) eager {eager * 1e3:.0f} ms "
          f"({eager / base:.2f}x) | compiled {compiled * 1e3:.0f} ms ({compiled / base:.2f}x; first call {first:.0f} s) | "
          f"{adapter.num_parameters():,} trainable | peak memory {peak_memory(device)} | {card}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("check", "attention", "decode", "rl", "svf"),
                        default=["check", "attention", "decode", "rl", "svf"])
    parser.add_argument("--shapes", choices=list(SHAPES), default="Llama-3-8B")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a quarter of the prompts and tokens")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None,
                        help="decode settings to time (default: eager, graphs, compiled+graphs on a GPU; eager, static on a CPU)")
    parser.add_argument("--no-hf", action="store_true", help="do not time transformers' generate")
    parser.add_argument("--svd-matrices", type=int, default=4, help="MLP matrices whose SVD is timed in the RL step")
    parser.add_argument("--kl", type=float, default=0.1, help="λ of the RL step (> 0: the base model's forward runs "
                        "in every micro-batch; the paper's default is 0)")
    parser.add_argument("--rl-decode", choices=list(SETTINGS), default=None,
                        help="decode setting of the RL step's rollouts (default: what train.py picks on the device)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a run cut off by its time limit keeps what it printed
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU here; --device cpu --shapes tiny runs a smoke test on the CPU")
    on_gpu = device.type == "cuda"
    settings = args.settings or (["eager", "graphs", "compiled+graphs"] if on_gpu else ["eager", "static"])
    if not on_gpu and any("graphs" in s for s in settings):
        sys.exit("bench/gpu.py: CUDA graphs need a GPU")
    rl_decode = args.rl_decode or ("compiled+graphs" if on_gpu else "eager")  # train.py's --compile auto
    print(f"torch {torch.__version__}, {device_name(device)}, shapes {args.shapes}")
    config = SHAPES[args.shapes]
    parts = {"check": lambda: check(device, settings),
             "attention": lambda: attention_probe(config, device, args.quick),
             "decode": lambda: decode(args.shapes, config, device, settings, args.quick, not args.no_hf),
             "rl": lambda: rl_step(args.shapes, config, device, args.quick, args.svd_matrices, args.kl, rl_decode),
             "svf": lambda: svf_step(args.shapes, config, device, args.quick)}
    failed = []
    for name in [p for p in parts if p in args.parts]:
        if name != "check":
            warm_up_device(device)
        start = time.perf_counter()
        try:  # a part that fails does not cost the parts after it
            parts[name]()
        except Exception:
            traceback.print_exc(file=sys.stdout)
            failed.append(name)
        print(f"[{name}] {'FAILED, ' if name in failed else ''}{time.perf_counter() - start:.0f} s | {device_name(device)}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if failed:
        sys.exit(f"bench/gpu.py: failed parts: {', '.join(failed)}")


if __name__ == "__main__":
    main()
