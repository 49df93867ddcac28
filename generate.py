"""Generation: sampling, prefill, the decode step, the step-wise Engine, and generate(), the one entry
point that evaluation, RL rollouts, both passes of adapt.py and the few-shot search call. serve.py
drives the same Engine one step at a time, adding requests as they arrive.

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
from dataclasses import dataclass, field

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
    lengths = common.to_device([len(p) for p in prompts], device)
    return model.prefill(common.to_device(tokens, device), lengths, rows)


def decode_one_token(model, tokens, positions, n_keys: int):
    """tokens (B,) of cache rows 0..B-1 at their positions (B,) -> logits for the next tokens (B, vocab)."""
    return model.decode(tokens, positions, n_keys)


# ---- How the decode step runs
#
# Eager (the default on a CPU): each step runs the active rows over the keys written so far, so its
# shapes change with every token and every row that ends. Static (configure_decode): the rows are padded
# up to one of a few batch sizes (batch_buckets) and the keys up to a multiple of KEY_BLOCK, so a run
# meets a bounded number of shapes; the step can then be torch.compile'd, and on a GPU each shape is
# captured once as a CUDA graph and replayed, which launches a whole step's kernels at once instead of
# one by one from Python (at batch 1 the launches, not the GPU, set the speed).


@dataclass(frozen=True)
class DecodeSettings:
    static: bool = False  # padded batch and keys (compile and graphs imply it)
    compile: bool = False  # torch.compile the step (Triton on a GPU, a C++ compiler on a CPU)
    graphs: bool = False  # capture each shape as a CUDA graph (GPU only)
    mode: str | None = None  # torch.compile's mode ("reduce-overhead": inductor's own CUDA graphs)

    def __post_init__(self):
        object.__setattr__(self, "static", self.static or self.compile or self.graphs)  # frozen: set once here


decode_settings = DecodeSettings()
KEY_BLOCK = 128  # a static step attends over the cache up to the next multiple of this
_compiled_steps: dict = {}


def configure_decode(compile: bool = False, graphs: bool = False, mode: str | None = None, static: bool = False):
    """How generate() and every Engine made afterwards run the decode step: eager (the defaults), or
    static shapes (static=True alone: eager at padded shapes), compiled and/or captured as CUDA graphs."""
    global decode_settings
    if graphs and not torch.cuda.is_available():
        raise ValueError("CUDA graphs need a CUDA GPU; on a CPU use compile=True or the eager step")
    decode_settings = DecodeSettings(static, compile, graphs, mode)


def setup_decode(compile: bool, device) -> str:
    """The scripts' choice (--compile): on a GPU, static steps captured as CUDA graphs, compiled unless
    --compile off; on a CPU eager, or compiled with --compile on. Returns a description."""
    on_gpu = torch.device(device).type == "cuda"
    configure_decode(compile=compile, graphs=on_gpu)
    kind = ("compiled" if compile else "eager") + (", CUDA graphs" if on_gpu else "")
    return f"decode step: {kind}" + (f" (static shapes: batch buckets, keys in blocks of {KEY_BLOCK})" if compile or on_gpu else "")


def compile_decode(mode: str | None = None):
    """From now on the decode step is torch.compile'd (static shapes). mode: torch.compile's."""
    configure_decode(compile=True, mode=mode)


def use_eager_decode():
    configure_decode()


def round_up(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them) >= n."""
    power = 1
    while power < n:
        if power * 3 // 2 >= n and power > 1:
            return power * 3 // 2
        power *= 2
    return power


def batch_buckets(batch_size: int) -> list[int]:
    """The batch sizes a static step runs: round_up's sizes below batch_size, and batch_size itself. A
    step pads its rows up to the next size, so it computes at most 1.5x the rows it needs (nano-vllm
    pads to 1, 2, 4, 8 and multiples of 16)."""
    return sorted({min(round_up(n), batch_size) for n in range(1, batch_size + 1)})


class StaticStep:
    """The decode steps of one Engine at static shapes: `shape` gives the padded batch and key count of
    a step, and `run` computes it from inputs copied into fixed buffers. With graphs, each shape is run
    once eagerly (which also compiles it), then captured as a CUDA graph, and replayed from then on; all
    graphs share one memory pool and write their logits into one buffer, so they cost little memory
    beyond the largest step. A run of generate() meets at most len(batch_buckets) x
    ceil(cache_len / KEY_BLOCK) shapes (`graphs` holds one per shape met). Graphs last one Engine (one
    generate() call): a graph reads the weight tensors it was captured with, and between calls the
    weights may be others (an RL step merges its z into new ones)."""

    def __init__(self, model: m.Transformer, batch_size: int, cache_len: int, settings: DecodeSettings):
        self.model, self.cache_len, self.settings = model, cache_len, settings
        self.sizes = batch_buckets(batch_size)
        device = model.embed.weight.device
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.step = decode_one_token
        if settings.compile:
            key = settings.mode
            if key not in _compiled_steps:  # one compiled function per mode: its compilations are reused
                _compiled_steps[key] = torch.compile(decode_one_token, mode=settings.mode, dynamic=True)
            self.step = _compiled_steps[key]
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if settings.graphs:
            self.logits = torch.empty(batch_size, model.args.vocab_size, dtype=torch.float32, device=device)
            self.pool = torch.cuda.graph_pool_handle()

    def shape(self, n_rows: int, n_keys: int) -> tuple[int, int]:
        rows = next(s for s in self.sizes if s >= n_rows)
        return rows, min(-(-n_keys // KEY_BLOCK) * KEY_BLOCK, self.cache_len)

    def run(self, tokens, positions, rows: int, n_keys: int):
        """Logits (len(tokens), vocab) of the active rows 0..n-1, computed as `rows` rows over n_keys keys;
        the padding rows are idle cache rows, whose slot 0 they overwrite (a row is prefilled before use)."""
        n = len(tokens)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.positions[n:rows].zero_()
        if not self.settings.graphs:
            return self.step(self.model, self.tokens[:rows], self.positions[:rows], n_keys)[:n]
        graph = self.graphs.get((rows, n_keys))
        if graph is None:
            graph = self.graphs[(rows, n_keys)] = self._capture(rows, n_keys)
        graph.replay()
        return self.logits[:n]

    def _capture(self, rows: int, n_keys: int):
        def step():
            self.logits[:rows].copy_(self.step(self.model, self.tokens[:rows], self.positions[:rows], n_keys))

        # The first run (which also compiles) outside the graph, on a side stream as torch.cuda.graphs asks;
        # it writes the same cache slots the replay then writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        return graph


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
    row_adapter=None,
    adapters: list[int] | None = None,
    overlap: bool | None = None,
) -> Generation:
    """Replies for any number of token prompts, at most batch_size rows at a time (continuous batching).

    A row stops at an EOS token, when its text contains a stop string (cut before it), or after
    max_new_tokens (fewer when the prompt nearly fills the model's context). Prompts enter in order, so
    a seeded sampling run gives the same replies each time (for the same batch_size). With a row_adapter
    (svf.RowAdapter), adapters[i] is the slot prompt i runs with. overlap: the Engine's (None: on a GPU).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty token prompts")
    device = model.embed.weight.device
    budget = [max(min(max_new_tokens, model.args.max_seq_len - len(p)), 0) for p in prompts]
    cache_len = max(len(p) + b for p, b in zip(prompts, budget))
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    adapters = adapters or [0] * len(prompts)
    sequences = [Sequence(p, b, temperature, top_p, generator, stop, a, return_logprobs)
                 for p, b, a in zip(prompts, budget, adapters)]
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    engine = Engine(model, tokenizer, min(batch_size, len(prompts)), cache_len, row_adapter, overlap=overlap)
    try:
        for seq in sequences:
            engine.add(seq)  # a prompt that fills the context ends at once, with an empty reply
        bar.update(sum(seq.finish is not None for seq in sequences))
        while engine.busy():
            bar.update(sum(seq.finish is not None for seq in engine.step()))
    finally:
        engine.close()
        bar.close()
    logprobs = [torch.tensor(s.logprobs, dtype=torch.float32) for s in sequences] if return_logprobs else None
    return Generation([s.text(tokenizer) for s in sequences], [s.tokens for s in sequences],
                      [s.finish for s in sequences], logprobs, sum(len(s.tokens) for s in sequences))


@dataclass(eq=False)
class Sequence:
    """One prompt being answered: how to generate its reply, and the reply so far. The engine fills in
    tokens, logprobs, finish and cut; a caller reads them after each step (streaming) or at the end."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None  # rows sharing one generator are sampled in one call
    stop: list[str] | None = None
    adapter: int = 0  # the row adapter's slot (what RowAdapter.add returned) this reply runs with; 0 is the base weights
    want_logprobs: bool = False
    tokens: list[int] = field(default_factory=list)  # generated ids, including the EOS token if one was produced
    logprobs: list[float] = field(default_factory=list)  # log p(token) at temperature 1, when want_logprobs
    finish: str | None = None  # "eos", "stop", "length" or "cancelled" once it has ended
    cut: int | None = None  # characters of the decoded reply kept, for a reply ended by a stop string

    def text(self, tokenizer: Tokenizer) -> str:
        """The reply's text, cut before EOS or the stop string."""
        if self.finish == "eos":
            return tokenizer.decode(self.tokens[:-1])
        text = tokenizer.decode(self.tokens)
        return text[: self.cut] if self.cut is not None else text


class Engine:
    """Continuous batching one step at a time. add() queues a sequence at any moment; each step() admits
    waiting sequences into free cache rows (one prefill), gives every active row one token, and lets
    the rows that ended leave. generate() drives it for evaluation and RL rollouts; serve.py drives it
    from a server thread, adding requests as they arrive and cancelling those whose client went away.

    The cache has batch_size rows of cache_len slots; rows 0..n-1 are the active ones, in step with
    `rows` (the sequence in each row) and `logits` (each row's prediction for its next token).
    row_adapter (svf.RowAdapter or None): each row runs with the weights of its sequence's slot, so
    sequences with different experts share a step. settings: how the decode step runs (decode_settings
    when None).

    On a GPU the host reads each step's sampled tokens once (it decides which rows end), and by default
    (overlap) the next decode step is launched before that read, for every row, so the GPU computes
    step N+1 while the host waits for and handles step N's tokens; a row that turns out to have ended
    wasted that one row-step. On a CPU, where nothing runs while the host waits, overlap is off."""

    def __init__(self, model: m.Transformer, tokenizer: Tokenizer, batch_size: int, cache_len: int,
                 row_adapter=None, settings: DecodeSettings | None = None, overlap: bool | None = None):
        self.model, self.batch_size, self.cache_len = model, batch_size, cache_len
        self.tokenizer, self.eos = tokenizer, set(tokenizer.eos_ids)
        self.row_adapter = row_adapter
        self.device = model.embed.weight.device
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        settings = settings or decode_settings
        if settings.graphs and row_adapter is not None:
            raise ValueError("a row adapter swaps tensors between steps, which a CUDA graph cannot follow: "
                             "decode eagerly or compiled without graphs")
        self.static = StaticStep(model, batch_size, cache_len, settings) if settings.static else None
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []
        self.position: list[int] = []  # the cache slot of each active row's next token
        self.positions: torch.Tensor | None = None  # the same on the device; None when rows changed
        self.logits: torch.Tensor | None = None
        # A prompt given several times (K samples of one prompt, as group rollouts ask) is prefilled once:
        # later copies take the cache slots of a row that holds it and the logits its prefill gave, which
        # are kept while copies of it are still waiting.
        self.waiting_copies: Counter = Counter()
        self.first_logits: dict[tuple, torch.Tensor] = {}
        if self.static is None:
            model.setup_cache(batch_size, cache_len)
        else:
            # A compiled step specialises on the cache's shape, so static steps get a cache of one shape
            # from call to call (the largest asked for, its length rounded up to 1, 1.5, 2, 3, 4, 6, ...
            # blocks), and compile again only when it grows. Its keys are never a whole cache row (one slot
            # more than any step attends to): a whole row is a contiguous slice, which the compiler would
            # take for another shape.
            blocks = min(round_up(-(-(cache_len + 1) // KEY_BLOCK)), -(-(model.args.max_seq_len + 1) // KEY_BLOCK))
            model.setup_cache(batch_size, blocks * KEY_BLOCK, at_least_largest=True)

    def add(self, seq: Sequence):
        """Queue a sequence; its budget is cut to what fits the cache after its prompt."""
        if not seq.prompt:
            raise ValueError("a sequence needs a non-empty prompt")
        seq.max_new_tokens = max(min(seq.max_new_tokens, self.cache_len - len(seq.prompt)), 0)
        if seq.max_new_tokens == 0:
            seq.finish = "length"  # the prompt fills the context: nothing can be generated
            return
        self.waiting.append(seq)
        self.waiting_copies[_key(seq)] += 1

    def cancel(self, seq: Sequence):
        """End a sequence now (its client went away): it leaves its row or the queue at the next step."""
        if seq.finish is None:
            seq.finish = "cancelled"

    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    def close(self):
        self.model.clear_cache()

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One token for every active row; returns the sequences that got one (ended ones included)."""
        self._leave([r for r, seq in enumerate(self.rows) if seq.finish is not None])  # cancelled
        self._admit()
        if not self.rows:
            return []
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=self.device)
        for rows, (temperature, top_p, generator) in _sampling_groups(self.rows):
            index = self._on_device(rows) if len(rows) < len(self.rows) else slice(None)
            tokens[index] = sample_next(self.logits[index], temperature, top_p, generator)
        to_read = [tokens]
        wanted = [r for r, seq in enumerate(self.rows) if seq.want_logprobs]
        if wanted:
            index = self._on_device(wanted)
            to_read.append(torch.log_softmax(self.logits[index], dim=-1).gather(-1, tokens[index, None]).squeeze(-1))
        # The host decides which rows end: one small transfer per step (the price of refilling rows).
        # It starts now; with overlap, the next step is launched before the host waits for it.
        read = _start_reading(to_read)
        stepped = list(self.rows)
        decoded = self.overlap and not all(len(seq.tokens) + 1 >= seq.max_new_tokens for seq in stepped)
        if decoded:
            self._decode(tokens)
        host = read()
        for r, value in zip(wanted, host[1] if wanted else []):
            self.rows[r].logprobs.append(value)
        for seq, token in zip(stepped, host[0]):
            seq.tokens.append(token)
            if token in self.eos:
                seq.finish = "eos"
            elif seq.stop and _stop_string_cut(self.tokenizer, seq):
                seq.finish = "stop"
            elif len(seq.tokens) >= seq.max_new_tokens:
                seq.finish = "length"
        if not decoded:
            self.logits = None  # used up by the sampling; _decode gives the rows that stay their next ones
        keep = self._leave([r for r, seq in enumerate(self.rows) if seq.finish is not None])
        if self.rows and not decoded:
            self._decode(tokens[self._on_device(keep)] if len(keep) < len(tokens) else tokens)
        return stepped

    def _on_device(self, values: list[int]) -> torch.Tensor:
        return common.to_device(values, self.device)

    def _leave(self, ended: list[int]) -> list[int]:
        """Ended rows leave; the last row moves into each hole, so the active rows stay 0..n-1. Returns,
        for each row that stays, the row it was in."""
        keep = list(range(len(self.rows)))
        for r in reversed(ended):
            last = len(keep) - 1
            if r != last:
                self.model.copy_cache_row(last, r, self.position[last])
                keep[r], self.rows[r], self.position[r] = keep[last], self.rows[last], self.position[last]
            keep.pop(), self.rows.pop(), self.position.pop()
        if ended:
            self.positions = None
            if self.logits is not None:
                self.logits = self.logits[self._on_device(keep)] if self.rows else None
        return keep

    def _admit(self):
        """Fill the free rows with waiting sequences: one prefill for the prompts no row holds yet; a
        copy of a prompt some row holds (with the same adapter) copies that row's cache slots."""
        entering = []
        while self.waiting and len(self.rows) + len(entering) < self.batch_size:
            seq = self.waiting.popleft()
            self.waiting_copies[_key(seq)] -= 1
            if seq.finish is None:  # not cancelled while it waited
                entering.append(seq)
        if not entering:
            return
        holder = {_key(seq): r for r, seq in enumerate(self.rows) if _key(seq) in self.first_logits}
        first_row = len(self.rows)
        to_prefill = {}  # prompt key -> the row that prefills it
        for r, seq in enumerate(entering, first_row):
            if _key(seq) not in holder and _key(seq) not in to_prefill:
                to_prefill[_key(seq)] = r
        self.rows += entering
        self.position += [len(seq.prompt) for seq in entering]
        self.positions = None
        fresh = {}
        for rows in _prefill_groups(list(to_prefill.values()), [len(self.rows[r].prompt) for r in to_prefill.values()]):
            if self.row_adapter is not None:
                self.row_adapter.set_rows([self.rows[r].adapter for r in rows])
            out = prefill(self.model, [self.rows[r].prompt for r in rows], self._on_device(rows), self.tokenizer.pad_id)
            fresh.update(zip(rows, out))
        logits = []
        for r, seq in enumerate(entering, first_row):
            key = _key(seq)
            if r in fresh:
                logits.append(fresh[r])
                self.first_logits[key] = fresh[r]
            else:
                self.model.copy_cache_row(holder.get(key, to_prefill.get(key)), r, len(seq.prompt))
                logits.append(self.first_logits[key])
        for key in {_key(seq) for seq in entering}:
            if self.waiting_copies[key] <= 0:  # no copy to come: the logits are not needed again
                self.first_logits.pop(key, None)
                del self.waiting_copies[key]
        new = torch.stack(logits)
        self.logits = new if self.logits is None else torch.cat([self.logits, new])

    def _decode(self, tokens):
        """The next logits of the active rows, which hold `tokens` at their positions."""
        if self.positions is None:  # rows joined or left: the device copy is made again
            self.positions = self._on_device(self.position)
        n_keys, slots = max(self.position) + 1, [seq.adapter for seq in self.rows]
        if self.static is None:
            if self.row_adapter is not None:
                self.row_adapter.set_rows(slots)
            self.logits = decode_one_token(self.model, tokens, self.positions, n_keys)
        else:
            rows, n_keys = self.static.shape(len(self.rows), n_keys)
            if self.row_adapter is not None:  # padding rows take the first row's slot: one slot keeps the dense path
                self.row_adapter.set_rows(slots + slots[:1] * (rows - len(slots)))
            self.logits = self.static.run(tokens, self.positions, rows, n_keys)
        self.position = [p + 1 for p in self.position]
        self.positions = self.positions + 1  # a new tensor: a step still queued on the GPU may read the old one


def _start_reading(tensors: list[torch.Tensor]):
    """Start copying small device tensors to the host; the returned function waits for them and gives
    them as lists. On a GPU the copy goes to pinned memory without waiting for kernels launched after it."""
    if tensors[0].device.type != "cuda":
        return lambda: [t.tolist() for t in tensors]
    host = [t.to("cpu", non_blocking=True) for t in tensors]
    copied = torch.cuda.Event()
    copied.record()

    def wait():
        copied.synchronize()
        return [t.tolist() for t in host]

    return wait


def _prefill_groups(rows: list[int], lengths: list[int]) -> list[list[int]]:
    """Rows to prefill, in groups whose prompts are at most twice as long as the group's shortest: one
    prefill pads every prompt to its longest, and a 250-token prompt (pass 1's classification prompt)
    among 40-token ones would make the batch pay six times the tokens it needs."""
    groups: list[list[int]] = []
    shortest = 0
    for length, row in sorted(zip(lengths, rows)):
        if not groups or length > 2 * shortest:
            groups.append([])
            shortest = length
        groups[-1].append(row)
    return groups


def _key(seq: Sequence) -> tuple:
    """What a prefill depends on: the prompt and the weights it runs with."""
    return (seq.adapter, *seq.prompt)


def _sampling_groups(rows: list[Sequence]):
    """Rows with the same sampling settings and generator, each group sampled in one call, in row order."""
    groups: dict = {}
    for r, seq in enumerate(rows):
        greedy = seq.temperature < GREEDY_BELOW
        key = (0.0, 1.0, None) if greedy else (seq.temperature, seq.top_p, seq.generator)
        groups.setdefault((key[0], key[1], id(key[2])), ([], key))[0].append(r)
    return list(groups.values())


def _stop_string_cut(tokenizer, seq: Sequence) -> bool:
    """Whether the reply's text now holds a stop string; if so, remember where its text is cut."""
    text = tokenizer.decode(seq.tokens)
    hits = [text.find(s) for s in seq.stop if s in text]
    if hits:
        seq.cut = min(hits)
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
