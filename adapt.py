"""Self-adaptation on an unseen task with SVF experts: two-pass inference (dispatch.py).

    python adapt.py --mode fewshot --task arc_challenge          # α by CEM on 10 shots, then the test prompts
    python adapt.py --mode prompt --task humaneval               # the base model picks an expert per prompt
    python adapt.py --mode cls --task math --split test500       # the classification expert picks
    python adapt.py --mode expert --expert-name math --task math # one fixed expert
    python adapt.py --mode none --task arc_challenge             # the base model

Prints, and writes as JSON: accuracy with its 95% interval on the prompts not used as shots (and how
many); for prompt/cls the chosen categories (the paper's Figure 6) and classification accuracy; for
fewshot the α per expert (Figure 7) and the CEM iterations and evaluations; pass-1 and pass-2 wall
time and their ratio (Table 3).
"""

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

import cem
import common
import dispatch
import evaluate
import generate as gen
import model as m
import tasks

DEFAULTS = dict(experts="experts", shots=10, split=None, limit=None, batch_size=32, cem="light")
DEFAULT_SPLIT = {"math": "test500", "arc_challenge": "test", "humaneval": "test"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=("none", "prompt", "cls", "fewshot", "expert"))
    p.add_argument("--task", default="arc_challenge", choices=sorted(set(tasks.TASKS) - {"cls"}))
    p.add_argument("--experts", default=DEFAULTS["experts"],
                   help="folder of expert files, or a Hugging Face hub repository of them (org/name)")
    p.add_argument("--expert-name", default=None, help="for --mode expert: an expert's category (code, math, reasoning, ...)")
    p.add_argument("--lora", default=None,
                   help="LoRA file (train.py --method lora) on q and v under every mode; with --mode none, "
                        "the LoRA row of the paper's Table 2")
    p.add_argument("--model", default=m.DEFAULT_MODEL)
    p.add_argument("--split", default=DEFAULTS["split"], help="default: test (MATH: test500)")
    p.add_argument("--limit", type=common.positive_int, default=DEFAULTS["limit"], help="score only the first N prompts")
    p.add_argument("--shots", type=common.positive_int, default=DEFAULTS["shots"],
                   help="prompts drawn as CEM's shots, left out of the score in every mode")
    p.add_argument("--per-layer", action="store_true", help="one α per expert and layer (else per expert)")
    p.add_argument("--normalize", action="store_true", help="Σα = 1")
    p.add_argument("--cem", choices=("light", "full"), default=DEFAULTS["cem"],
                   help="light: the paper's CEM-light (3 generations of 16); full: 32 per generation, up to 100")
    p.add_argument("--label-rule", choices=("strict", "lenient"), default=None,
                   help="how pass 1's reply names a category: strict, boxed only (the paper's rule; default for "
                        "--mode prompt); lenient, else the first category word. --mode cls defaults to the rule the "
                        "classifier was trained with (its metadata; lenient for files that do not say)")
    p.add_argument("--batch-size", type=common.positive_int, default=DEFAULTS["batch_size"])
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--export", default=None, metavar="DIR",
                   help="--mode expert or fewshot: also write the model with the weights pass 2 used merged in, as a "
                        "Hugging Face folder (export.py; in the dtype the run used: --dtype fp32 for an exact merge)")
    p.add_argument("--device", default=None)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the decode step (auto: on a GPU, where steps are also captured as CUDA graphs)")
    p.add_argument("--dtype", choices=common.DTYPES, default="auto", help=common.DTYPE_HELP)
    p.add_argument("--threads", type=common.thread_count, default=None)
    args = p.parse_args(argv)
    if args.mode == "expert" and not args.expert_name:
        p.error("--mode expert needs --expert-name (an expert's category: code, math, reasoning, ...)")
    if args.export and (args.mode not in ("expert", "fewshot") or args.lora):
        p.error("--export writes one set of merged weights: give --mode expert or fewshot, without --lora "
                "(prompt and cls choose weights per prompt)")
    if args.export:  # a folder export.py must not replace stops the run now, not after it
        import export

        try:
            export.check_destination(Path(args.export), out_flag="--export")
        except (ValueError, OSError) as error:
            p.error(str(error))
    label = args.mode + ("+lora" if args.lora else "")
    # The report is written at the end: a path it cannot go to must stop the run now, not then.
    default_out = Path(f"runs/adapt-{label}-{args.task}.json")
    try:
        out = common.check_writable_file(args.out or default_out, example_name=default_out.name)
    except ValueError as error:
        p.error(f"--out: {error}")

    task = tasks.get(args.task)
    split = args.split or DEFAULT_SPLIT.get(args.task, "test")
    # The shots are drawn (and left out of the score) in every mode, so rows of different modes score the same prompts.
    shots, scored, shot_split = dispatch.shots_and_scored(task, split, args.shots, args.seed, args.limit)
    threads = common.set_threads(args.threads)
    print("config: " + json.dumps({**vars(args), "split": split, "scored": len(scored), "shots_from": shot_split, "threads": threads}))

    # The dtype probe times the rows generation will really run: no more than the prompts of one pass.
    model, tokenizer = m.load(args.model, dtype=common.DTYPES[args.dtype], device=args.device,
                              probe_rows=min(args.batch_size, max(len(scored), len(shots))))
    device = model.embed.weight.device
    print(f"[adapt] {gen.setup_decode(common.compile_wanted(args.compile, device), device)}", file=sys.stderr)
    if args.lora:
        import lora

        lora.apply(model, args.lora)  # q and v; the SVF experts adapt the MLP, so the two do not overlap
    experts = dispatch.load_experts(args.experts)
    two_pass = dispatch.TwoPass(model, tokenizer, experts, args.batch_size)
    report = dict(mode=args.mode, lora=args.lora, task=task.name, split=split, scored=len(scored),
                  shots=len(shots) if args.mode == "fewshot" else 0, shots_excluded_from=shot_split)

    start = time.perf_counter()
    pass1_replies = [None] * len(scored)
    if args.mode in ("prompt", "cls"):
        rule = args.label_rule or two_pass.label_rule(with_classifier=args.mode == "cls")
        choices, pass1_replies = two_pass.classify([task.question(e) for e in scored], with_classifier=args.mode == "cls",
                                              strict=rule == "strict")
        truth = task.category
        report["label_rule"] = rule
        report["chosen"] = dict(Counter(c or "base (others / unreadable)" for c in choices))
        for each in ("strict", "lenient"):  # both rules on the same replies, for comparison
            routed = choices if each == rule else two_pass.route(pass1_replies, each == "strict", args.mode == "cls")
            report[f"classification_accuracy_{each}"] = sum(c == truth for c in routed) / len(routed)
        report["classification_accuracy"] = report[f"classification_accuracy_{rule}"]
    elif args.mode == "fewshot":
        settings = cem.LIGHT if args.cem == "light" else cem.Settings()
        settings = dataclasses.replace(settings, normalize=args.normalize, seed=args.seed)
        chosen = two_pass.fewshot_alpha(task, shots, settings, args.per_layer,
                                   log=lambda h: print(f"[cem] iteration {h['iteration']}: best score {h['best_score']}"))
        result = chosen.result
        print(f"[cem] decided by {chosen.decided_by}")
        if chosen.alpha is None:
            choices = [None] * len(scored)
        else:
            choices = [two_pass.mixed(chosen.names, chosen.alpha)] * len(scored)
        alpha = result.best if not args.per_layer else result.best.mean(dim=1)
        report.update(alpha=dict(zip(chosen.names, alpha.tolist())) if chosen.alpha is not None else None,
                      best_mixture_alpha=dict(zip(chosen.names, alpha.tolist())), alpha_full=result.best.tolist(),
                      used="mixture" if chosen.alpha is not None else "base", decided_by=chosen.decided_by,
                      base_shot_score=list(chosen.base_score), cem_iterations=result.iterations,
                      cem_evaluations=result.evaluations, shot_score=list(result.best_score),
                      cem_history=result.history)
    elif args.mode == "expert":
        if args.expert_name not in two_pass.experts:
            raise SystemExit(f"no expert {args.expert_name!r} in {args.experts} (have {sorted(two_pass.experts)})")
        choices = [args.expert_name] * len(scored)
    else:
        choices = [None] * len(scored)
    pass1 = time.perf_counter() - start

    start = time.perf_counter()
    replies = two_pass.answer(task, scored, choices)
    pass2 = time.perf_counter() - start
    correct = task.score_many(scored, replies)
    report.update(evaluate.accuracy(correct), pass1_seconds=pass1, pass2_seconds=pass2,
                  pass1_share_of_pass2=pass1 / pass2 if pass2 else None,
                  records=[dict(id=e["id"], pass1=p1, choice=c if c is None or isinstance(c, str) else "mixed", reply=r,
                                correct=ok) for e, p1, c, r, ok in zip(scored, pass1_replies, choices, replies, correct)])
    with common.atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    if args.export:
        import export

        choice, adapter = choices[0], None  # the weights every scored prompt was answered with
        if choice is not None:
            two_pass.svf.load_state(two_pass.z_of(choice))  # export merges it
            adapter = two_pass.svf
        merged = (f"the expert {choice}" if isinstance(choice, str) else
                  "no expert (few-shot kept the base weights)" if choice is None else
                  "the few-shot " + export.mixture_text(report["alpha"]))
        card = export.model_card(str(args.model), f"{merged}, chosen by `{' '.join(sys.argv)}`",
                                 {n: e[1] for n, e in experts.items() if n in two_pass.skills})
        print(f"exported to {export.export(model, adapter, common.resolve(args.model), Path(args.export), card)}")

    print("\n| mode | task | scored | accuracy | 95% CI | pass 1 s | pass 2 s | pass 1 / pass 2 |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    n, (low, high) = report["n"], report["interval"]
    print(f"| {label} | {task.name} ({split}) | {n} | {report['accuracy']:.3f} | {low:.3f}-{high:.3f} | {pass1:.0f} | {pass2:.0f} | "
          f"{pass1 / pass2:.0%} |")
    if "chosen" in report:
        print(f"chosen experts ({report['label_rule']} rule): {report['chosen']}; classification accuracy "
              f"{report['classification_accuracy']:.3f} (strict {report['classification_accuracy_strict']:.3f}, lenient "
              f"{report['classification_accuracy_lenient']:.3f}; the true category of {task.name} is "
              f"{task.category})")
    if "used" in report:
        alpha = ', '.join(f'{k} {v:.3f}' for k, v in report['best_mixture_alpha'].items())
        used = f"α: {alpha}" if report["used"] == "mixture" else f"the base weights (best mixture α: {alpha})"
        print(f"answered with {used}; decided by {report['decided_by']}; CEM {report['cem_iterations']} iterations, "
              f"{report['cem_evaluations']} evaluations of {len(shots)} shots (from {shot_split}, not scored)")
    print(f"written to {out}")
    return report


if __name__ == "__main__":
    main()
