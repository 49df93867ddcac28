"""A Llama / Mistral / Qwen2 transformer that loads Hugging Face checkpoints directly.

Read top to bottom: configuration, RMSNorm, rotary embeddings, attention with a preallocated KV cache,
MLP, block, transformer (a full forward, prefill and the decode step), the checkpoint's names and
load(). Generation (sampling, continuous batching) is generate.py, the tokenizer and chat template
tokenizer.py; finding a model's folder and reading its files with useful errors is common.py.

What it is not: a training framework, a serving engine, or a general model zoo. It supports exactly the
decoder-only families the project uses, and refuses (with an error) any config field that would change
the math in a way it does not implement, so it never gives silently wrong output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import DEFAULT_MODEL
from tokenizer import Tokenizer


# ---- Configuration

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
            raise ValueError(f"unsupported architecture {arch!r}; model.py implements {sorted(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[arch]
        for key, implemented in (("hidden_act", "silu"), ("mlp_bias", False), ("partial_rotary_factor", 1.0),
                                 ("pretraining_tp", 1)):  # SwiGLU without biases, rotary on every dimension
            if config.get(key) not in (None, implemented):
                raise ValueError(f"unsupported config: {key}={config[key]!r} (model.py implements {implemented!r})")

        # transformers >= 5 writes rope settings as rope_parameters; older configs use rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope scaling {rope_type!r}: implemented are default, llama3, linear")
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

        if family == "qwen2" and config.get("use_sliding_window"):
            raise ValueError("unsupported config: Qwen2 use_sliding_window=true (per-layer windows)")
        n_heads, bias = config["num_attention_heads"], bool(config.get("attention_bias"))
        return cls(
            family=family, dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            hidden_dim=config["intermediate_size"], vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_seq_len=config.get("max_position_embeddings", 8192),
            # Only Mistral's window is read: Llama configs carry none, and Qwen2's is off (refused above).
            sliding_window=config.get("sliding_window") if family == "mistral" else None,
            qkv_bias=family == "qwen2" or bias,  # Qwen2 always has q, k, v biases
            o_bias=family == "llama" and bias,  # Llama's attention_bias also puts one on o_proj
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_id=config.get("bos_token_id"), eos_ids=common.as_list(config.get("eos_token_id", 2)),
        )


# ---- The network


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
    scaling = args.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
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
        if positions is not None:
            y = decode_attention(q, k, v, mask)
        else:  # mask None: plain causal attention (the fused kernels' fast path)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


def decode_attention(q, k, v, allowed):
    """One query per row over its cached keys: q (B, n_heads, 1, head_dim), k and v (B, n_kv_heads,
    n_keys, head_dim), allowed (B, 1, 1, n_keys) -> (B, n_heads, 1, head_dim). Two batched products and a
    softmax in fp32 (or the inputs' dtype if wider), with the query heads that share a key/value head as
    rows of one product. SDPA with this boolean mask was an order of magnitude slower in bf16 on a CPU, and
    its cost grew with the longest row, so one long row slowed every row's step (README, "Generation
    speed"); in fp32 the two were alike."""
    B, n_heads, _, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    if k.device.type == "cpu" and k.dtype == torch.bfloat16:
        # The CPU's bf16 batched product reads a cache slice (each row's keys a whole cache row apart) about
        # 2.5x slower than a contiguous copy of it, copy included (README, "Generation speed"). In fp32 the
        # copy costs more than it saves; on a GPU it would add a read and a write of the cache (not timed).
        k, v = k.contiguous(), v.contiguous()
    q = q.reshape(B, n_kv_heads, n_heads // n_kv_heads, head_dim)  # query head h uses key/value head h // group
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * head_dim ** -0.5
    scores = scores.masked_fill(~allowed.view(B, 1, 1, n_keys), float("-inf"))  # (B, n_kv_heads, group, n_keys)
    return (torch.softmax(scores, dim=-1).to(v.dtype) @ v).view(B, n_heads, 1, head_dim)


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
        self.largest_cache = (0, 0)  # rows and slots: setup_cache(at_least_largest=True)

    def forward(self, tokens, last_only: bool = False):
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) for the last position only."""
        x = self.hidden_states(tokens)
        return self.lm_head(x[:, -1:] if last_only else x).float()  # logits in fp32 whatever the weights are

    def hidden_states(self, tokens, positions=None, mask=None, cache_rows=None):
        """tokens (B, T) -> final normalised hidden states (B, T, dim), before the output projection
        (training computes logits only where it needs them: the vocabulary is the largest matrix).
        By default positions 0..T-1 and causal attention (within the sliding window); positions (B, T)
        and a boolean mask (B, 1, T, T) lay out rows otherwise (reinforce.pack_replies: several replies
        after one prompt). cache_rows (B,): also write every layer's keys and values into these rows of
        the KV cache (prefill)."""
        T, window = tokens.shape[1], self.args.sliding_window
        if positions is None:
            positions = torch.arange(T, device=tokens.device)[None]  # (1, T)
            if window is not None and T > window:  # None: plain causal, the fused kernels' fast path
                slots = torch.arange(T, device=tokens.device)
                mask = ((slots[None, :] <= slots[:, None]) & (slots[:, None] - slots[None, :] < window))[None, None]
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

    def setup_cache(self, batch_size: int, max_len: int, at_least_largest: bool = False):
        """A KV cache of batch_size rows of max_len slots in every layer. at_least_largest: as many rows and
        slots as the most asked for so far this way, so that calls of different sizes get one shape (a
        compiled decode step specialises on it)."""
        if at_least_largest:
            batch_size, max_len = max(self.largest_cache[0], batch_size), max(self.largest_cache[1], max_len)
            self.largest_cache = (batch_size, max_len)
        p = self.embed.weight
        self.clear_cache()  # the old cache's memory is free before the new one is made
        for layer in self.layers:
            layer.attn.cache = KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device)

    def copy_cache_row(self, source: int, target: int, length: int):
        for layer in self.layers:
            layer.attn.cache.copy_row(source, target, length)

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.cache = None


# ---- Loading weights


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


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | None = None, device=None,
         probe_rows: int = 16):
    """Load (model, tokenizer) from a folder or hub id. Weights are assigned into a meta-device model,
    so nothing is allocated twice. dtype None: T2_DTYPE if set, else bf16 on a GPU; on a CPU fp32, or bf16 when the CPU has bf16 in
    hardware and probe_cpu_dtype finds it faster at probe_rows rows (say how many rows the caller's
    batches have). The choice is printed."""
    folder = common.resolve(name_or_path)
    args = ModelArgs.from_config(common.read_model_config(folder))
    device = torch.device(device) if device is not None else common.default_device()
    dtype = common.weights_dtype(device, dtype)  # None: fp32 now, then the faster of fp32 and bf16 (below)

    with torch.device("meta"):
        model = Transformer(args)
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=True)}

    def ignorable(name):  # a tied checkpoint may store the shared matrix twice; old ones saved the rotary buffer
        return (name == "lm_head.weight" and args.tie_embeddings) or name.endswith("rotary_emb.inv_freq")

    state = common.read_weights(folder, hf_name_map(args), shapes, device, dtype or torch.float32, ignorable)
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_frequencies(args).to(device)
    model.eval().requires_grad_(False)
    if dtype is None:
        common.probe_cpu_dtype(model, probe_rows)
    return model, Tokenizer(folder, args.eos_ids)


