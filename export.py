"""Write the model with an SVF expert, or a mixture of experts, merged into its weights, as an ordinary
Hugging Face folder: what transformers, vLLM and llama.cpp's converter read.

    python export.py --expert experts/math.safetensors --out exported/smollm2-math
    python export.py --experts experts --alpha code=0.2,math=0.3,reasoning=0.5 --out exported/smollm2-mix
    python adapt.py --mode fewshot --task arc_challenge --export exported/arc   # the mixture adapt.py chose

The folder holds the source model's config.json, generation_config.json and tokenizer files unchanged,
model.safetensors in the source checkpoint's dtype and tensor names (tied embeddings stay tied: the
output matrix is not written twice), and a README.md saying what was merged. W' = U diag(σ') Vᵀ is
computed in fp32 and cast once at the end. An SVF update changes every singular value of a matrix, so
it is full-rank: it cannot be written as a LoRA adapter without loss, hence a whole model.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import common
import dispatch
import model as m
import svf as svf_lib

ROOT = Path(__file__).resolve().parent
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")


def source_dtype(folder: Path) -> torch.dtype:
    """The dtype the source checkpoint stores its weights in (its first floating-point tensor's)."""
    for file in common.weight_files(folder):
        with common.open_safetensors(file, common.repair_advice(folder)) as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(tensor.get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


@torch.no_grad()
def merged_weights(model: m.Transformer, adapter: svf_lib.SVF | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under Hugging Face names, with W' in place of W for every SVF matrix
    (adapter None: the base weights)."""
    tensors = {}
    with adapter.merged() if adapter is not None else contextlib.nullcontext():
        for hf_name, ours in m.hf_name_map(model.args).items():
            path, leaf = ours.rsplit(".", 1)
            module = model.get_submodule(path)
            if isinstance(module, svf_lib.SVFLinear):
                tensor = module.merged_weight if adapter is not None and leaf == "weight" else getattr(module.base, leaf)
            else:
                tensor = getattr(module, leaf)
            tensors[hf_name] = tensor.detach().to("cpu", dtype).contiguous()
    return tensors


def export(model: m.Transformer, adapter: svf_lib.SVF | None, source: Path, out: Path, card: str) -> Path:
    """Write the merged model to out (replaced if it exists), built in a hidden sibling folder and renamed
    into place, so an interrupted export never leaves a folder that looks complete."""
    from safetensors.torch import save_file

    out = Path(out)
    tensors = merged_weights(model, adapter, source_dtype(source))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
        for name in COPIED:
            if (source / name).exists():
                shutil.copy2(source / name, partial / name)
        (partial / "README.md").write_text(card)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def model_card(base_model: str, merged: str, experts: dict[str, dict]) -> str:
    """The exported folder's README.md: the base model, what was merged, and each expert's metadata."""
    lines = [f"# {base_model} with SVF experts merged", "",
             f"Base model: `{base_model}`. Merged: {merged}. Written by `export.py` (Transformer², arXiv 2501.06252):",
             "each adapted matrix is W' = U diag(σ') Vᵀ with its singular values rescaled by the expert's z.", "",
             "| expert | task | category | parametrization | targets | command |", "|---|---|---|---|---|---|"]
    for name, meta in experts.items():
        lines.append(f"| {name} | {meta.get('task', '')} | {meta.get('category', '')} | {meta.get('param', '')} "
                     f"| {meta.get('targets', '')} | `{meta.get('command', '')}` |")
    return "\n".join(lines) + "\n"


def parse_alpha(text: str) -> dict[str, float]:
    """--alpha code=0.2,math=0.3: one weight per expert name."""
    try:
        return {name.strip(): float(value) for name, value in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=WEIGHT pairs, e.g. code=0.2,math=0.8") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--expert", help="one expert file (train.py's expert.safetensors)")
    which.add_argument("--experts", help="a folder of experts, mixed with --alpha")
    p.add_argument("--alpha", type=parse_alpha, help="with --experts: weights per expert name, e.g. code=0.2,math=0.8")
    p.add_argument("--model", default=m.DEFAULT_MODEL)
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--threads", type=common.positive_int, default=None)
    args = p.parse_args(argv)
    if args.experts and not args.alpha:
        p.error("--experts needs --alpha (the weight of each expert in the mixture)")
    common.set_threads(args.threads)
    source = common.resolve(args.model)
    model, _ = m.load(source, dtype=torch.float32, device="cpu")  # W' in fp32, cast once when written
    if args.expert:
        adapter = svf_lib.apply_expert(model, args.expert, merge=False)
        meta = svf_lib.read_expert(args.expert)[1]
        experts, merged = {Path(args.expert).stem: meta}, f"the expert `{Path(args.expert).name}`"
    else:
        found = dispatch.load_experts(args.experts)
        unknown = sorted(set(args.alpha) - set(found))
        if unknown:
            p.error(f"--alpha names {unknown}, which {args.experts} does not hold (it has {sorted(found)})")
        two_pass = dispatch.TwoPass(model, None, found)
        names = sorted(args.alpha)
        two_pass.svf.load_state(two_pass.mixed(names, torch.tensor([args.alpha[n] for n in names])))
        adapter, experts = two_pass.svf, {n: found[n][1] for n in names}
        merged = "the mixture " + ", ".join(f"{n} α={args.alpha[n]:g}" for n in names)
    out = export(model, adapter, source, Path(args.out), model_card(str(args.model), merged, experts))
    print(f"wrote {out}: {merged} merged into {args.model}", file=sys.stderr)
    print(json.dumps({"out": str(out), "merged": merged}))


if __name__ == "__main__":
    main()
