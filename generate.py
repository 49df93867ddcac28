"""Generation: sampling, prefill, the decode step, and generate(), the one entry point that evaluation,
RL rollouts, both passes of adapt.py and the few-shot search call.

generate() keeps `batch_size` rows busy (continuous batching). Every row of the KV cache holds one
prompt at its own positions (model.KVCache), so prompts of any lengths share a batch with no padding
in the cache. When a row ends (EOS, a stop string, its token budget) it leaves at once and the next
waiting prompt is prefilled into its place; when none is waiting, the last row moves into the hole
and the batch shrinks. No decode step is spent on a finished row, which matters because replies are
ragged: sampled ARC-Easy replies averaged 18 tokens of a 64-token budget, and a static batch runs to
its longest row.

What a row generates does not depend on its batch: with greedy decoding each reply is the one the
prompt would get alone (up to floating-point rounding, which differs between matrix shapes).

    python generate.py --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import model as m
from tokenizer import Tokenizer


@dataclass
class Generation:
    """What generate() returns for each prompt, in prompt order."""

    texts: list[str]  # decoded reply, cut before EOS or the stop string
    tokens: list[list[int]]  # generated ids, including the EOS token if one was produced
    finish: list[str]  # "eos", "stop" or "length"
    logprobs: list[torch.Tensor] | None = None  # log p(token) under the model (temperature 1) per generated token
    n_generated: int = 0  # tokens produced in all, for tok/s


# Temperatures below the smallest normal fp32 number (1.2e-38) are greedy: in fp32 such a t is a denormal
# or 0, and dividing by it gives inf or NaN. Sampling at a t this small is greedy anyway: a token whose logit
# is d below the best has relative probability exp(-d / t), which fp32 rounds to 0 once d / t > 104, i.e.
# for any d above 1.3e-36, and logits that differ at all differ by far more.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


def sample_next(logits, temperature: float, top_p: float, generator):
    """(B, vocab) logits -> (B,) tokens. temperature 0 (or below GREEDY_BELOW) is greedy."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    # Subtracting each row's largest logit first keeps the scaled logits <= 0 with the best exactly 0, so a
    # small temperature sends the others to -inf (probability 0) rather than overflowing to inf - inf = NaN.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        return order.gather(-1, draw(sorted_probs.masked_fill(outside, 0.0), generator)).squeeze(-1)
    return draw(probs, generator).squeeze(-1)


def draw(weights, generator):
    """(B, n) non-negative weights -> (B, 1) indices drawn in proportion to them, by inverting each row's
    cumulative sum at one uniform number. One random number per row: torch.multinomial draws one per
    vocabulary entry, and was a quarter of a sampled decode step on a CPU."""
    cdf = weights.double().cumsum(dim=-1)  # fp64: no rounding drift over a 100k-token vocabulary
    u = torch.rand(len(weights), 1, generator=generator, dtype=torch.float64, device=weights.device)
    # The first index whose cumulative weight exceeds u·total: an entry of weight 0 is never drawn.
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=weights.shape[-1] - 1)


def prefill(model, prompts: list[list[int]], rows: torch.Tensor, pad_id: int):
    """Whole prompts into the cache rows `rows` (B,), right-padded to the longest; logits for each
    prompt's first generated token (B, vocab)."""
    device = rows.device
    tokens = torch.full((len(prompts), max(map(len, prompts))), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    return model.prefill(tokens.to(device), lengths, rows)


def decode_one_token(model, tokens, positions, n_keys: int):
    """tokens (B,) of cache rows 0..B-1 at their positions (B,) -> logits for the next tokens (B, vocab)."""
    return model.decode(tokens, positions, n_keys)


# A compiled decode step (compile_decode) needs fixed shapes: every row of the cache runs, over the
# whole cache, and cache lengths are rounded up to a multiple of CACHE_ROUND (few shapes to compile).
compiled_decode = None
CACHE_ROUND = 256


def compile_decode(mode: str | None = None):
    """From now on generate() decodes with a torch.compile'd step, compiled once per batch size and cache
    length. mode: torch.compile's ("reduce-overhead" adds CUDA graphs). Needs a compiler toolchain
    (Triton on a GPU, a C++ compiler on a CPU)."""
    global compiled_decode
    compiled_decode = torch.compile(decode_one_token, dynamic=False, mode=mode)


def use_eager_decode():
    global compiled_decode
    compiled_decode = None


@torch.inference_mode()
def generate(
    model: m.Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 256,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    return_logprobs: bool = False,
    progress: bool = False,
    desc: str = "generating",
) -> Generation:
    """Replies for any number of token prompts, at most batch_size rows at a time (continuous batching).

    A row stops at an EOS token, when its text contains a stop string (cut before it), or after
    max_new_tokens (fewer when the prompt nearly fills the model's context). Prompts enter in order, so
    a seeded sampling run gives the same replies each time (for the same batch_size).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty token prompts")
    device = model.embed.weight.device
    budget = [max(min(max_new_tokens, model.args.max_seq_len - len(p)), 0) for p in prompts]
    n_rows = min(batch_size, len(prompts))
    cache_len = max(len(p) + b for p, b in zip(prompts, budget))
    step = compiled_decode
    if step is not None:
        cache_len = max(min(-(-cache_len // CACHE_ROUND) * CACHE_ROUND, model.args.max_seq_len), cache_len)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    eos = set(tokenizer.eos_ids)

    replies: list[list[int]] = [[] for _ in prompts]
    reply_logprobs: list[list[float]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    cut: list[int | None] = [None] * len(prompts)  # characters kept, for a reply stopped by a stop string
    waiting = deque(i for i in range(len(prompts)) if budget[i] > 0)
    for i in range(len(prompts)):
        if budget[i] == 0:
            finish[i] = "length"  # the prompt fills the context: nothing can be generated
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    bar.update(len(prompts) - len(waiting))

    # The active rows: row r of the cache holds prompt row_prompt[r], whose next token goes to slot
    # position[r]; logits (n_active, vocab) predict each row's next token.
    row_prompt: list[int] = []
    position: list[int] = []
    logits = None
    repeats = Repeats(prompts)
    model.setup_cache(n_rows, cache_len)
    try:
        while waiting or row_prompt:
            # Fill the free rows with waiting prompts, all in one prefill.
            if waiting and len(row_prompt) < n_rows:
                entering = [waiting.popleft() for _ in range(min(n_rows - len(row_prompt), len(waiting)))]
                new_logits = admit(model, prompts, entering, row_prompt, repeats, tokenizer.pad_id)
                logits = new_logits if logits is None else torch.cat([logits, new_logits])
                position += [len(prompts[i]) for i in entering]

            tokens = sample_next(logits, temperature, top_p, generator)  # (n_active,)
            if return_logprobs:
                chosen = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
                for r, value in enumerate(chosen.tolist()):
                    reply_logprobs[row_prompt[r]].append(value)
            # The host decides which rows end: one small transfer per step (the price of refilling rows).
            ended = []
            for r, token in enumerate(tokens.tolist()):
                i = row_prompt[r]
                replies[i].append(token)
                if token in eos:
                    finish[i] = "eos"
                elif stop and _stop_string_cut(tokenizer, replies[i], stop, cut, i):
                    finish[i] = "stop"
                elif len(replies[i]) >= budget[i]:
                    finish[i] = "length"
                if finish[i] is not None:
                    ended.append(r)

            # Ended rows leave; the last row moves into each hole, so the active rows stay 0..n-1.
            keep = list(range(len(row_prompt)))
            for r in reversed(ended):
                last = len(keep) - 1
                if r != last:
                    model.copy_cache_row(last, r, position[last])
                    keep[r], row_prompt[r], position[r] = keep[last], row_prompt[last], position[last]
                keep.pop(), row_prompt.pop(), position.pop()
            bar.update(len(ended))
            if not row_prompt:
                logits = None
                continue
            if ended:
                tokens = tokens[torch.tensor(keep, device=device)]

            # One decode step for the rows that go on.
            positions = torch.tensor(position, device=device)
            if step is None:
                logits = decode_one_token(model, tokens, positions, max(position) + 1)
            else:  # fixed shapes: all n_rows rows (the idle ones compute unused logits), the whole cache
                n_active = len(row_prompt)
                fill = n_rows - n_active
                tokens = torch.cat([tokens, tokens.new_full((fill,), tokenizer.pad_id)])
                positions = torch.cat([positions, positions.new_zeros(fill)])
                logits = step(model, tokens, positions, cache_len)[:n_active]
            position = [p + 1 for p in position]
    finally:
        model.clear_cache()
        bar.close()

    texts = []
    for i, reply in enumerate(replies):
        if finish[i] == "eos":
            texts.append(tokenizer.decode(reply[:-1]))
        elif finish[i] == "stop":
            texts.append(tokenizer.decode(reply)[: cut[i]])
        else:
            texts.append(tokenizer.decode(reply))
    logprobs = [torch.tensor(lp, dtype=torch.float32) for lp in reply_logprobs] if return_logprobs else None
    return Generation(texts, replies, finish, logprobs, sum(map(len, replies)))


class Repeats:
    """A prompt given several times (K samples of one prompt, as group rollouts ask) is prefilled once:
    later copies take the cache slots of a row that holds it and the logits its prefill gave. The logits
    are kept while copies of the prompt are still to come."""

    def __init__(self, prompts):
        self.keys = [tuple(p) for p in prompts]
        self.to_come = Counter(self.keys)
        self.logits: dict[tuple, torch.Tensor] = {}

    def entered(self, i: int, logits: torch.Tensor | None = None):
        key = self.keys[i]
        self.to_come[key] -= 1
        if logits is not None and self.to_come[key] > 0:
            self.logits[key] = logits
        if self.to_come[key] == 0:
            self.logits.pop(key, None)


def admit(model, prompts, entering: list[int], row_prompt: list[int], repeats: Repeats, pad_id: int):
    """Put the prompts `entering` into the next free cache rows (appended to row_prompt); returns the
    logits for their first tokens (len(entering), vocab). One prefill for the prompts no row holds yet;
    a repeat of a prompt some row holds copies that row's cache slots."""
    device = model.embed.weight.device
    holder = {repeats.keys[i]: r for r, i in enumerate(row_prompt)}  # a row holding each prompt now
    first_row = len(row_prompt)
    to_prefill = {}  # prompt -> its row, for prompts no row holds
    for r, i in enumerate(entering, first_row):
        key = repeats.keys[i]
        if key not in holder and key not in to_prefill:
            to_prefill[key] = r
    row_prompt += entering
    fresh = {}
    if to_prefill:
        rows = list(to_prefill.values())
        out = prefill(model, [prompts[row_prompt[r]] for r in rows], torch.tensor(rows, device=device), pad_id)
        fresh = dict(zip(rows, out))
    logits = []
    for r, i in enumerate(entering, first_row):
        key = repeats.keys[i]
        if r in fresh:
            logits.append(fresh[r])
            repeats.entered(i, fresh[r])
        else:
            source = holder.get(key, to_prefill.get(key))
            model.copy_cache_row(source, r, len(prompts[i]))
            logits.append(repeats.logits[key])  # kept when its first row entered, a copy being still to come
            repeats.entered(i)
    return torch.stack(logits)


def _stop_string_cut(tokenizer, reply: list[int], stop: list[str], cut: list, i: int) -> bool:
    """Whether the reply's text now holds a stop string; if so, remember where its text is cut."""
    text = tokenizer.decode(reply)
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        cut[i] = min(hits)
    return bool(hits)


def main():
    parser = argparse.ArgumentParser(description="Talk to a model: one prompt in, the reply and tok/s out.")
    parser.add_argument("--model", default=m.DEFAULT_MODEL, help="local Hugging Face folder or hub id")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--system", default=None, help="system message (default: the chat template's own)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: 0 < top-p <= 1 (1 keeps every token)")
    parser.add_argument("--seed", type=common.seed, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=common.DTYPES, default="auto", help=common.DTYPE_HELP)
    parser.add_argument("--threads", type=common.thread_count, default=None, help="torch CPU threads (default: free cores)")
    args = parser.parse_args()
    # "nan" and "inf" parse as floats; a NaN fails every comparison, so these are written to be false for it.
    if not (0 <= args.temperature < math.inf):
        parser.error(f"--temperature {args.temperature} is not a finite number >= 0 (0 is greedy)")
    if not (0 < args.top_p <= 1):
        parser.error(f"--top-p {args.top_p} is outside (0, 1]")
    threads = common.set_threads(args.threads)
    print(f"[generate] {args.model}, threads {threads}", file=sys.stderr)

    model, tokenizer = m.load(args.model, dtype=common.DTYPES[args.dtype], device=args.device, probe_rows=1)
    if args.raw:
        prompt = tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.encode_chat(messages)
    start = time.perf_counter()
    result = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    seconds = time.perf_counter() - start
    print(result.texts[0])
    print(f"[generate] {result.n_generated} tokens in {seconds:.2f} s, {result.n_generated / seconds:.1f} tok/s "
          f"({model.embed.weight.dtype}, {model.embed.weight.device})", file=sys.stderr)


if __name__ == "__main__":
    main()
