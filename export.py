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

--out is a new or empty folder, or an earlier export, which is replaced; a folder holding anything else
is refused before the model loads, never deleted.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import common
import dispatch
import model as m
import share
import svf as svf_lib

ROOT = Path(__file__).resolve().parent
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")
CARD_MARK = "Written by `export.py`"  # in every card model_card writes: how previous_export knows its own folders


def previous_export(folder: Path) -> bool:
    """Whether folder holds an earlier export and nothing else: only files export writes (model.safetensors,
    README.md, the copied source files, GGUF files written inside it), and its README.md is model_card's.
    Only such a folder is replaced; anything else there may be someone's work and is never deleted."""
    folder = Path(folder)
    ours = {"model.safetensors", "README.md", *COPIED}
    if not all(p.is_file() and not p.is_symlink() and (p.name in ours or p.suffix == ".gguf") for p in folder.iterdir()):
        return False
    readme = folder / "README.md"
    return readme.is_file() and CARD_MARK in readme.read_text(encoding="utf-8", errors="replace")


def check_destination(out: Path, gguf_path: Path | None = None, out_flag: str = "--out"):
    """Refuse, before any work, an out folder export must not write: the current folder (or one holding it),
    a file, or a folder with anything but a previous export in it (previous_export); and a gguf_path that
    is a folder, the out folder itself, or an existing file that is not a GGUF. Raises ValueError or
    FileExistsError naming the path (as out_flag: adapt.py's is --export) and saying what to do."""
    out = Path(os.path.realpath(out))  # as common.atomic_folder sees it: "." is the current folder
    common.check_replaceable_folder(out, previous_export, name=f"{out_flag} {out}",
                                    refused="files that are not an earlier export (export replaces its folder "
                                            "and would delete them)")
    if gguf_path is None:
        return
    gguf_path = Path(os.path.realpath(gguf_path))
    if gguf_path == out or gguf_path.is_dir():
        raise ValueError(f"--gguf {gguf_path} is a folder; give a file path, e.g. --gguf {out / 'model.gguf'}")
    if gguf_path.exists():
        with open(gguf_path, "rb") as f:
            if f.read(4) != b"GGUF":  # every GGUF file starts with these bytes
                raise FileExistsError(f"--gguf {gguf_path} exists and is not a GGUF file; give a new file path")


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


def export(model: m.Transformer, adapter: svf_lib.SVF | None, source: Path, out: Path, card: str,
           gguf_path: Path | None = None, gguf_dtype: str = "f16") -> Path:
    """Write the merged model to out, a new or empty folder or a previous export (check_destination), built
    in a hidden sibling folder and renamed into place, so an interrupted export never leaves a folder that
    looks complete; and to a GGUF file at gguf_path if given. A gguf_path inside out is written into the
    new folder before it takes out's place (written beside it first, the swap would delete it). Nothing is
    written when a merged weight is not finite."""
    from safetensors.torch import save_file

    out = Path(out)
    check_destination(out, gguf_path)
    tensors = merged_weights(model, adapter, source_dtype(source))
    # A z or mixture weight large enough overflows W' = U diag(σ') Vᵀ (or its cast to the source dtype) to inf or
    # NaN; such a model answers nothing, so it is not written.
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"the merged weights are not finite ({bad[0]} and {len(bad) - 1} more tensors hold inf or NaN): "
                         f"the expert or mixture scales the singular values past what {tensors[bad[0]].dtype} holds. "
                         f"Nothing was written; use smaller --alpha weights or another expert")
    inside = None
    if gguf_path is not None:
        gguf_path = Path(os.path.realpath(gguf_path))
        if gguf_path.is_relative_to(os.path.realpath(out)):
            inside = gguf_path.relative_to(os.path.realpath(out))
        else:
            write_gguf(tensors, model.args, source, gguf_path, gguf_dtype, name=f"{source.name} (SVF merged)")
    with common.atomic_folder(out, replaceable=previous_export) as partial:
        save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
        for name in COPIED:
            if (source / name).exists():
                shutil.copy2(source / name, partial / name)
        (partial / "README.md").write_text(card)
        if inside is not None:
            write_gguf(tensors, model.args, source, partial / inside, gguf_dtype, name=f"{source.name} (SVF merged)")
    return out


# ---- GGUF for llama.cpp / Ollama: the same merged tensors, f16 (or bf16 / f32), under llama.cpp's names

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2"}  # our family -> llama.cpp's architecture
GGUF_TYPES = ("f16", "bf16", "f32")


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for a Llama q or k projection (convert_hf_to_gguf.py's permute): each head's
    two rotary halves interleaved, as its rotary kernel pairs neighbouring dimensions. The inverse of
    convert_gguf.unpermute_qk."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(tensors: dict[str, torch.Tensor], args: m.ModelArgs) -> dict[str, np.ndarray]:
    """Hugging Face names and layout -> llama.cpp's (fp32 numpy): blk.N.attn_q.weight and the like, q and
    k rows permuted for the llama architecture (Qwen2's rotary kernel takes them as they are)."""
    import convert_gguf

    to_gguf = {hf: gguf for gguf, hf in convert_gguf.GGUF_TO_HF_NAMES.items()}
    layer_names = {hf: gguf for gguf, hf in convert_gguf.GGUF_TO_HF_LAYER_NAMES.items()}
    for proj, short in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        layer_names[f"self_attn.{proj}.bias"] = f"{short}.bias"
    out = {}
    for name, tensor in tensors.items():
        values = tensor.float().numpy()
        if not name.startswith("model.layers."):
            out[to_gguf[name]] = values
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if args.family == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            values = permute_qk(values, args.n_heads if rest.startswith("self_attn.q") else args.n_kv_heads)
        out[f"blk.{layer}.{layer_names[rest]}"] = values
    return out


def pre_tokenizer(tokenizer: dict, family: str) -> str:
    """llama.cpp's name for how text is split before BPE: SmolLM2's digits-then-byte-level split is
    "smollm"; Qwen2's is "qwen2"; anything else gets llama.cpp's "default" (GPT-2's regex)."""
    steps = (tokenizer.get("pre_tokenizer") or {}).get("pretokenizers") or []
    if [step.get("type") for step in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    return "qwen2" if family == "qwen2" else "default"


def write_gguf(tensors: dict[str, torch.Tensor], args: m.ModelArgs, source: Path, path: Path, dtype: str = "f16",
               name: str = "") -> Path:
    """A GGUF file of the merged model: llama.cpp's metadata for the architecture, the byte-level BPE
    tokenizer of the source's tokenizer.json, and the tensors in dtype (norms stay f32, as llama.cpp keeps them)."""
    import gguf

    if args.family not in GGUF_ARCH or args.rope_scaling is not None or args.o_bias or \
            (args.family == "llama" and args.qkv_bias) or (args.sliding_window or 0) and args.sliding_window < args.max_seq_len:
        raise ValueError(f"GGUF export writes plain Llama and Qwen2 models; this {args.family} model has a sliding "
                         f"window, rope scaling or attention biases llama.cpp would read differently: export the "
                         f"Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    if tokenizer["model"]["type"] != "BPE":
        raise ValueError(f"{source / 'tokenizer.json'}: a {tokenizer['model']['type']} tokenizer; GGUF export writes "
                         f"byte-level BPE tokenizers only (use llama.cpp's convert_hf_to_gguf.py)")
    vocab = tokenizer["model"]["vocab"]
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens = [None] * max(args.vocab_size, max(vocab.values()) + 1)
    for token, index in {**vocab, **special}.items():
        tokens[index] = token
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    for i, token in enumerate(tokens):  # ids the vocabulary leaves free (a padded embedding)
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    config = common.read_json_object(source / "tokenizer_config.json", "") if (source / "tokenizer_config.json").exists() else {}

    arch = GGUF_ARCH[args.family]
    path = Path(path)
    with common.atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or source.name)
        writer.add_context_length(args.max_seq_len)
        writer.add_embedding_length(args.dim)
        writer.add_block_count(args.n_layers)
        writer.add_feed_forward_length(args.hidden_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.n_kv_heads)
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
        writer.add_rope_dimension_count(args.head_dim)
        writer.add_rope_freq_base(args.rope_theta)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        writer.add_vocab_size(len(tokens))
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                              "f32": gguf.LlamaFileType.ALL_F32}[dtype])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer, args.family))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        if args.bos_id is not None:
            writer.add_bos_token_id(args.bos_id)
        writer.add_eos_token_id(args.eos_ids[0])
        writer.add_add_bos_token(False)  # chat templates write BOS where the model wants it
        if config.get("chat_template"):
            writer.add_chat_template(config["chat_template"])
        for gguf_name, values in gguf_tensors(tensors, args).items():
            if values.ndim == 1 or dtype == "f32":
                writer.add_tensor(gguf_name, values.astype(np.float32))
            elif dtype == "bf16":
                writer.add_tensor(gguf_name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16),
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(gguf_name, values.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def model_card(base_model: str, merged: str, experts: dict[str, dict]) -> str:
    """The exported folder's README.md: the base model, what was merged, and each expert's metadata
    ({name: metadata}, as dispatch.load_experts gives them)."""
    lines = [f"# {share.markdown_text(base_model)} with SVF experts merged", "",
             f"Base model: {share.markdown_code(base_model)}. Merged: {merged}. {CARD_MARK} (Transformer², arXiv 2501.06252):",
             "each adapted matrix is W' = U diag(σ') Vᵀ with its singular values rescaled by the expert's z.", "",
             "| expert (category) | file | task | parametrization | targets | command |", "|---|---|---|---|---|---|"]
    for name, meta in experts.items():  # named by dispatch.expert_name; metadata escaped as in share.py's card
        cells = [share.markdown_text(v) for v in (name, meta.get("file", ""), meta.get("task", ""), meta.get("param", ""),
                                                  meta.get("targets", ""))]
        lines.append(f"| {' | '.join(cells)} | {share.markdown_code(meta.get('command', ''))} |")
    return "\n".join(lines) + "\n"


def mixture_text(alpha: dict[str, float]) -> str:
    """How a card names a mixture: "mixture code α=0.2, math α=0.8"."""
    return "mixture " + ", ".join(f"{name} α={weight:.3g}" for name, weight in alpha.items())


def parse_alpha(text: str) -> dict[str, float]:
    """--alpha code=0.2,math=0.3: one weight per expert name, each finite and >= 0, at least one > 0.
    Negative weights are refused because the mask mixture divides by Σα and maps the mixed mask back
    through a logit, which needs it inside (0, 1); an all-zero α has no Σα to divide by (and under
    scale merges W' = 0); NaN or inf reaches every adapted weight."""
    alpha = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not name or weight is None:
            raise argparse.ArgumentTypeError(f"{text!r}: give NAME=WEIGHT pairs, e.g. code=0.2,math=0.8")
        if name in alpha:
            raise argparse.ArgumentTypeError(f"{text!r} gives {name!r} twice; give each expert one weight")
        if not math.isfinite(weight) or weight < 0:
            raise argparse.ArgumentTypeError(f"{name}={value.strip()}: a weight must be a finite number >= 0, "
                                             f"e.g. code=0.2,math=0.8")
        alpha[name] = weight
    if not any(alpha.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: every weight is 0, which merges no expert; give at least one weight > 0")
    if not math.isfinite(sum(alpha.values())):
        raise argparse.ArgumentTypeError(f"{text!r}: the weights sum past the largest float; give weights of a sensible "
                                         f"size, e.g. code=0.2,math=0.8")
    return alpha


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--expert", help="one expert file (train.py's expert.safetensors)")
    which.add_argument("--experts", help="a folder of experts, mixed with --alpha")
    p.add_argument("--alpha", type=parse_alpha, help="with --experts: weights per expert name, e.g. code=0.2,math=0.8")
    p.add_argument("--model", default=m.DEFAULT_MODEL)
    p.add_argument("--out", required=True,
                   help="folder to write: a new or empty one, or an earlier export, which is replaced")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="also write a GGUF file for llama.cpp / Ollama (it may be inside --out)")
    p.add_argument("--gguf-dtype", choices=GGUF_TYPES, default="f16",
                   help="the GGUF's weight type (quantising further is llama.cpp's llama-quantize)")
    p.add_argument("--threads", type=common.thread_count, default=None)
    args = p.parse_args(argv)
    if args.experts and not args.alpha:
        p.error("--experts needs --alpha (the weight of each expert in the mixture)")
    try:  # before the model loads: a bad --out or --gguf costs nothing
        check_destination(Path(args.out), args.gguf and Path(args.gguf))
    except (ValueError, OSError) as error:
        p.error(str(error))
    common.set_threads(args.threads)
    source = common.resolve(args.model)
    model, _ = m.load(source, dtype=torch.float32, device="cpu")  # W' in fp32, cast once when written
    if args.expert:
        adapter = svf_lib.apply_expert(model, args.expert, merge=False)
        meta = svf_lib.read_expert(args.expert)[1]
        experts = {dispatch.expert_name(meta, args.expert): {**meta, "file": Path(args.expert).name}}
        merged = f"the expert `{Path(args.expert).name}`"
    else:
        found = dispatch.load_experts(args.experts)
        unknown = sorted(set(args.alpha) - set(found))
        if unknown:
            p.error(f"--alpha names {unknown}, which {args.experts} does not hold (it has {sorted(found)})")
        two_pass = dispatch.TwoPass(model, None, found)
        names = sorted(args.alpha)
        two_pass.svf.load_state(two_pass.mixed(names, torch.tensor([args.alpha[n] for n in names])))
        adapter, experts = two_pass.svf, {n: found[n][1] for n in names}
        merged = "the " + mixture_text({n: args.alpha[n] for n in names})
    out = export(model, adapter, source, Path(args.out), model_card(str(args.model), merged, experts),
                 args.gguf and Path(args.gguf), args.gguf_dtype)
    print(f"wrote {out}{' and ' + args.gguf if args.gguf else ''}: {merged} merged into {args.model}", file=sys.stderr)
    print(json.dumps({"out": str(out), "gguf": args.gguf, "merged": merged}))


if __name__ == "__main__":
    main()
