"""What each expert changed: the factor σ'/σ it applies to every singular value of every adapted matrix,
one heatmap per expert (rows: layer and matrix; columns: singular values, largest first), as in the
paper's analysis of the learned z. Needs matplotlib.

    python bench/plot_experts.py docs/experts_z.png experts/*.safetensors

The factor is exact: the model's own singular values (the cached SVD) through svf.scaled_sigma, so the
mask parametrization's nuclear-norm rescale is included. White is 1 (the base model's σ).
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as m  # noqa: E402
import svf as svf_lib  # noqa: E402


def factors(adapter: svf_lib.SVF, z: dict) -> tuple[list[str], torch.Tensor]:
    """(row names, (n_matrices, r) tensor of σ'/σ), matrices ordered by layer, then as listed in the file."""
    names = sorted(z, key=lambda n: (int(n.split(".")[1]), n))
    rows = []
    for name in names:
        S = adapter.modules[name].S.float()
        rows.append(svf_lib.scaled_sigma(S, z[name].float(), adapter.parametrization) / S)
    width = max(len(r) for r in rows)
    table = torch.full((len(rows), width), float("nan"))
    for i, row in enumerate(rows):
        table[i, :len(row)] = row
    return names, table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("experts", nargs="+")
    parser.add_argument("--model", default=m.DEFAULT_MODEL)
    args = parser.parse_args(argv)
    model, _ = m.load(args.model, dtype=torch.float32, device="cpu")
    experts = [svf_lib.read_expert(path) for path in args.experts]  # (z, metadata) each
    first = svf_lib.expert_settings(experts[0][1], args.experts[0])
    adapter = svf_lib.SVF(model, targets=first["targets"], parametrization=first["param"],
                          layers=first["layers"], progress=False)
    tables = []
    for path, (z, meta) in zip(args.experts, experts):
        names, table = factors(adapter, z)
        tables.append((Path(path).stem, meta, names, table))
    spread = max(float(torch.nan_to_num(t.log().abs(), nan=0).max()) for *_, t in tables) or 1e-3
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 6), squeeze=False)
    for ax, (name, meta, names, table) in zip(axes[0], tables):
        image = ax.imshow(table.log().numpy(), aspect="auto", cmap="RdBu_r", vmin=-spread, vmax=spread,
                          interpolation="nearest")
        ax.set_title(f"{name} ({meta.get('task', '?')}, step {meta.get('step', '?')})\n"
                     f"σ'/σ from {math.exp(float(torch.nan_to_num(table.log(), nan=0).min())):.3f} "
                     f"to {math.exp(float(torch.nan_to_num(table.log(), nan=0).max())):.3f}", fontsize=9)
        per_layer = len(names) // model.args.n_layers or 1
        ax.set_yticks(range(0, len(names), per_layer * 5), [f"layer {i}" for i in range(0, model.args.n_layers, 5)],
                      fontsize=7)
        ax.set_xlabel("singular value (largest first)")
    fig.colorbar(image, ax=axes[0].tolist(), label="log(σ'/σ): red raised, blue lowered", shrink=0.8)
    fig.suptitle(f"What each expert changed: rows are {first['targets']} matrices by layer "
                 f"({', '.join(n.rsplit('.', 1)[-1] for n in names[:per_layer])} in each)", fontsize=10)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
