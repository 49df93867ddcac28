"""Rows with different experts in one decode step: how serve.py should run them (svf.RowAdapter).

    python bench/row_experts.py                      # default model and experts, batch 8 and 32
    python bench/row_experts.py --batch 32 --dtype fp32

Times one decode step (model.decode over a filled cache) for the same rows run four ways:
    one expert      every row with one expert merged into dense weights (what a batch of one expert costs)
    factored        rows spread over base + every expert, each row through U diag(σ'_row) Vᵀ
    grouped         the same rows grouped by expert, one dense product per expert's merged weights
    factored, mixed every row with its own mixture of experts (only the factored way can: no merged weights)
Median of --repeats steps, variants interleaved (round-robin) so drift hits them alike. Also printed: the
memory the grouped way keeps (one dense copy of the adapted matrices per expert).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import dispatch  # noqa: E402
import model as m  # noqa: E402
import svf as svf_lib  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=m.DEFAULT_MODEL)
    p.add_argument("--experts", default="experts")
    p.add_argument("--batch", type=common.positive_int, nargs="+", default=[8, 32])
    p.add_argument("--context", type=common.positive_int, default=256, help="cache slots filled per row")
    p.add_argument("--repeats", type=common.positive_int, default=20)
    p.add_argument("--dtype", choices=common.DTYPES, default="auto", help=common.DTYPE_HELP)
    p.add_argument("--threads", type=common.thread_count, default=None)
    args = p.parse_args()
    threads = common.set_threads(args.threads)
    model, _ = m.load(args.model, dtype=common.DTYPES[args.dtype], device="cpu", probe_rows=max(args.batch))
    experts = dispatch.load_experts(args.experts)
    two_pass = dispatch.TwoPass(model, None, experts)
    zs = list(two_pass.experts.values())
    dtype = model.embed.weight.dtype
    print(f"[row_experts] {m.DEFAULT_MODEL if args.model == m.DEFAULT_MODEL else args.model}, {len(zs)} experts, "
          f"{dtype}, {threads} threads, {common.cpu_description()}", file=sys.stderr)

    factored = svf_lib.RowAdapter(two_pass.svf, "factored")
    f_slots = [0] + [factored.add(z, merge=True) for z in zs]
    factored.close()
    grouped = svf_lib.RowAdapter(two_pass.svf, "grouped")
    g_slots = [0] + [grouped.add(z) for z in zs]
    grouped.close()
    per_copy = sum(w.numel() * w.element_size() for w in grouped.dense[g_slots[1]])

    g = torch.Generator().manual_seed(0)
    print("| batch | one expert (ms) | factored (ms) | grouped (ms) | factored, a mixture per row (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        spread = [i % len(f_slots) for i in range(batch)]  # rows over base + every expert, interleaved
        mixed = svf_lib.RowAdapter(two_pass.svf, "factored")
        mix_slots = [mixed.add(svf_lib.mix(zs, torch.rand(len(zs), generator=g), two_pass.svf.parametrization))
                     for _ in range(batch)]
        mixed.close()
        variants = {
            "one expert": (factored, [f_slots[1]] * batch),
            "factored": (factored, [f_slots[i] for i in spread]),
            "grouped": (grouped, [g_slots[i] for i in spread]),
            "mixed": (mixed, mix_slots),
        }
        model.setup_cache(batch, args.context + 1)
        tokens = torch.randint(100, 1000, (batch,), generator=g)
        positions = torch.full((batch,), args.context)
        times = {name: [] for name in variants}
        with torch.inference_mode():
            for repeat in range(args.repeats + 2):
                for name, (rows, slots) in variants.items():
                    rows.svf.set_mode("rows")
                    rows.set_rows(slots)
                    start = time.perf_counter()
                    model.decode(tokens, positions, args.context + 1)
                    if repeat >= 2:  # two warm-up rounds
                        times[name].append(time.perf_counter() - start)
        model.clear_cache()
        ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
        print(f"| {batch} | {ms['one expert']:.1f} | {ms['factored']:.1f} | {ms['grouped']:.1f} | {ms['mixed']:.1f} |")
    print(f"\nmemory kept by the grouped way: {per_copy / 2**20:.0f} MiB per expert ({len(zs)} experts: "
          f"{len(zs) * per_copy / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
