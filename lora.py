"""LoRA, the baseline of the paper's Tables 1, 2 and 4: low-rank updates on the attention's q and v.

    W x + (α/r) B A x, with A (r, in) random, B (out, r) zero, rank 16, α 32, dropout 0.05 (the paper's
    settings). train.py trains it (--method lora) through the same loop as SVF; evaluate.py --lora and
    adapt.py --lora apply a trained file.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import common

FORMAT = "transformer2-lora/1"
PROJECTIONS = ("q_proj", "v_proj")


class LoRALinear(nn.Module):
    """W x + (α/r) B A dropout(x), with A (r, in) random and B (out, r) zero, so training starts at W."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale, self.dropout = alpha / rank, dropout
        self.mode = "train"  # "train" (dropout on) | "eval" (no dropout) | "disabled" (W alone)

    def forward(self, x):
        y = self.base(x)
        if self.mode == "disabled":
            return y
        x = F.dropout(x, self.dropout, training=self.mode == "train")
        return y + (x @ self.A.to(x.dtype).t() @ self.B.to(x.dtype).t()) * self.scale


class LoRA:
    """LoRA on q and v of every layer, with the same interface as svf.SVF so the training loop serves both."""

    def __init__(self, model, rank=16, alpha=32, dropout=0.05, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.modules = {}
        for i, layer in enumerate(model.layers):
            for proj in PROJECTIONS:
                lora = LoRALinear(getattr(layer.attn, proj), rank, alpha, dropout, generator).to(model.embed.weight.device)
                setattr(layer.attn, proj, lora)
                self.modules[f"layers.{i}.attn.{proj}"] = lora
        print(f"[lora] rank {rank} on q and v: {sum(p.numel() for p in self.parameters()):,} trainable parameters", file=sys.stderr)

    def parameters(self):
        return [p for lora in self.modules.values() for p in (lora.A, lora.B)]

    def state(self):
        return {f"{name}.{part}": getattr(lora, part).detach().cpu().clone() for name, lora in self.modules.items() for part in "AB"}

    @torch.no_grad()
    def load_state(self, state):
        for name, lora in self.modules.items():
            lora.A.copy_(state[f"{name}.A"])
            lora.B.copy_(state[f"{name}.B"])

    def set_mode(self, mode):
        for lora in self.modules.values():
            lora.mode = mode

    def mode(self, mode: str):
        """Every LoRA layer in the given mode for the duration, then back to the mode it had."""
        return common.adapter_mode(self, mode)

    def merged(self):
        """What svf.SVF.merged is for the training loop: the adapted model for generation. The low-rank
        update is kept beside W (not folded in); only dropout is off."""
        return self.mode("eval")

    def disabled(self):
        """The base model: the reference policy of the KL term."""
        return self.mode("disabled")

    def save_expert(self, path, **extra):
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "rank": str(self.rank), "alpha": str(self.alpha), "dropout": str(self.dropout)}
        with common.atomic_path(path) as tmp:
            save_file(self.state(), tmp, metadata={**meta, **{k: str(v) for k, v in extra.items()}})
        return Path(path)


def apply(model, path) -> LoRA:
    """Wrap the model's q and v with the LoRA a file holds (train.py --method lora), ready for generation."""
    state, meta = common.read_adapter_file(path, FORMAT, "LoRA file", "a LoRA file",
                                           "python train.py --task arc_easy --method lora")
    rank = next((v.shape[0] for k, v in state.items() if k.endswith(".A")), 16)
    # A file without rank and alpha in its metadata was written with the defaults (alpha 32).
    lora = LoRA(model, rank=int(meta.get("rank", rank)), alpha=float(meta.get("alpha", 32)), dropout=0.0)
    expected = {f"{name}.{part}": tuple(getattr(module, part).shape) for name, module in lora.modules.items() for part in "AB"}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise ValueError(f"{path} does not fit this model: {differ[0]} is {found.get(differ[0])} in the file and "
                         f"{expected.get(differ[0])} here ({len(differ)} tensors differ); it was trained for another model")
    lora.load_state(state)
    lora.set_mode("eval")
    return lora
