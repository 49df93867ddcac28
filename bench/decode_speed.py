"""Generation speed: generate.generate against transformers' generate, same model, dtype, threads and prompts.

    python bench/decode_speed.py                      # batch 1 x 128 tokens and 32 prompts x 256 tokens
    python bench/decode_speed.py --batch 8 --batch-tokens 64
    python bench/decode_speed.py --compiled           # also generate.py with its torch.compile'd decode step

Both sides generate exactly the requested number of tokens (EOS is ignored), greedy: the raw decode
speed at one dtype. What RL and evaluation see (real prompts, EOS honoured, fp32 and bf16) is
bench/rollout.py. Also printed: the
weight bytes one decode step must read, the machine's measured memory bandwidth, and the tok/s that
bandwidth allows at batch 1 (the ceiling no implementation beats on this machine).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import generate as gen  # noqa: E402
import model as m  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a Python function that reverses a string.",
    "Explain photosynthesis in one paragraph.", "How many legs does a spider have?",
    "Give three tips for learning a new language.", "What is 17 times 23?",
    "Describe the water cycle.", "Why is the sky blue?",
]


def memory_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Bytes per second of a large read (a sum over a tensor far bigger than the caches)."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return n_bytes * repeats / (time.perf_counter() - start)


def decode_step_bytes(model) -> int:
    """Weight bytes read per decode step: every matrix once; the embedding table only through the output
    projection (a lookup reads one row), and once even when the two are tied."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "embed.weight" and not model.args.tie_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(n)]


def time_ours(model, tokenizer, prompts, new_tokens):
    tokenizer.eos_ids = []  # fixed length: never stop early
    start = time.perf_counter()
    out = gen.generate(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=len(prompts))
    seconds = time.perf_counter() - start
    assert all(len(t) == new_tokens for t in out.tokens)
    return len(prompts) * new_tokens / seconds


def left_padded(prompts, pad_id):
    """Token prompts as transformers' generate takes a batch: left-padded ids and their attention mask (B, T)."""
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    return ids, mask


def time_transformers(hf_model, prompts, new_tokens, pad_id):
    ids, mask = left_padded(prompts, pad_id)
    longest = ids.shape[1]
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=pad_id)
    seconds = time.perf_counter() - start
    assert out.shape[1] == longest + new_tokens
    return len(prompts) * new_tokens / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=m.DEFAULT_MODEL)
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compiled", action="store_true",
                        help="also time the compiled decode step (generate.compile_decode), warmed up "
                             "and compiled at the timed shapes first")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    threads = common.set_threads(args.threads)
    folder = common.resolve(args.model)
    model, tokenizer = m.load(folder, dtype=torch.float32, device="cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_id
    print(f"model {folder.name}, fp32, cpu, torch threads {threads}, torch {torch.__version__}")

    # Warm both up (allocator, thread pools) on a short run.
    time_ours(model, tokenizer, prompts_for(tokenizer, 2), 8)
    time_transformers(hf_model, prompts_for(tokenizer, 2), 8, pad_id)

    rows = []
    for label, n, new in [("batch 1", 1, args.single_tokens), (f"batch {args.batch}", args.batch, args.batch_tokens)]:
        prompts = prompts_for(tokenizer, n)
        ours = time_ours(model, tokenizer, prompts, new)
        theirs = time_transformers(hf_model, prompts, new, pad_id)
        compiled = None
        if args.compiled:
            gen.compile_decode()
            time_ours(model, tokenizer, prompts, new)  # compiles for these shapes
            compiled = time_ours(model, tokenizer, prompts, new)
            gen.use_eager_decode()
        rows.append((f"{label} x {new} new tokens", ours, theirs, compiled))

    step_bytes = decode_step_bytes(model)
    bandwidth = memory_bandwidth()
    print()
    extra = " model.py compiled tok/s | compiled / eager |" if args.compiled else ""
    print("| run | model.py tok/s | transformers tok/s | ratio |" + extra)
    print("|---|---:|---:|---:|" + ("---:|---:|" if args.compiled else ""))
    for label, ours, theirs, compiled in rows:
        more = f" {compiled:.1f} | {compiled / ours:.2f}x |" if compiled else ""
        print(f"| {label} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |" + more)
    print()
    print(f"weight bytes per decode step: {step_bytes / 1e6:.0f} MB; measured read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"batch-1 ceiling {bandwidth / step_bytes:.1f} tok/s (model.py reaches {rows[0][1] * step_bytes / bandwidth:.0%} of it)")


if __name__ == "__main__":
    main()
