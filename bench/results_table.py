"""Markdown rows for RESULTS.md from run folders (train.py) and adapt.py reports, so that every number
in the tables is read from the run that made it rather than copied by hand.

    python bench/results_table.py train runs/cls-mask-mlp-rl runs/arc_easy-mask-mlp-rl
    python bench/results_table.py recipes runs/arc_easy-g8-lr2e-3-t8 ...   # the RL recipe's settings, paired test difference
    python bench/results_table.py adapt runs/adapt-*-arc_challenge.json
    python bench/results_table.py table2 runs       # the paper's Table 2 layout from runs/adapt-*.json
"""

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402


def interval(values) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}"


def run_files(folder: Path) -> tuple[dict, dict]:
    """A train.py run folder's config.json and summary.json."""
    return (json.loads((folder / "config.json").read_text()), json.loads((folder / "summary.json").read_text()))


def train_rows(folders):
    print("| task | trained | objective, baseline | steps (best) | valid before → best (n) | test n | test base (95% CI) "
          "| test expert (95% CI) | minutes | command |")
    print("|---|---|---|---:|---|---:|---|---|---:|---|")
    for folder in map(Path, folders):
        config, s = run_files(folder)
        valid_n = config.get("eval_limit") or "all"
        objective = config.get("objective", "rl")
        objective += f", {config['baseline']}" if objective == "rl" else ", -"
        print(f"| {s['task']} | {trained(config)} | {objective} | {s['steps']} ({s['best_step']}) "
              f"| {s['valid_before']:.2f} → {s['valid_best']:.2f} ({valid_n}) | {s['test_n']} "
              f"| {s['test_base']:.3f} ({interval(s['test_base_interval'])}) "
              f"| {s['test_expert']:.3f} ({interval(s['test_expert_interval'])}) | {s['minutes']:.0f} | `{config['command']}` |")


def trained(config: dict) -> str:
    """What a run trained: LoRA on q, v or SVF with its parametrisation and target matrices."""
    return "LoRA q,v" if config.get("method") == "lora" else f"SVF {config['param']} {config['targets']}"


def recipe(config: dict) -> str:
    """The RL settings that differ between runs: baseline, K, std scaling, shuffled options, prompts per
    step, lr, KL λ, reply budget. Configs written before an option existed lack its key and had its default."""
    text = config.get("baseline", "mean")
    if config.get("samples", 1) > 1:
        text += f" K={config['samples']} T={config['temperature']:g}"
    if config.get("scale_by_std"):
        text += ", /std"
    if config.get("shuffle_options"):
        text += ", shuffled"
    return text + f", {config['batch_size']} prompts, lr {config['lr']:g}, KL {config['kl']:g}, {config['max_new_tokens']} tokens"


def letter_chance(task_name: str, records: dict, ids: list) -> float:
    """What a policy that picks its letters without reading the question would score with the same
    letter frequencies: the sum over letters of (share of replies choosing it) x (share of questions
    whose answer it is). An accuracy near this is position bias, not knowledge."""
    import tasks

    answers = {e["id"]: e["answerKey"] for e in tasks.get(task_name).load("test")}
    chosen = Counter(records[i]["extracted"] for i in ids)
    gold = Counter(answers[i] for i in ids)
    return sum(chosen[letter] * gold[letter] for letter in gold) / len(ids) ** 2


def recipe_rows(folders):
    """One row per RL run: its recipe, validation, the test accuracies and their paired difference on
    the same test prompts (from test-base.jsonl and test-expert.jsonl), and, for multiple-choice tasks,
    the share of the expert's test replies that open with its most common first character (a policy
    that answers one letter to everything shows here) and what base and expert would score by their
    letter frequencies alone (letter_chance)."""
    print("| task | trained | recipe | steps (best) | valid before → best (n) | test n | test base | test expert "
          "| paired difference (95%) | commonest opening | chance at its letters, base → expert | minutes | command |")
    print("|---|---|---|---:|---|---:|---:|---:|---|---|---|---:|---|")
    for folder in map(Path, folders):
        config, s = run_files(folder)
        records = {}
        for side in ("base", "expert"):
            lines = (folder / f"test-{side}.jsonl").read_text().splitlines()
            records[side] = {r["id"]: r for r in map(json.loads, filter(str.strip, lines))}
        ids = [i for i in records["base"] if i in records["expert"]]
        paired = evaluate.paired_difference([bool(records["base"][i]["correct"]) for i in ids],
                                            [bool(records["expert"][i]["correct"]) for i in ids])
        low, high = paired["interval"]
        opening = chance = "-"
        if s["task"].startswith("arc"):
            first, count = Counter(records["expert"][i]["completion"].strip()[:1] for i in ids).most_common(1)[0]
            opening = f'"{first}" {count / len(ids):.0%}'
            chance = " → ".join(f"{letter_chance(s['task'], records[side], ids):.3f}" for side in ("base", "expert"))
        print(f"| {s['task']} | {trained(config)} | {recipe(config)} | {s['steps']} ({s['best_step']}) "
              f"| {s['valid_before']:.3f} → {s['valid_best']:.3f} ({config.get('eval_limit') or 'all'}) | {len(ids)} "
              f"| {s['test_base']:.3f} | {s['test_expert']:.3f} | {paired['difference']:+.3f} [{low:+.3f}, {high:+.3f}] "
              f"| {opening} | {chance} | {s['minutes']:.0f} | `{config['command']}` |")


def adapt_rows(files):
    print("| mode | task (split) | scored | accuracy | 95% CI | pass 1 s | pass 2 s | pass 1 / pass 2 | pass 1 chose / α |")
    print("|---|---|---:|---:|---|---:|---:|---:|---|")
    for path in map(Path, files):
        r = json.loads(path.read_text())
        what = ""
        if "chosen" in r:
            what = (f"{r['label_rule']} rule: " + ", ".join(f"{k} {v}" for k, v in sorted(r["chosen"].items()))
                    + f"; right category {r['classification_accuracy']:.2f}")
        elif r.get("used") == "base":
            what = f"base weights kept: no mixture above them on the shots ({r['cem_evaluations']} CEM evaluations)"
        elif "alpha" in r:
            what = ", ".join(f"{k} {v:.2f}" for k, v in r["alpha"].items()) + f" ({r['cem_evaluations']} CEM evaluations)"
            if "decided_by" in r:
                what += "; decided by " + r["decided_by"].split(" (")[0]
        elif r["mode"] == "expert":
            what = r["records"][0]["choice"] if r["records"] else ""
        share = f"{r['pass1_share_of_pass2']:.0%}" if r.get("pass1_share_of_pass2") else "-"
        mode = r["mode"] + (f" + LoRA ({Path(r['lora']).parent.name})" if r.get("lora") else "")
        print(f"| {mode} | {r['task']} ({r['split']}) | {r['scored']} | {r['accuracy']:.3f} | {interval(r['interval'])} "
              f"| {r['pass1_seconds']:.0f} | {r['pass2_seconds']:.0f} | {share} | {what} |")


def table2(folders):
    """The paper's Table 2 layout: one row per mode, one column per unseen task, from
    <folder>/adapt-<mode>-<task>.json (the LoRA row from adapt-none+lora-<task>.json)."""
    folder = Path(folders[0]) if folders else Path("runs")
    tasks = ("math", "humaneval", "arc_challenge")
    rows = (("base model", "none"), ("one expert (the task's category)", "expert"), ("Transformer², prompt", "prompt"),
            ("Transformer², cls-expert", "cls"), ("Transformer², few-shot", "fewshot"), ("LoRA (next-token)", "none+lora"))
    print("| | " + " | ".join(tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    for name, mode in rows:
        cells = []
        for task in tasks:
            path = folder / f"adapt-{mode}-{task}.json"
            if path.exists():
                r = json.loads(path.read_text())
                cells.append(f"{r['accuracy']:.3f} ({interval(r['interval'])}, n={r['scored']})")
            else:
                cells.append("not run")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    commands = {"train": train_rows, "recipes": recipe_rows, "adapt": adapt_rows, "table2": table2}
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] not in commands or (sys.argv[1] != "table2" and len(sys.argv) < 3):
        sys.exit(__doc__)
    commands[sys.argv[1]](sys.argv[2:])
