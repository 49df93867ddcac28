"""Evaluate a model (optionally with an SVF expert) on one task: batched generation, exact scoring.

    python evaluate.py --task gsm8k --split test --limit 100
    python evaluate.py --task humaneval --batch-size 16

Prints accuracy with its 95% Wilson interval and the number of examples, tokens per second and wall
time, and writes one JSON line per example (id, prompt, completion, extracted answer, correct, finish
reason) so every number can be checked by hand.
"""

import argparse
import json
import math
import time
from pathlib import Path

import common
import generate as gen
import model as m
import tasks

DEFAULTS = dict(
    model=m.DEFAULT_MODEL,
    split="test",
    limit=None,  # first N examples of the split (all when None)
    batch_size=32,
    max_new_tokens=None,  # None: the task's own budget
    out=None,  # JSON Lines of per-example records; default: see default_out
)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: honest at small n and near 0 or 1, unlike p ± 2σ."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(correct: list[bool]) -> dict:
    """n, correct, accuracy and its 95% Wilson interval for a list of per-example outcomes."""
    k, n = sum(map(bool, correct)), len(correct)
    return {"n": n, "correct": k, "accuracy": k / max(n, 1), "interval": wilson_interval(k, n)}


def paired_difference(before: list[bool], after: list[bool], resamples: int = 10_000, seed: int = 0) -> dict:
    """Accuracy of `after` minus `before` on the same examples, with a paired bootstrap 95% interval
    (resampling examples, both outcomes of an example together) and the examples each side alone got
    right. Pairing removes the spread of question difficulty that two separate Wilson intervals carry,
    so a change of a few points on a few hundred questions can show."""
    import numpy as np

    if len(before) != len(after):
        raise ValueError(f"paired outcomes need the same examples: {len(before)} before, {len(after)} after")
    delta = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    n = len(delta)
    if n == 0:
        return dict(n=0, difference=0.0, interval=(0.0, 0.0), gained=0, lost=0)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = delta[picks].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return dict(n=n, difference=float(delta.mean()), interval=(float(low), float(high)),
                gained=int((delta > 0).sum()), lost=int((delta < 0).sum()))


def evaluate(model, tokenizer, task, examples, batch_size: int = 32, max_new_tokens: int | None = None,
             progress: bool = True) -> dict:
    """Generate greedily for every example and score it. Returns a summary and per-example records."""
    max_new_tokens = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    prompts_text = [tokenizer.render_chat(task.messages(e)) for e in examples]
    prompts = [tokenizer.encode(p) for p in prompts_text]
    start = time.perf_counter()
    out = gen.generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, progress=progress,
                       desc=task.name)
    generation_seconds = time.perf_counter() - start
    completions, finish = out.texts, out.finish
    correct = task.score_many(examples, completions)
    records = [
        {"id": e.get("id"), "prompt": p, "completion": c, "extracted": _jsonable(task.extract(e, c)),
         "correct": bool(ok), "finish": f}
        for e, p, c, ok, f in zip(examples, prompts_text, completions, correct, finish)
    ]
    return dict(task=task.name, **accuracy(correct), tokens=out.n_generated, seconds=time.perf_counter() - start,
                tok_per_s=out.n_generated / max(generation_seconds, 1e-9),
                hit_limit=sum(f == "length" for f in finish), records=records)


def _jsonable(value):
    return value if value is None or isinstance(value, (str, int, float, bool, list, dict)) else str(value)


def default_out(args) -> Path:
    """runs/eval-<task>-<split>[-<expert or LoRA file>].jsonl, never an existing file: a second run
    of the same evaluation gets -2, -3, ... rather than replacing the first one's records (an
    explicit --out is the user's to overwrite)."""
    adapter = getattr(args, "expert_given", None) or args.expert or args.lora  # as named, not its hub cache path
    stem = f"runs/eval-{args.task}-{args.split}" + (f"-{Path(adapter).parent.name}-{Path(adapter).stem}" if adapter else "")
    out, n = Path(f"{stem}.jsonl"), 1
    while out.exists():
        n += 1
        out = Path(f"{stem}-{n}.jsonl")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(tasks.TASKS))
    parser.add_argument("--model", default=DEFAULTS["model"], help="local Hugging Face folder or hub id")
    parser.add_argument("--expert", default=None, help="SVF expert file (.safetensors) to apply to the model, or "
                        "one on the Hugging Face hub: org/name/file.safetensors (org/name if it holds one expert)")
    parser.add_argument("--shuffle-seed", type=common.seed, default=None,
                        help="permute each z of --expert with this seed: the ordered-σ control (paper Table 5)")
    parser.add_argument("--lora", default=None, help="LoRA file (train.py --method lora) to apply instead of an expert")
    parser.add_argument("--label-rule", choices=("strict", "lenient"), default=None,
                        help="--task cls: strict, a boxed label only (the paper's rule); lenient, else the first label "
                             "word. Default: the rule an --expert classifier was trained with, else lenient")
    parser.add_argument("--split", default=DEFAULTS["split"])
    parser.add_argument("--limit", type=common.positive_int, default=DEFAULTS["limit"], help="first N examples (default: all)")
    parser.add_argument("--batch-size", type=common.positive_int, default=DEFAULTS["batch_size"])
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=DEFAULTS["max_new_tokens"],
                        help="reply budget (default: the task's own)")
    parser.add_argument("--out", default=DEFAULTS["out"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the decode step (auto: on a GPU, where steps are also captured as CUDA graphs)")
    parser.add_argument("--dtype", choices=common.DTYPES, default="auto", help=common.DTYPE_HELP)
    parser.add_argument("--threads", type=common.thread_count, default=None, help="torch CPU threads (default: free cores)")
    args = parser.parse_args()
    if args.lora and args.expert:
        parser.error("give --expert (SVF) or --lora, not both")
    # The records are written at the end: a path they cannot go to must stop the run now, not then.
    default = default_out(args)
    try:
        out = common.check_writable_file(args.out or default, example_name=default.name)
    except ValueError as error:
        parser.error(f"--out: {error}")
    if args.expert:  # a file, or one on the Hugging Face hub
        args.expert_given = args.expert
        expert = common.resolve_experts(args.expert)
        if expert.is_dir():
            files = sorted(p.name for p in expert.glob("*.safetensors"))
            if len(files) != 1:
                parser.error(f"--expert {args.expert} holds {len(files)} experts ({', '.join(files)}): name one, "
                             f"e.g. {args.expert}/{files[0] if files else 'math.safetensors'}")
            expert = expert / files[0]
        args.expert = str(expert)

    if args.label_rule and args.task != "cls":
        parser.error("--label-rule is for --task cls")
    options = {}
    if args.task == "cls":  # the label rule: the flag, else the one the --expert classifier was trained with
        import svf

        trained_rule = svf.read_expert(args.expert)[1].get("label_rule") if args.expert else None
        options["strict"] = (args.label_rule or trained_rule or "lenient") == "strict"
    task = tasks.get(args.task, **options)
    examples = task.load(args.split)[: args.limit]
    threads = common.set_threads(args.threads)
    config = {**vars(args), "threads": threads, "examples": len(examples),
              "max_new_tokens": args.max_new_tokens or task.max_new_tokens}
    print("config: " + json.dumps(config))

    # The dtype probe times the rows generation will really run: no more than there are examples.
    model, tokenizer = m.load(args.model, dtype=common.DTYPES[args.dtype], device=args.device,
                              probe_rows=min(args.batch_size, len(examples)))
    device = model.embed.weight.device
    print(f"[evaluate] {gen.setup_decode(common.compile_wanted(args.compile, device), device)}")
    if args.expert:
        import svf

        svf.apply_expert(model, args.expert, shuffle_seed=args.shuffle_seed)
    elif args.shuffle_seed is not None:
        parser.error("--shuffle-seed permutes an expert: give --expert too")
    if args.lora:
        import lora

        lora.apply(model, args.lora)

    result = evaluate(model, tokenizer, task, examples, args.batch_size, args.max_new_tokens)
    with common.atomic_path(out) as tmp, open(tmp, "w") as f:
        for record in result["records"]:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    low, high = result["interval"]
    print(f"{task.name} {args.split}: accuracy {result['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}, "
          f"n={result['n']}), {result['tok_per_s']:.1f} tok/s, {result['seconds']:.0f} s, "
          f"{result['hit_limit']} replies hit the token limit; records in {out}")


if __name__ == "__main__":
    main()
