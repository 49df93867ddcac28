"""Rollout speed: useful tokens per second of what RL rollouts and evaluation generate, EOS honoured.

Useful tokens: per reply, the tokens generated up to and including its first EOS (all of the budget when
it never stops); useful tok/s is their sum over the replies / wall seconds. Engines, on the same prompts,
each with weights loaded in fp32 and in bf16, one run at a time in one process:
    ours  generate.generate (continuous batching: a finished row's slot takes the next waiting prompt)
    old   model.generate as of commit f089356 (today's path), static batches of the same size, in order
    hf    transformers' generate on the same model folder, static left-padded batches of the same size
Workloads: gsm8k (64 GSM8K test prompts, <= 256 tokens, greedy, batch 32), arc (128 ARC-Easy train prompts
x 8 samples, <= 64 tokens, temperature 1, seed 0, batch 32 rows), single (4 GSM8K test prompts one at a
time, <= 128 tokens, greedy). Then "RL step": one step of train.py's CPU preset on cls (16 prompts, 24
tokens greedy, SVF mask on the MLP matrices with z merged, reinforce.train_step, micro-batch 8), old path
(f089356 generation, fp32, one static batch) against new (generate.generate, --new-dtype).

    python bench/rollout.py                                       # everything (long)
    python bench/rollout.py --quick --threads 1                   # 8 rows, 32 tokens: a smoke run
    python bench/rollout.py --workloads gsm8k,single --engines ours,old --dtypes fp32
    python bench/rollout.py --workloads "" --new-dtype bf16       # only the RL step
"""

import argparse
import gc
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from decode_speed import left_padded  # noqa: E402  (bench/, this script's folder)
import common  # noqa: E402
import generate as gen  # noqa: E402
import model as m  # noqa: E402
import reinforce  # noqa: E402
import svf as svf_lib  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

OLD_COMMIT = "f089356"  # model.py of "today's path"
SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKLOADS = {  # prompts from (task, split); samples: copies of each prompt; batch: rows per batch / slots
    "gsm8k": dict(task="gsm8k", split="test", prompts=64, samples=1, tokens=256, temperature=0.0, batch=32),
    "arc": dict(task="arc_easy", split="train", prompts=128, samples=8, tokens=64, temperature=1.0, batch=32),
    "single": dict(task="gsm8k", split="test", prompts=4, samples=1, tokens=128, temperature=0.0, batch=1),
}
QUICK = {"gsm8k": dict(prompts=8, tokens=32, batch=4), "arc": dict(prompts=2, samples=4, tokens=32, batch=4),
         "single": dict(prompts=2, tokens=32)}
CLS_CPU = train.preset_settings("cpu", "cls")  # the CPU preset keeps the paper's clip
RL = dict(task="cls", prompts=CLS_CPU.batch_size, tokens=CLS_CPU.max_new_tokens, micro_batch=CLS_CPU.micro_batch,
          lr=CLS_CPU.lr, steps=CLS_CPU.steps, clip=CLS_CPU.clip)
RL_QUICK = dict(prompts=4, tokens=8, micro_batch=2)
old_model = None  # model.py at OLD_COMMIT, imported by main()


def import_old_model():
    """model.py as it was at OLD_COMMIT, imported as the module old_model."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:model.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "old_model.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("old_model", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_model"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return module


def workload_prompts(tokenizer, w) -> list[list[int]]:
    task = tasks.get(w["task"])  # ARC missing: the error says to run  python tasks.py build-arc
    examples = task.load(w["split"])[: w["prompts"]]
    return tasks.prompt_tokens(tokenizer, task, [e for e in examples for _ in range(w["samples"])])


def until_eos(row, eos) -> list[int]:
    end = next((i for i, t in enumerate(row) if t in eos), None)
    return list(row) if end is None else list(row[: end + 1])


def run_ours(model, tokenizer, prompts, w):
    return gen.generate(model, tokenizer, prompts, w["tokens"], batch_size=w["batch"], temperature=w["temperature"],
                        top_p=1.0, seed=SEED, progress=False).tokens


def run_old(model, tokenizer, prompts, w):
    B, tokens = w["batch"], []
    for s in range(0, len(prompts), B):
        tokens += old_model.generate(model, tokenizer, prompts[s:s + B], max_new_tokens=w["tokens"],
                               temperature=w["temperature"], seed=SEED + s).tokens
    return tokens


@torch.inference_mode()
def run_hf(model, tokenizer, prompts, w):
    B, pad_id, tokens = w["batch"], tokenizer.eos_ids[0], []
    sampling = dict(do_sample=True, temperature=w["temperature"], top_k=0, top_p=1.0) if w["temperature"] > 0 \
        else dict(do_sample=False)
    for s in range(0, len(prompts), B):
        ids, mask = left_padded(prompts[s:s + B], pad_id)
        torch.manual_seed(SEED + s)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=w["tokens"], pad_token_id=pad_id,
                             eos_token_id=tokenizer.eos_ids, **sampling)
        tokens += out[:, ids.shape[1]:].tolist()
    return tokens


def load_engine(engine, dtype, folder, tokenizer):
    if engine == "ours":
        return m.load(folder, dtype=dtype, device="cpu")
    if engine == "old":
        return old_model.load(folder, dtype=dtype, device="cpu")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(), tokenizer


def timed(run, model, tokenizer, prompts, w):
    """(replies cut after EOS, seconds, forward passes: prefills + decode steps, counted on the first block)."""
    calls = [0]
    first_block = next(module for name, module in model.named_modules() if name.endswith("layers.0"))
    hook = first_block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        start = time.perf_counter()
        tokens = run(model, tokenizer, prompts, w)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    eos = set(tokenizer.eos_ids)
    return [until_eos(row, eos) for row in tokens], seconds, calls[0]


def bench_workloads(args, folder, tokenizer, workloads):
    prompts = {name: workload_prompts(tokenizer, w) for name, w in workloads.items()}  # data errors come first
    runners = {"ours": run_ours, "old": run_old, "hf": run_hf}
    results = {}
    for dtype_name in args.dtypes:
        for engine in args.engines:
            model, tok = load_engine(engine, DTYPES[dtype_name], folder, tokenizer)
            warm = next(iter(prompts.values()))[:2]
            timed(runners[engine], model, tok, warm, dict(tokens=4, batch=2, temperature=0.0))  # allocator, threads
            for name, w in workloads.items():
                replies, seconds, forwards = timed(runners[engine], model, tok, prompts[name], w)
                results[name, engine, dtype_name] = dict(replies=replies, seconds=seconds, forwards=forwards,
                                                         useful=sum(map(len, replies)))
                print(f"[rollout] {name} {engine} {dtype_name}: {results[name, engine, dtype_name]['useful']} useful "
                      f"tokens in {seconds:.1f} s", file=sys.stderr)
            del model
            gc.collect()
    return results


def print_workloads(results, workloads, engines, dtypes):
    def ratio(name, dtype, engine, other_dtype):
        a, b = results.get((name, "ours", dtype)), results.get((name, engine, other_dtype))
        return f"{a['useful'] / a['seconds'] / (b['useful'] / b['seconds']):.2f}x" if a and b else "-"

    print("| workload | engine | dtype | replies | useful tokens | wall s | useful tok/s | forwards "
          "| ours / hf fp32 | ours / hf bf16 | ours / old fp32 | ours = old, same dtype |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, w in workloads.items():
        for engine in engines:
            for dtype in dtypes:
                r = results[name, engine, dtype]
                ratios, same = "- | - | -", "-"
                if engine == "ours":
                    ratios = " | ".join(ratio(name, dtype, e, d) for e, d in (("hf", "fp32"), ("hf", "bf16"), ("old", "fp32")))
                    old = results.get((name, "old", dtype))
                    if old and w["temperature"] == 0:
                        differ = sum(a != b for a, b in zip(r["replies"], old["replies"]))
                        same = "yes" if differ == 0 else f"no: {differ} of {len(r['replies'])} differ"
                print(f"| {name} | {engine} | {dtype} | {len(r['replies'])} | {r['useful']} | {r['seconds']:.1f} | "
                      f"{r['useful'] / r['seconds']:.1f} | {r['forwards'] or '?'} | {ratios} | {same} |")


def timed_update(model, svf, rollouts, rl, autocast):
    """Seconds of one reinforce.train_step, after a warm-up step on 2 rows whose change to z is undone."""
    def step(batch):
        optimizer, scheduler = reinforce.make_optimizer(svf.parameters(), rl["lr"], rl["steps"])
        reinforce.train_step(model, svf, batch, optimizer, scheduler, baseline="mean", kl_coef=0.0,
                             micro_batch=rl["micro_batch"], clip=rl["clip"], autocast_dtype=autocast)

    saved = svf.state()
    step(reinforce.Rollouts(rollouts.prompts[:2], rollouts.completions[:2], rollouts.texts[:2], rollouts.correct[:2],
                            rollouts.rewards[:2]))
    svf.load_state(saved)
    start = time.perf_counter()
    step(rollouts)
    return time.perf_counter() - start


def rl_path(load, generate_fn, task, examples, rl, autocast, folder, fallback):
    """(generation s, update s, useful tokens, weights dtype, note) of one RL step: rollouts with z merged, then
    the update. fallback (the old path): if train_step cannot use this model, time it on model.py's instead."""
    model, tokenizer = load()
    svf = svf_lib.SVF(model, targets="mlp", parametrization="mask", seed=SEED, progress=False)
    prompts = tasks.prompt_tokens(tokenizer, task, examples)
    with svf.merged():
        generate_fn(model, tokenizer, prompts[:2], 4)  # warm-up
        start = time.perf_counter()
        out = generate_fn(model, tokenizer, prompts, rl["tokens"])
    gen_s = time.perf_counter() - start  # with the merge of W' and its undoing, as in reinforce.rollout
    correct = task.score_many(examples, out.texts)
    rollouts = reinforce.Rollouts(prompts, out.tokens, out.texts, correct,
                                  torch.tensor([task.reward(c) for c in correct], dtype=torch.float32))
    dtype, note = str(next(model.parameters()).dtype).removeprefix("torch."), ""
    try:
        update_s = timed_update(model, svf, rollouts, rl, autocast)
    except (AttributeError, TypeError, RuntimeError) as error:
        if not fallback:
            raise
        note = f"train_step cannot use this model ({error}); its update was timed on model.py's model, fp32"
        model, _ = m.load(folder, dtype=torch.float32, device="cpu")
        update_s = timed_update(model, svf_lib.SVF(model, targets="mlp", parametrization="mask", seed=SEED, progress=False),
                                rollouts, rl, autocast)
    return gen_s, update_s, sum(map(len, out.tokens)), dtype, note


def bench_rl(args, folder):
    rl = {**RL, **(RL_QUICK if args.quick else {})}
    task = tasks.get(rl["task"])
    examples = task.load("train")[: rl["prompts"]]
    autocast = torch.bfloat16 if common.cpu_has_native_bf16() else None  # train.py's CPU preset
    paths = {
        f"old: {OLD_COMMIT} model.generate, one batch of {len(examples)}": (
            lambda: old_model.load(folder, dtype=torch.float32, device="cpu"),
            lambda model, tok, prompts, n: old_model.generate(model, tok, prompts, max_new_tokens=n, temperature=0.0)),
        f"new: generate.generate, batch {len(examples)}": (
            lambda: m.load(folder, dtype=DTYPES.get(args.new_dtype), device="cpu"),
            lambda model, tok, prompts, n: gen.generate(model, tok, prompts, n, batch_size=len(examples), temperature=0.0,
                                                        top_p=1.0, seed=SEED, progress=False)),
    }
    rows = []
    for label, (load, generate_fn) in paths.items():
        rows.append((label, *rl_path(load, generate_fn, task, examples, rl, autocast, folder, label.startswith("old"))))
        gc.collect()
    print(f"\nRL step: task {rl['task']}, {len(examples)} prompts, <= {rl['tokens']} tokens greedy, SVF mask on mlp, "
          f"micro-batch {rl['micro_batch']}, update autocast {'bf16' if autocast else 'none (fp32)'}")
    print("| path | weights | useful tokens | generation s | update s | total s | new / old speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    old_total = rows[0][1] + rows[0][2]
    for label, gen_s, update_s, useful, dtype, note in rows:
        speedup = f"{old_total / (gen_s + update_s):.2f}x" if label.startswith("new") else "1.00x"
        print(f"| {label} | {dtype} | {useful} | {gen_s:.2f} | {update_s:.2f} | {gen_s + update_s:.2f} | {speedup} |")
    (_, og, ou, *_), (_, ng, nu, *_) = rows
    print(f"speed-up, generation {og / ng:.2f}x, update {ou / nu:.2f}x")
    for row in rows:
        if row[-1]:
            print(f"note ({row[0]}): {row[-1]}")


def names(text, allowed):
    chosen = [n for n in text.split(",") if n]
    bad = [n for n in chosen if n not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=m.DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true", help="8 rows and 32 tokens a workload; RL step on 4 prompts x 8 tokens")
    parser.add_argument("--workloads", type=lambda t: names(t, WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--engines", type=lambda t: names(t, ("ours", "old", "hf")), default=["ours", "old", "hf"])
    parser.add_argument("--dtypes", type=lambda t: names(t, DTYPES), default=list(DTYPES))
    parser.add_argument("--new-dtype", choices=("auto", *DTYPES), default="auto",
                        help="the RL step's new path; auto: what model.load picks by itself")
    parser.add_argument("--no-rl", action="store_true", help="skip the RL step")
    parser.add_argument("--threads", type=common.positive_int, default=None)
    args = parser.parse_args()

    global old_model
    threads = common.set_threads(args.threads)
    folder = common.resolve(args.model)
    old_model = import_old_model()
    print(common.cpu_description())
    print(f"model {folder.name}, cpu, torch threads {threads}, torch {torch.__version__}, generate.py from {gen.__file__}")
    workloads = {n: {**WORKLOADS[n], **(QUICK[n] if args.quick else {})} for n in args.workloads}
    if workloads and args.engines and args.dtypes:
        tokenizer = m.load(folder, dtype=torch.float32, device="cpu")[1]
        results = bench_workloads(args, folder, tokenizer, workloads)
        print()
        print_workloads(results, workloads, args.engines, args.dtypes)
    if not args.no_rl:
        bench_rl(args, folder)


if __name__ == "__main__":
    main()
