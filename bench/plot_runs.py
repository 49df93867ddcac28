"""Learning curves of several train.py runs on one chart (RESULTS.md's comparisons): validation
accuracy, the training batches' mean reward, and for group rollouts the share of prompts whose
replies all scored the same (no gradient under the group baseline). Training numbers are averaged over
a window of steps (--smooth, default 10), since one batch of 16 prompts is noisy.

    python bench/plot_runs.py docs/arc_easy_group.png runs/arc_easy-g8-lr2e-3-t8 runs/arc_easy-group8-shuffle ...
    python bench/plot_runs.py --valid-only docs/arc_easy_table4.png runs/arc_easy-mask-mlp-rl ...

Each line is one run folder's metrics.jsonl, labelled with what was trained and how (its config.json).
Needs matplotlib.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import results_table  # noqa: E402  (bench/ is on sys.path when this file runs as a script)


def label(config: dict) -> str:
    """A line's legend: what was trained and, for RL, results_table's recipe (baseline, K, lr, KL...)."""
    objective = config.get("objective", "rl")
    text = f"{results_table.trained(config)}, {objective}"
    return text + f", {results_table.recipe(config)}" if objective == "rl" else text


def smoothed(steps, values, window: int):
    """Mean over consecutive windows of `window` steps, placed at each window's last step."""
    out_steps, out_values = [], []
    for start in range(0, len(values) - window + 1, window):
        out_steps.append(steps[start + window - 1])
        out_values.append(sum(values[start:start + window]) / window)
    return out_steps, out_values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--smooth", type=int, default=10)
    parser.add_argument("--valid-only", action="store_true", help="one panel: validation accuracy")
    args = parser.parse_args(argv)
    panels = 1 if args.valid_only else 3
    fig, axes = plt.subplots(1, panels, figsize=(6.5 if panels == 1 else 15, 3.8), squeeze=False)
    axes = axes[0]
    task, n = None, "?"
    for folder in map(Path, args.runs):
        config = json.loads((folder / "config.json").read_text())
        task = config["task"]
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        valid = [h for h in history if "valid_accuracy" in h]
        n = valid[0]["valid_n"] if valid else n
        line, = axes[0].plot([h["step"] for h in valid], [h["valid_accuracy"] for h in valid], marker="o",
                             label=label(config))
        if panels == 1:
            continue
        train = [h for h in history if "reward" in h]
        axes[1].plot(*smoothed([h["step"] for h in train], [h["reward"] for h in train], args.smooth),
                     color=line.get_color())
        groups = [h for h in train if "equal_groups" in h]
        if groups:
            axes[2].plot(*smoothed([h["step"] for h in groups], [h["equal_groups"] for h in groups], args.smooth),
                         color=line.get_color())
    axes[0].set_ylabel(f"{task} validation accuracy (n={n})")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    if panels == 3:
        axes[1].set_ylabel(f"mean reward (±1), {args.smooth}-step mean")
        axes[1].set_ylim(-1, 1)
        axes[2].set_ylabel(f"prompts with no gradient (share), {args.smooth}-step mean")
        axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
