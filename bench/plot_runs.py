"""Validation accuracy of several train.py runs on one chart (RESULTS.md's comparisons).

    python bench/plot_runs.py docs/arc_easy_table4.png runs/arc_easy-mask-mlp-rl runs/arc_easy-mask-attn-rl ...

Each line is one run folder's metrics.jsonl, labelled with what was trained and how (its config.json).
Needs matplotlib.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(config: dict) -> str:
    trained = "LoRA q,v" if config.get("method") == "lora" else f"SVF {config['targets']}"
    return f"{trained}, {config.get('objective', 'rl')}"


def main(out: str, folders: list[str]):
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    task = None
    for folder in map(Path, folders):
        config = json.loads((folder / "config.json").read_text())
        task = config["task"]
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        valid = [h for h in history if "valid_accuracy" in h]
        ax.plot([h["step"] for h in valid], [h["valid_accuracy"] for h in valid], marker="o", label=label(config))
    n = valid[0]["valid_n"] if folders and valid else "?"
    ax.set_xlabel("step")
    ax.set_ylabel(f"{task} validation accuracy (n={n})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
