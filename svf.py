"""Singular Value Fine-tuning (SVF), the paper's §3.1 in code.

Every chosen weight matrix is decomposed once, W = U Σ Vᵀ, and SVF learns one vector z per matrix
(one number per singular value) that rescales the singular values:

    scale (the paper's formula)      W' = U diag(σ ⊙ z) Vᵀ,                       z initialised at 1
    mask  (the reference code's)     W' = U diag(σ ⊙ m) Vᵀ · Σσ / Σ(σ ⊙ m),  m = sigmoid(z), z ~ N(0.1, 1e-3)

Both start at (or, for mask, within noise of) the base model. The mask's rescale keeps the nuclear norm
Σσ of every matrix, so the overall size of m is irrelevant and only its shape across σ matters.

    svf = SVF(model, targets="mlp")          # decompose (cached on disk), swap in SVFLinear layers
    loss = ...model(tokens)...               # factored forward, gradients reach z only
    with svf.merged():                       # dense W' in the weights for generation: no per-token cost
        generate.generate(model, ...)
    with svf.disabled():                     # the base model, same weights, for the KL term
        ...
    svf.save_expert("experts/math.safetensors", task="gsm8k")

What this file is not: the RL trainer (reinforce.py) or the adaptation strategies (dispatch.py, cem.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import model as m

TARGETS = {
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
PARAMETRIZATIONS = ("scale", "mask")
EXPERT_FORMAT = "transformer2-svf-expert/1"

# How the training forward applies W'. "factored": y = ((x V) ⊙ σ') Uᵀ, never forming W';
# "materialized": form W' = U diag(σ') Vᵀ once per forward, then one dense product. Chosen by
# bench/svf.py on the default model (see the README's SVF table); both are tested equal.
TRAINING_FORWARD = "factored"


# ---- The scaled singular values and the two forwards


def scaled_sigma(S: torch.Tensor, z: torch.Tensor, parametrization: str) -> torch.Tensor:
    """σ' = σ ⊙ z (scale) or σ ⊙ sigmoid(z) · Σσ / Σ(σ ⊙ sigmoid(z)) (mask). Computed in fp32."""
    if parametrization == "scale":
        return S * z
    masked = S * torch.sigmoid(z)
    return masked * (S.sum() / masked.sum())  # keep the nuclear norm Σσ: at a uniform mask W' = W


def factored_forward(x, U, S, Vh, z, bias, parametrization: str):
    """(..., n) -> (..., m) through U diag(σ') Vᵀ without forming it: costs r(m + n) per row instead of mn."""
    sigma = scaled_sigma(S, z, parametrization).to(x.dtype)
    y = (x @ Vh.transpose(0, 1)) * sigma  # (..., r)
    y = y @ U.transpose(0, 1)  # (..., m)
    return y if bias is None else y + bias


def materialize(U, S, Vh, z, parametrization: str, dtype=None) -> torch.Tensor:
    """W' = U diag(σ') Vᵀ as a dense (m, n) matrix."""
    sigma = scaled_sigma(S, z, parametrization)
    return ((U.float() * sigma) @ Vh.float()).to(dtype or U.dtype)


def materialized_forward(x, U, S, Vh, z, bias, parametrization: str):
    return F.linear(x, materialize(U, S, Vh, z, parametrization, x.dtype), bias)


_compiled = {}


def compiled(fn):
    """torch.compile'd version of a forward (fuses the σ' computation and the scaling into the products).
    Needs a working compiler toolchain (a C++ compiler on CPU, Triton on GPU)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


# ---- The SVF layer


class SVFLinear(nn.Module):
    """A frozen nn.Linear plus its SVD and a trainable z. Three ways to run:
    - training (default): W' applied through the factored or materialized forward, gradients reach z;
    - merged: a dense W' built once (no grad) and used like an ordinary weight, for generation;
    - disabled: the original weight, untouched, for the base policy."""

    def __init__(self, base: nn.Linear, U, S, Vh, parametrization: str, z: torch.Tensor):
        super().__init__()
        self.base = base  # keeps the original weight, never modified
        self.register_buffer("U", U, persistent=False)  # (m, r)
        self.register_buffer("S", S, persistent=False)  # (r,) fp32, descending
        self.register_buffer("Vh", Vh, persistent=False)  # (r, n)
        self.z = nn.Parameter(z)  # (r,) fp32
        self.parametrization = parametrization
        self.mode = "train"  # "train" | "merged" | "disabled"
        self.merged_weight: torch.Tensor | None = None
        self.forward_kind = TRAINING_FORWARD
        self.use_compile = False
        # Mode "rows" (RowAdapter): what the next forward runs each row with.
        self.row_weight: torch.Tensor | None = None
        self.row_groups: list | None = None
        self.row_sigma: torch.Tensor | None = None

    def forward(self, x):
        if self.mode == "disabled":
            return self.base(x)
        if self.mode == "merged":
            return F.linear(x, self.merged_weight, self.base.bias)
        if self.mode == "rows":  # each row of the batch with its own σ' (RowAdapter.set_rows)
            return self.rows_forward(x)
        fn = factored_forward if self.forward_kind == "factored" else materialized_forward
        if self.use_compile:
            fn = compiled(fn)
        return fn(x, self.U, self.S, self.Vh, self.z, self.base.bias, self.parametrization)

    @torch.no_grad()
    def merge(self):
        weight = materialize(self.U, self.S, self.Vh, self.z.detach(), self.parametrization, self.base.weight.dtype)
        # Row-major like nn.Linear's weight: oneDNN's AMX bf16 kernel crashes (SIGFPE) on column-major
        # weights of some shapes, e.g. 32x49152 @ 49152x576.
        self.merged_weight = weight.contiguous()
        self.mode = "merged"

    def unmerge(self):
        self.merged_weight = None
        self.mode = "train"

    def rows_forward(self, x):
        """x (B, T, n): row b through U diag(σ'_b) Vᵀ. One dense weight when every row has the same
        (row_weight), dense weights per group of rows (row_groups), else factored with σ' per row."""
        if self.row_weight is not None:
            return F.linear(x, self.row_weight, self.base.bias)
        if self.row_groups is not None:
            y = x.new_empty(*x.shape[:-1], self.U.shape[0])
            for index, weight in self.row_groups:
                y[index] = F.linear(x[index], weight, self.base.bias)
            return y
        y = (x @ self.Vh.transpose(0, 1)) * self.row_sigma.to(x.dtype)[:, None, :]  # (B, T, r)
        y = y @ self.U.transpose(0, 1)
        return y if self.base.bias is None else y + self.base.bias


# ---- Which matrices, and their SVD (computed once in fp32, cached on disk)


def target_names(model: m.Transformer, targets: str = "mlp", layers=None) -> list[str]:
    """Module names of the matrices SVF adapts, e.g. layers.3.mlp.up_proj."""
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}; choose one of {sorted(TARGETS)}")
    layers = range(model.args.n_layers) if layers is None else sorted(layers)
    bad = [i for i in layers if not 0 <= i < model.args.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {model.args.n_layers} layers")
    names = []
    for i in layers:
        for proj in TARGETS[targets]:
            names.append(f"layers.{i}.{'mlp' if proj in TARGETS['mlp'] else 'attn'}.{proj}")
    return names


def weight_fingerprint(model: m.Transformer, names: list[str]) -> str:
    """A hash of what the SVD depends on: names, shapes, dtypes and cheap statistics of every target
    weight. A different model, target set or changed weights gives a different key."""
    h = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in names:
        w = modules[name].weight.detach()
        stats = torch.stack([w.double().sum(), w.double().square().sum(), w.double().abs().max()]).tolist()
        h.update(json.dumps([name, list(w.shape), str(w.dtype), stats, w.flatten()[:16].double().tolist()]).encode())
    return h.hexdigest()


def svd_cache_path(key: str) -> Path:
    return common.CACHE_DIR / "svd" / f"svd-{key[:20]}.safetensors"


def decompose(model: m.Transformer, names: list[str], cache: bool = True, progress: bool = True):
    """{name: (U, S, Vh)} for each target weight. U and Vh in the weight's dtype and device, S in fp32.
    Reads the on-disk cache when its key matches, else computes the SVD in fp32 and writes the cache
    atomically (temporary file, then rename)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    modules = dict(model.named_modules())
    key = weight_fingerprint(model, names)
    path = svd_cache_path(key)
    device, dtype = modules[names[0]].weight.device, modules[names[0]].weight.dtype
    if cache and path.exists():
        try:
            stored = load_file(path, device=str(device))
            ok = all(f"{n}.{part}" in stored for n in names for part in ("U", "S", "Vh"))
            if ok and _read_key(path) == key:
                return {n: (stored[f"{n}.U"].to(dtype), stored[f"{n}.S"].float(), stored[f"{n}.Vh"].to(dtype)) for n in names}
            print(f"[svf] SVD cache {path} does not match this model; recomputing", file=sys.stderr)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            print(f"[svf] SVD cache {path} is unreadable ({e.__class__.__name__}: {e}); recomputing", file=sys.stderr)

    factors = {}
    for name in tqdm(names, desc="SVD (fp32)", disable=not progress, unit="matrix"):
        w = modules[name].weight.detach().float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (m, r), (r,), (r, n), S descending
        factors[name] = (U.to(dtype).contiguous(), S, Vh.to(dtype).contiguous())
    if cache:
        tensors = {f"{n}.{part}": t.cpu() for n, f in factors.items() for part, t in zip(("U", "S", "Vh"), f)}
        with common.atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"key": key, "names": json.dumps(names)})
    return factors


def _read_key(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("key")


# ---- SVF on a whole model


def initial_z(r: int, parametrization: str, generator=None, init_std: float | None = None) -> torch.Tensor:
    if parametrization == "scale":
        return torch.ones(r)  # z = 1 is W itself
    std = math.sqrt(1e-3) if init_std is None else init_std  # the paper's "mean 0.1, variance 1e-3"
    return 0.1 + std * torch.randn(r, generator=generator)


class SVF:
    """SVF applied to a model: target layers swapped for SVFLinear, one z per matrix."""

    def __init__(self, model: m.Transformer, targets: str = "mlp", parametrization: str = "scale", layers=None,
                 seed: int = 0, init_std: float | None = None, cache: bool = True, progress: bool = True):
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {parametrization!r}; choose one of {PARAMETRIZATIONS}")
        self.model, self.targets, self.parametrization = model, targets, parametrization
        self.layers = None if layers is None else sorted(layers)
        self.names = target_names(model, targets, layers)
        model.requires_grad_(False)  # only z learns: no gradient of a base weight is ever computed or kept
        factors = decompose(model, self.names, cache=cache, progress=progress)
        generator = torch.Generator().manual_seed(seed)
        self.modules: dict[str, SVFLinear] = {}
        for name in self.names:
            parent_name, child = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            U, S, Vh = factors[name]
            z = initial_z(S.numel(), parametrization, generator, init_std).to(S.device)
            layer = SVFLinear(getattr(parent, child), U, S, Vh, parametrization, z)
            setattr(parent, child, layer)
            self.modules[name] = layer
        if progress:
            print(f"[svf] {parametrization} on {targets} ({len(self.names)} matrices): {self.num_parameters():,} trainable "
                  f"parameters (the base model has {sum(p.numel() for p in model.parameters()) - self.num_parameters():,})",
                  file=sys.stderr)

    # -- the trainable vectors

    def parameters(self) -> list[nn.Parameter]:
        return [layer.z for layer in self.modules.values()]

    def num_parameters(self) -> int:
        return sum(z.numel() for z in self.parameters())

    def state(self) -> dict[str, torch.Tensor]:
        """{module name: z}, detached copies on the CPU."""
        return {name: layer.z.detach().float().cpu().clone() for name, layer in self.modules.items()}

    @torch.no_grad()
    def load_state(self, z: dict[str, torch.Tensor]):
        missing = sorted(set(self.names) - set(z))
        if missing:
            raise ValueError(f"z vectors missing for {missing[:3]} ({len(missing)} in all)")
        for name, layer in self.modules.items():
            if z[name].shape != layer.z.shape:
                raise ValueError(f"{name}: z has shape {tuple(z[name].shape)}, this model needs {tuple(layer.z.shape)}")
            layer.z.copy_(z[name].to(layer.z.device, layer.z.dtype))
        for layer in self.modules.values():
            if layer.mode == "merged":
                layer.merge()  # keep a merged model in step with its z

    # -- modes

    def set_mode(self, mode: str):
        for layer in self.modules.values():
            if mode == "merged":
                layer.merge()
            elif layer.mode == "merged":
                layer.unmerge()
            layer.mode = mode

    def mode(self, mode: str):
        """Every target layer in the given mode for the duration, then back to the mode it had."""
        return common.adapter_mode(self, mode)

    def merged(self):
        """Dense W' in every target layer: generation at the base model's speed."""
        return self.mode("merged")

    def disabled(self):
        """The base model (original weights): the reference policy of the KL term."""
        return self.mode("disabled")

    def configure_forward(self, kind: str = TRAINING_FORWARD, use_compile: bool = False):
        if kind not in ("factored", "materialized"):
            raise ValueError(f"unknown forward {kind!r}: factored or materialized")
        for layer in self.modules.values():
            layer.forward_kind, layer.use_compile = kind, use_compile

    def remove(self):
        """Put the original nn.Linear layers back: the model is the base model again."""
        for name, layer in self.modules.items():
            parent_name, child = name.rsplit(".", 1)
            setattr(self.model.get_submodule(parent_name), child, layer.base)
        self.modules = {}

    # -- experts on disk

    def metadata(self, **extra) -> dict[str, str]:
        shapes = {name: list(layer.base.weight.shape) for name, layer in self.modules.items()}
        sigma = torch.cat([layer.S.float().cpu() for layer in self.modules.values()])
        return {
            "format": EXPERT_FORMAT, "param": self.parametrization, "targets": self.targets,
            "layers": json.dumps(self.layers), "shapes": json.dumps(shapes),
            "sigma_fingerprint": hashlib.sha256(sigma.round(decimals=3).numpy().tobytes()).hexdigest()[:16],
            "sigma_sums": json.dumps([float(f"{layer.S.float().sum().item():.5g}") for layer in self.modules.values()]),
            "n_layers": str(self.model.args.n_layers), **{k: str(v) for k, v in extra.items()},
        }

    def save_expert(self, path, **extra):
        """z vectors as safetensors (one tensor per matrix) with metadata; written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        with common.atomic_path(path) as tmp:
            save_file(self.state(), tmp, metadata=self.metadata(**extra))
        return path

    def same_singular_values(self, meta: dict) -> bool:
        """Whether an expert's metadata describes this model's singular values: each matrix's Σσ within
        1% (the same model in bf16 on a GPU and in fp32 on a CPU agree to about 0.1%; other weights of
        the same shapes do not). Experts without the sums compare an exact fingerprint."""
        here = self.metadata()
        if "sigma_sums" not in meta:
            return meta.get("sigma_fingerprint") == here["sigma_fingerprint"]
        theirs, ours = json.loads(meta["sigma_sums"]), json.loads(here["sigma_sums"])
        return len(theirs) == len(ours) and all(abs(a - b) <= 0.01 * abs(b) for a, b in zip(theirs, ours))

    def load_expert(self, path, shuffle_seed: int | None = None):
        """Load an expert's z. An expert from another model of the same shapes loads on purpose
        (cross-model transfer, paper Tables 5 and 9); shuffle_seed permutes each z so it no longer
        follows the order of the singular values (the paper's control)."""
        z, meta = read_expert(path)
        check_fits(self, z, meta, path)
        if not self.same_singular_values(meta):
            print(f"[svf] {path} was trained on a model with other singular values: transferring it by shape "
                  f"(cross-model)", file=sys.stderr)
        if shuffle_seed is not None:
            g = torch.Generator().manual_seed(shuffle_seed)
            z = {name: v[torch.randperm(v.numel(), generator=g)] for name, v in z.items()}
        self.load_state(z)
        return meta


# The largest |z| an expert file may hold, per parametrization. scale: σ' = σ·z, so 10 lets a file grow or
# shrink (or flip) a singular value tenfold; training starts at z = 1 and Adam moves z by about lr per step,
# so a trained expert stays far inside, while a z of 1e30 overflows the activations and the model then
# answers only end-of-text. mask: z is a logit; sigmoid(±30) is within 1e-13 of 1 and 0, so a larger |z|
# changes nothing the mask can express, and below about -88 sigmoid(z) is 0 in fp32, an all-zero mask and
# a 0/0 in the nuclear-norm rescale.
Z_LIMIT = {"scale": 10.0, "mask": 30.0}
RETRAIN = "train it again (python train.py --task gsm8k|mbpp|arc_easy|cls) or restore the file"


def read_expert(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An expert file's {matrix name: z} and metadata, both checked: the metadata's settings
    (expert_settings), at least one z, each a vector of at most Z_LIMIT in size."""
    z, meta = common.read_adapter_file(path, EXPERT_FORMAT, "expert file", "an SVF expert", "python train.py --task gsm8k")
    settings = expert_settings(meta, path)
    if not z:
        raise ValueError(f"{path} holds no z vectors (no tensors at all), so it adapts nothing: the file is damaged "
                         f"or was not written by train.py; {RETRAIN}")
    flat = [name for name, v in z.items() if v.ndim != 1]
    if flat:
        raise ValueError(f"{path}: {flat[0]} has shape {tuple(z[flat[0]].shape)}; a z is a vector (one number per "
                         f"singular value). The file is damaged or was not written by train.py; {RETRAIN}")
    limit = Z_LIMIT[settings["param"]]
    big = [name for name, v in z.items() if v.numel() and v.abs().max() > limit]
    if big:
        largest = z[big[0]].abs().max().item()
        raise ValueError(f"{path}: {big[0]} holds |z| = {largest:.3g}, above the limit of {limit:g} for a {settings['param']} "
                         f"expert ({len(big)} of the file's {len(z)} vectors exceed it); merged, it would scale the "
                         f"singular values so far that the model answers only end-of-text. The training that wrote it "
                         f"diverged or the file is damaged: {RETRAIN}")
    return z, meta


def expert_settings(meta: dict, path) -> dict:
    """An expert's settings from its metadata (a file's strings, several of them JSON), parsed and checked:
    param, targets, layers (None or layer indices), shapes ({matrix: [m, n]}), sigma_sums (numbers or None),
    categories (a classifier's, a tuple, or None). Everything that reads these goes through here, so a
    damaged or hand-edited value is an error naming the file and the key, not a JSONDecodeError,
    TypeError or KeyError deep in the code that uses it."""
    for key, choices in (("param", PARAMETRIZATIONS), ("targets", tuple(TARGETS))):
        if key not in meta:
            raise ValueError(f"{path}: the metadata has no {key!r} (one of {', '.join(choices)}), which every expert "
                             f"train.py writes has: the file is damaged or was not written by train.py; {RETRAIN}")
        if meta[key] not in choices:
            raise ValueError(f"{path}: metadata {key!r} is {meta[key]!r}, not one of {', '.join(choices)}: the file is "
                             f"damaged or was edited by hand; {RETRAIN}")

    def natural(x):  # bool is an int to Python, not a count to us
        return type(x) is int and x >= 0

    def number(x):
        return type(x) in (int, float) and math.isfinite(x)

    def parsed(key, valid, expected):
        if key not in meta:
            return None
        try:
            value = json.loads(meta[key])
            ok = valid(value)
        except (TypeError, ValueError):  # json.JSONDecodeError is a ValueError; TypeError: unhashable items in set()
            ok = False
        if not ok:
            raise ValueError(f"{path}: metadata {key!r} is {str(meta[key])[:200]!r}, not {expected}: the file is "
                             f"damaged or was edited by hand; {RETRAIN}")
        return value

    layers = parsed("layers", lambda v: v is None or isinstance(v, list) and all(map(natural, v)) and len(set(v)) == len(v),
                    "null or a JSON list of distinct layer indices such as [0, 1, 2]")
    shapes = parsed("shapes", lambda v: isinstance(v, dict) and all(
                        isinstance(s, list) and len(s) == 2 and all(natural(n) and n > 0 for n in s) for s in v.values()),
                    'a JSON object of matrix shapes such as {"layers.0.mlp.up_proj": [1536, 576]}')
    sigma_sums = parsed("sigma_sums", lambda v: isinstance(v, list) and all(map(number, v)),
                        "a JSON list of numbers (each matrix's sum of singular values)")
    categories = parsed("categories", lambda v: v is None or isinstance(v, list) and v and len(set(v)) == len(v) and all(
                            isinstance(c, str) and c.strip() for c in v),
                        'null or a JSON list of distinct category names such as ["code", "math", "reasoning"]')
    return dict(param=meta["param"], targets=meta["targets"], layers=layers, shapes=shapes or {},
                sigma_sums=sigma_sums, categories=None if categories is None else tuple(categories))


def check_fits(svf: SVF, z: dict, meta: dict, path):
    settings = expert_settings(meta, path)
    if settings["param"] != svf.parametrization or settings["targets"] != svf.targets:
        raise ValueError(f"{path} is a {settings['param']} expert on {settings['targets']}; this SVF is "
                         f"{svf.parametrization} on {svf.targets}")
    if set(z) != set(svf.names):
        raise ValueError(f"{path} adapts other matrices than this model ({len(z)} vs {len(svf.names)}; "
                         f"e.g. {sorted(set(z) ^ set(svf.names))[:2]}): it was trained for another architecture or layer set")
    wrong = [n for n in svf.names if z[n].numel() != svf.modules[n].z.numel()]
    if wrong:
        raise ValueError(f"{path} does not fit this model: {wrong[0]} has {z[wrong[0]].numel()} singular values "
                         f"in the expert and {svf.modules[wrong[0]].z.numel()} here ({len(wrong)} matrices differ)")
    # Equal z lengths do not make equal matrices: r = min(m, n) hides a change of the longer side
    # (another MLP width), and a z is only meaningful on a matrix of the shape it was trained for.
    shapes = settings["shapes"]
    here = {n: list(svf.modules[n].base.weight.shape) for n in svf.names}
    wrong = [n for n in svf.names if n in shapes and shapes[n] != here[n]]
    if wrong:
        raise ValueError(f"{path} does not fit this model: {wrong[0]} is {tuple(shapes[wrong[0]])} in the expert's model "
                         f"and {tuple(here[wrong[0]])} here ({len(wrong)} matrices differ)")


def apply_expert(model: m.Transformer, path, merge: bool = True, shuffle_seed: int | None = None) -> SVF:
    """SVF with the targets and parametrization an expert file names, its z loaded (permuted with
    shuffle_seed: see SVF.load_expert), merged for generation."""
    _, meta = read_expert(path)
    settings = expert_settings(meta, path)
    outside = [i for i in settings["layers"] or () if i >= model.args.n_layers]
    if outside:
        raise ValueError(f"{path} adapts layers {outside}, and this model has {model.args.n_layers} layers "
                         f"(0-{model.args.n_layers - 1}): the expert was trained for another model; use one trained on this one")
    svf = SVF(model, targets=settings["targets"], parametrization=settings["param"], layers=settings["layers"])
    svf.load_expert(path, shuffle_seed=shuffle_seed)
    if merge:
        svf.set_mode("merged")
    return svf


# ---- Many experts in one batch (serving)


class RowAdapter:
    """Rows of one batch, each with its own expert, mixture or none, in one forward. All experts of a
    model share U and V; only σ' = σ ⊙ z differs, so a row runs through U diag(σ'_row) Vᵀ (factored:
    r(m + n) multiply-adds per row instead of mn, no weight formed) with its own σ'. A forward whose rows
    all use one slot runs that slot's dense weight instead: the base weight, or an expert added with
    merge=True (its W' kept in memory: one more copy of the adapted matrices). generate.Engine calls
    set_rows before every forward; bench/row_experts.py measures this against grouping rows over merged weights.

        rows = RowAdapter(svf)                   # slot 0 is the base model
        math = rows.add(z_math, merge=True)      # a slot per expert, or per request for a mixture
        rows.set_rows([math, 0, math])           # the next forward: rows 0 and 2 with math, 1 with none
    """

    BASE = 0

    def __init__(self, svf: "SVF", strategy: str = "factored"):
        if strategy not in ("factored", "grouped"):
            raise ValueError(f"unknown strategy {strategy!r}: factored or grouped")
        self.svf, self.strategy = svf, strategy
        self.layers = list(svf.modules.values())
        # σ' of every slot, one (slots, r) table per layer; the base model's σ' is σ itself.
        self.sigma = [layer.S[None].clone() for layer in self.layers]
        self.dense: dict[int, list[torch.Tensor]] = {self.BASE: [layer.base.weight.detach() for layer in self.layers]}
        self.free: list[int] = []
        self.in_use = {self.BASE}
        svf.set_mode("rows")

    @torch.no_grad()
    def add(self, z: dict[str, torch.Tensor], merge: bool = False) -> int:
        """A new slot running with z (an expert's or a mixture's {matrix name: z}); merge=True also keeps
        its dense W' for steps whose rows all use it."""
        slot = self.free.pop() if self.free else len(self.sigma[0])
        keep_dense = merge or self.strategy == "grouped"
        dense = []
        for i, (name, layer) in enumerate(self.svf.modules.items()):
            z_layer = z[name].to(layer.S.device, torch.float32)
            sigma = scaled_sigma(layer.S, z_layer, self.svf.parametrization)
            if slot == len(self.sigma[i]):
                self.sigma[i] = torch.cat([self.sigma[i], sigma[None]])
            else:
                self.sigma[i][slot] = sigma
            if keep_dense:
                dense.append(materialize(layer.U, layer.S, layer.Vh, z_layer, self.svf.parametrization,
                                         layer.base.weight.dtype).contiguous())
        if keep_dense:
            self.dense[slot] = dense
        self.in_use.add(slot)
        return slot

    def remove(self, slot: int):
        """Free a slot (a mixture whose request ended); its number may be given to a later add."""
        if slot == self.BASE or slot not in self.in_use:
            raise ValueError(f"slot {slot} is not an added slot")
        self.in_use.discard(slot)
        self.dense.pop(slot, None)
        self.free.append(slot)

    def set_rows(self, slots: list[int]):
        """The slot of each row of the next forward, in row order."""
        first = slots[0]
        if all(s == first for s in slots) and first in self.dense:
            for layer, weight in zip(self.layers, self.dense[first]):
                layer.row_weight, layer.row_groups = weight, None
            return
        if self.strategy == "grouped":
            groups = {}
            for r, s in enumerate(slots):
                groups.setdefault(s, []).append(r)
            device = self.layers[0].S.device
            index = {s: common.to_device(rows, device) for s, rows in groups.items()}
            for i, layer in enumerate(self.layers):
                layer.row_weight = None
                layer.row_groups = [(index[s], self.dense[s][i]) for s in groups]
            return
        index = common.to_device(slots, self.layers[0].S.device)
        for layer, sigma in zip(self.layers, self.sigma):
            layer.row_weight, layer.row_groups, layer.row_sigma = None, None, sigma[index]

    def close(self):
        for layer in self.layers:
            layer.row_weight = layer.row_groups = layer.row_sigma = None
        self.svf.set_mode("train")


# ---- Mixing experts (what few-shot adaptation searches over)


def mix(experts: list[dict[str, torch.Tensor]], alpha: torch.Tensor, parametrization: str, layer_of=None) -> dict[str, torch.Tensor]:
    """z' = Σ_k α_k z_k, mixed in the space of the multiplier that scales σ.

    scale: the multiplier is z itself, so this is the paper's formula as written.
    mask:  the multiplier is sigmoid(z); we mix those (not the raw logits, which the reference code did
           while training through the sigmoid) and divide by Σα: the nuclear-norm rescale makes the
           overall size of a mask irrelevant, and this keeps it inside (0, 1) so it maps back to a z.
    alpha: (K,) one weight per expert, or (K, n_layers) one per expert and layer (layer_of(name) gives
           a module's layer index; by default parsed from "layers.<i>.").
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    if alpha.shape[0] != len(experts):
        raise ValueError(f"alpha has {alpha.shape[0]} rows for {len(experts)} experts")
    layer_of = layer_of or (lambda name: int(name.split(".")[1]))
    mixed = {}
    for name in experts[0]:
        a = alpha if alpha.ndim == 1 else alpha[:, layer_of(name)]
        if parametrization == "scale":
            mixed[name] = sum(a[k] * experts[k][name] for k in range(len(experts)))
        else:
            mask = sum(a[k] * torch.sigmoid(experts[k][name]) for k in range(len(experts))) / a.sum().clamp(min=1e-8)
            mixed[name] = torch.logit(mask.clamp(1e-6, 1 - 1e-6))
    return mixed
