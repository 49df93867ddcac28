"""The training forward+backward of a group-rollout batch: replies packed after their shared prompt
(reinforce.pack_replies) against each reply in its own row after a copy of its prompt, on the same
replies, in one process.

The unpacked baseline is the same function on the same batch with the replies interleaved across
prompts (p1 r1, p2 r1, p1 r2, ...): pack_replies only shares a prompt between consecutive replies, so
every row then holds one prompt and one reply. The loss, logp and gradients are the same either way
(tests/test_reinforce.py checks it); only the work differs.

    python bench/train_step.py --threads 2                    # ARC-Easy prompts, 8 replies of 8 tokens
    python bench/train_step.py --samples 4 --reply-tokens 64 --task gsm8k
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import model as m  # noqa: E402
import reinforce  # noqa: E402
import svf as svf_lib  # noqa: E402
import tasks  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=m.DEFAULT_MODEL)
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts in the micro-batch")
    parser.add_argument("--samples", type=int, default=8, help="replies per prompt, K")
    parser.add_argument("--reply-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = m.load(args.model, device="cpu")
    dtype = model.embed.weight.dtype
    svf = svf_lib.SVF(model, targets="mlp", parametrization="mask", progress=False)
    task = tasks.get(args.task)
    examples = task.load("train")[: args.prompts]
    prompts = tasks.prompt_tokens(tokenizer, task, examples)
    generator = torch.Generator().manual_seed(0)
    replies = [[torch.randint(100, 10000, (args.reply_tokens,), generator=generator).tolist()
                for _ in range(args.samples)] for _ in prompts]
    grouped = [(p, r) for p, rs in zip(prompts, replies) for r in rs]  # K consecutive replies per prompt
    interleaved = [(prompts[i], replies[i][j]) for j in range(args.samples) for i in range(len(prompts))]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step(batch):
        start = time.perf_counter()
        with autocast:
            logp, _, _ = reinforce.completion_logprobs(model, [p for p, _ in batch], [r for _, r in batch],
                                                       with_base=False, svf=svf)
        logp.sum().backward()
        for z in svf.parameters():
            z.grad = None
        return time.perf_counter() - start

    times = {"packed": [], "unpacked": []}
    step(grouped), step(interleaved)  # warm-up
    for _ in range(args.repeats):  # alternate, so a slower moment of the machine falls on both
        times["packed"].append(step(grouped))
        times["unpacked"].append(step(interleaved))
    tokens_unpacked = sum(len(p) + len(r) for p, r in grouped)
    tokens_packed = sum(len(p) + sum(map(len, rs)) for p, rs in zip(prompts, replies))
    print(f"{len(prompts)} prompts of {statistics.mean(map(len, prompts)):.0f} tokens x {args.samples} replies of "
          f"{args.reply_tokens} tokens, weights {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, tokens in (("unpacked", tokens_unpacked), ("packed", tokens_packed)):
        print(f"  {name:9s} {tokens:6d} tokens  {statistics.median(times[name]):.3f} s")
    print(f"  packed is {statistics.median(times['unpacked']) / statistics.median(times['packed']):.2f}x as fast")


if __name__ == "__main__":
    main()
