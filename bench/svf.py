"""SVF training-step cost: forward+backward through SVF layers against the frozen base model, same batch.

    python bench/svf.py                        # SmolLM2-135M-Instruct, fp32 on CPU, 8 x 256 tokens
    python bench/svf.py --batch 2 --seq 128    # a quick run

The baseline is the frozen base model's forward+backward. Its weights do not require grad, so the
embedding output is made a leaf that requires grad: backward then runs through every layer computing
activation gradients, as an SVF step must, but no weight gradient (neither does SVF: only z learns).
The loss is the mean next-token cross-entropy over every position of random tokens (what a log-prob
objective costs; the numbers do not depend on the text).

Rows, all in one process on one batch: the base model, then SVF on the MLP matrices with each training
forward (factored / materialized, eager / torch.compile'd), then the base and the fastest SVF variant
under bf16 autocast. Repeats are interleaved across variants (round-robin), so load from other processes
on the machine spreads over all rows instead of landing on one; each row is the median of its repeats,
after one warm-up (which also compiles); the minimum is printed too, and picks the fastest variant, because
interference from other processes only ever adds time. The base runs as the same model with SVF in "disabled" mode
(each target is the original nn.Linear behind one extra Python call). Also printed: the one-off SVD time
(cache off), the merge time (every W' built) and peak memory per step.

What it is compared with: an SVF training step should cost at most 1.3x the base model's forward+backward.
"""

import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import model as m  # noqa: E402
import svf  # noqa: E402

DEFAULTS = dict(
    model=None,  # None: model.load() with no arguments, the default model, fp32 on CPU
    batch=8,
    seq=256,
    repeats=3,  # timed steps per row, after one warm-up
    targets="mlp",
    param="scale",
    threads=None,  # None: the cores free now (common.set_threads)
)
TARGET_RATIO = 1.3


# ----------------------------------------------------------------------------------------------
# Peak memory of one step


def _vm_hwm() -> int | None:
    """Peak resident set size of this process in bytes (Linux /proc), or None."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory():
    """Hand memory that glibc keeps after frees back to the OS (malloc_trim), so the resident size before
    a step is what is live and the step's peak shows in full instead of hiding in reused free pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


PEAK_RESETTABLE = _vm_hwm() is not None and _reset_peak()
MEMORY_METHOD = ("peak RSS of the step minus RSS before it (VmHWM, reset through /proc/self/clear_refs; "
                 "freed memory returned to the OS with malloc_trim first; psutil not used)"
                 if PEAK_RESETTABLE else
                 "growth of ru_maxrss during the step (0 when the step stays under an earlier peak)")


@contextlib.contextmanager
def peak_memory(record: list):
    """Append the extra memory (bytes) one step used on top of what was resident before it.
    psutil is not needed: /proc gives both numbers; torch's own CPU allocator has no peak counter."""
    _release_free_memory()
    if PEAK_RESETTABLE:
        before = _rss()
        _reset_peak()
        yield
        record.append(_vm_hwm() - before)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        yield
        record.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


# ----------------------------------------------------------------------------------------------
# One training step


def step(model, tokens, autocast: bool) -> tuple[float, float]:
    """Forward + backward of the next-token loss; returns (seconds, loss)."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    start = time.perf_counter()
    with ctx:
        logits = model(tokens[:, :-1])  # (B, T-1, vocab), fp32
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    seconds = time.perf_counter() - start
    return seconds, loss.item()


class Variant:
    def __init__(self, label, configure, autocast=False, base=False):
        self.label, self.configure, self.autocast, self.base = label, configure, autocast, base
        self.times, self.memory, self.losses, self.first = [], [], [], None

    def run(self, model, tokens, adapter, embed_leaf):
        self.configure()
        for z in adapter.parameters():
            z.grad = None
        hook = model.embed.register_forward_hook(embed_leaf) if self.base else None
        try:
            with peak_memory(self.memory):
                seconds, loss = step(model, tokens, self.autocast)
        finally:
            if hook is not None:
                hook.remove()
        if not self.base:  # the step did reach z
            assert all(z.grad is not None for z in adapter.parameters())
        return seconds, loss

    @property
    def median(self):
        return statistics.median(self.times)

    @property
    def best(self):
        return min(self.times)


def measure(variants, model, tokens, adapter, embed_leaf, repeats):
    """One warm-up per variant (compiles), then `repeats` rounds, each running every variant once."""
    for v in variants:
        v.first, _ = v.run(model, tokens, adapter, embed_leaf)
        v.memory.clear()
        print(f"  warm-up {v.label}: {v.first:.2f} s", file=sys.stderr, flush=True)
    for r in range(repeats):
        for v in variants:
            seconds, loss = v.run(model, tokens, adapter, embed_leaf)
            v.times.append(seconds)
            v.losses.append(loss)
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{v.label} {v.times[-1]:.2f} s" for v in variants),
              file=sys.stderr, flush=True)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULTS["model"], help="local folder or hub id (default: model.load()'s)")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--seq", type=int, default=DEFAULTS["seq"], help="tokens per row")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--targets", default=DEFAULTS["targets"], choices=sorted(svf.TARGETS))
    parser.add_argument("--param", default=DEFAULTS["param"], choices=svf.PARAMETRIZATIONS)
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads (default: free cores)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    args = parser.parse_args()

    threads = common.set_threads(args.threads)
    model, _ = m.load() if args.model is None else m.load(args.model, dtype=torch.float32, device="cpu")
    p = model.embed.weight
    tokens = torch.randint(0, model.args.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    print(f"config: model {args.model or m.DEFAULT_MODEL} ({model.args.n_layers} layers, dim {model.args.dim}, "
          f"MLP {model.args.hidden_dim}, vocab {model.args.vocab_size}), {p.dtype} on {p.device}; "
          f"batch {args.batch} x {args.seq} tokens (input {tuple(tokens[:, :-1].shape)}, logits "
          f"{(args.batch, args.seq, model.args.vocab_size)}); SVF {args.param} on {args.targets}; "
          f"torch threads {threads}; torch {torch.__version__}; repeats {args.repeats} after 1 warm-up")

    # One-off costs: the SVD itself (no cache), for the MLP and for every projection.
    svd_seconds = {}
    for targets in ("mlp", "all"):
        names = svf.target_names(model, targets)
        svd_seconds[targets], factors = timed(lambda: svf.decompose(model, names, cache=False, progress=False))
        shapes = sorted({tuple(model.get_submodule(n).weight.shape) for n in names})
        print(f"  SVD {targets}: {len(names)} matrices {shapes}, {svd_seconds[targets]:.1f} s", file=sys.stderr, flush=True)
    merge_all_seconds, _ = timed(lambda: [svf.materialize(U, S, Vh, torch.ones_like(S), "scale", U.dtype).contiguous()
                                          for U, S, Vh in factors.values()])
    del factors

    adapter = svf.SVF(model, targets=args.targets, parametrization=args.param, progress=False)  # reads/writes the SVD cache
    merge_seconds, _ = timed(lambda: adapter.set_mode("merged"))
    adapter.set_mode("train")

    def embed_leaf(module, inputs, output):
        return output.detach().requires_grad_()  # the frozen base's only gradient: w.r.t. the embedding output

    def base():
        adapter.set_mode("disabled")

    def svf_forward(kind, compile_):
        def configure():
            adapter.set_mode("train")
            adapter.configure_forward(kind, use_compile=compile_)
        return configure

    variants = [Variant("base (frozen)", base, base=True)] + [
        Variant(f"SVF {kind} {'compiled' if compile_ else 'eager'}", svf_forward(kind, compile_))
        for kind in ("factored", "materialized") for compile_ in (False, True)
    ]
    print("fp32:", file=sys.stderr)
    measure(variants, model, tokens, adapter, embed_leaf, args.repeats)
    fastest = min(variants[1:], key=lambda v: v.best)
    rows = [(v, variants[0]) for v in variants]
    if not args.no_bf16:
        bf16 = [Variant("base (frozen), bf16 autocast", base, autocast=True, base=True),
                Variant(f"{fastest.label}, bf16 autocast", fastest.configure, autocast=True)]
        print("bf16 autocast:", file=sys.stderr)
        measure(bf16, model, tokens, adapter, embed_leaf, args.repeats)
        rows += [(bf16[0], variants[0]), (bf16[1], bf16[0])]

    print()
    print(f"| step (batch {args.batch} x {args.seq}, {threads} threads) | fwd+bwd s, median of {args.repeats} | vs base | "
          f"min s | vs base (min) | first call s | peak extra MB | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v, reference in rows:
        against = " (vs base bf16)" if reference is not variants[0] else ""
        print(f"| {v.label} | {v.median:.2f} | {v.median / reference.median:.2f}x{against} | {v.best:.2f} | "
              f"{v.best / reference.best:.2f}x{against} | {v.first:.2f} | {max(0, max(v.memory)) / 2**20:.0f} | "
              f"{statistics.median(v.losses):.5f} |")
    print()
    for v in variants[1:] + (bf16[1:] if not args.no_bf16 else []):
        if "compiled" in v.label:
            print(f"compile time {v.label}: ~{v.first - v.best:.1f} s (warm-up step minus fastest step)")
    print(f"one-off SVD, fp32, cache off: mlp {svd_seconds['mlp']:.1f} s, all {svd_seconds['all']:.1f} s")
    print(f"merge (every W' built dense): {args.targets} {merge_seconds:.2f} s; all projections {merge_all_seconds:.2f} s")
    print(f"memory: {MEMORY_METHOD}")
    print("samples (s): " + "; ".join(f"{v.label}: " + ", ".join(f"{t:.2f}" for t in v.times) for v, _ in rows))
    best_ratio = fastest.best / variants[0].best
    print(f"fastest SVF training forward (by min): {fastest.label}, {best_ratio:.2f}x the base fwd+bwd "
          f"(target <= {TARGET_RATIO}x: {'met' if best_ratio <= TARGET_RATIO else 'NOT met'}); "
          f"svf.TRAINING_FORWARD is {svf.TRAINING_FORWARD!r}")


if __name__ == "__main__":
    main()
