"""Pictures of adapt.py's decisions, from its reports (runs/adapt-<mode>-<task>.json). Needs matplotlib.

    python bench/plot_adapt.py routing docs/routing.png runs/adapt-prompt-*.json runs/adapt-cls-*.json
    python bench/plot_adapt.py fewshot docs/fewshot.png runs/adapt-fewshot-*.json

routing: pass 1's choices as the paper's Figure 6 shows them, one panel per mode (prompt, cls): for each
task (its true category in brackets), the share of its prompts sent to each expert or kept on the base
weights ('others' or an unreadable reply). fewshot: the α CEM found per expert (the paper's Figure 7;
per layer with --per-layer) and whether it was used, and CEM's best score on the shots per iteration
against the base weights' score.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tasks  # noqa: E402

BASE = "base"


def read(paths):
    return [json.loads(Path(p).read_text()) for p in paths]


def routing(reports, out):
    modes = sorted({r["mode"] for r in reports}, key=["prompt", "cls"].index)
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 3.2), squeeze=False)
    # the same columns in every panel: each expert chosen anywhere, then the base weights
    columns = sorted({rec["choice"] for r in reports for rec in r["records"] if rec["choice"]}) + [BASE]
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in reports if r["mode"] == mode]
        shares = [[sum((rec["choice"] or BASE) == c for rec in r["records"]) / len(r["records"]) for c in columns]
                  for r in rows]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(shares):
            for j, share in enumerate(row):
                ax.text(j, i, f"{share:.2f}", ha="center", va="center", color="white" if share > 0.6 else "black",
                        fontsize=9)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(rows)), [f"{r['task']} ({tasks.TASKS[r['task']].category}, n={r['n']})" for r in rows])
        rule = rows[0].get("label_rule", "?")
        ax.set_title(f"pass 1, mode {mode} ({rule} rule): share of the prompts", fontsize=10)
        ax.set_xlabel("chosen")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def fewshot(reports, out):
    fig, axes = plt.subplots(len(reports), 2, figsize=(11, 3 * len(reports)), squeeze=False)
    for (ax_alpha, ax_cem), r in zip(axes, reports):
        names = list(r["best_mixture_alpha"])
        full = r["alpha_full"]
        if isinstance(full[0], list):  # per layer: one line per expert
            for name, row in zip(names, full):
                ax_alpha.plot(row, marker=".", label=name)
            ax_alpha.set_xlabel("layer")
            ax_alpha.legend(fontsize=8)
        else:
            ax_alpha.bar(names, full)
        used = "used" if r["used"] == "mixture" else "not used: the base weights kept"
        ax_alpha.set_title(f"{r['task']}: α of the best mixture ({used})", fontsize=10)
        ax_alpha.set_ylabel("α")
        history = r["cem_history"]
        for k, label in enumerate(["accuracy on the shots", "reference log-likelihood per token"]):
            axis = ax_cem if k == 0 else ax_cem.twinx()
            axis.plot([h["iteration"] for h in history], [h["best_score"][k] for h in history], marker="o",
                      color=f"C{k}", label=f"best mixture: {label}")
            axis.axhline(r["base_shot_score"][k], color=f"C{k}", linestyle="--", label=f"base weights: {label}")
            axis.set_ylabel(label, color=f"C{k}", fontsize=8)
        ax_cem.set_xlabel("CEM iteration")
        ax_cem.set_xticks([h["iteration"] for h in history])
        ax_cem.set_title(f"CEM on {r['shots']} shots: {r['cem_evaluations']} evaluations", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("routing", "fewshot"))
    parser.add_argument("out")
    parser.add_argument("reports", nargs="+")
    args = parser.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    (routing if args.kind == "routing" else fewshot)(read(args.reports), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
