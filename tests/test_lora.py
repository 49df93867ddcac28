"""LoRA (lora.py): the training modes, and a trained file applied for evaluation equals the update
merged into transformers' weights by hand."""

import pytest
import torch
from safetensors.torch import save_file

import lora
import model as m
import svf
from conftest import evaluate_main_inputs

TOKENS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def test_lora_starts_at_the_base_model_and_disables(tiny_llama):
    model, _ = m.load(tiny_llama, device="cpu")
    tokens = torch.randint(3, 96, (2, 10))
    base = model(tokens)
    adapter = lora.LoRA(model, rank=4, alpha=8)
    assert torch.equal(model(tokens), base)  # B = 0
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    with adapter.merged():
        moved = model(tokens)
    with adapter.disabled():
        assert torch.equal(model(tokens), base)
        with adapter.merged():  # nested: back to disabled afterwards, not to training mode
            pass
        assert torch.equal(model(tokens), base)
    assert (moved - base).abs().max() > 1e-3
    assert len(adapter.parameters()) == 2 * 2 * 2  # A and B on q and v of 2 layers


def trained_file(tiny_llama, path, rank=4, alpha=8):
    """A LoRA with random A and nonzero B, saved as train.py saves one."""
    model, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    adapter = lora.LoRA(model, rank=rank, alpha=alpha, seed=1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(std=0.3)
    adapter.save_expert(path, task="arc_easy")
    return adapter.state()


def test_applied_file_equals_transformers_with_the_update_merged(tiny_llama, tmp_path, monkeypatch):
    import transformers

    path = tmp_path / "lora.safetensors"
    state = trained_file(tiny_llama, path, rank=4, alpha=8)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        base = hf(TOKENS).logits
        for i, layer in enumerate(hf.model.layers):  # W + (α/r) B A, α/r = 8/4
            for proj in ("q_proj", "v_proj"):
                delta = 2.0 * state[f"layers.{i}.attn.{proj}.B"] @ state[f"layers.{i}.attn.{proj}.A"]
                getattr(layer.self_attn, proj).weight += delta
        expected = hf(TOKENS).logits
    assert (expected - base).abs().max() > 1e-2  # the update moves the output

    model, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    lora.apply(model, path)
    with torch.no_grad():
        assert (model(TOKENS) - expected).abs().max().item() <= 1e-4

    # evaluate.py --lora evaluates that same model
    model, _, _ = evaluate_main_inputs(monkeypatch, ["--task", "gsm8k", "--limit", "1", "--model", str(tiny_llama), "--lora",
                                                     str(path), "--threads", "1", "--out", str(tmp_path / "e.jsonl")])
    with torch.no_grad():
        assert (model(TOKENS) - expected).abs().max().item() <= 1e-4


def test_bad_files_are_refused_with_what_to_do(tiny_llama, tmp_path):
    model, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    with pytest.raises(FileNotFoundError, match="train one with"):
        lora.apply(model, tmp_path / "missing.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match="truncated"):
        lora.apply(model, tmp_path / "cut.safetensors")

    expert = svf.SVF(model, targets="mlp", parametrization="mask")
    expert.save_expert(tmp_path / "svf.safetensors", task="gsm8k")
    with pytest.raises(ValueError, match="give it as --expert"):
        lora.apply(model, tmp_path / "svf.safetensors")

    state = trained_file(tiny_llama, tmp_path / "lora.safetensors")
    state["layers.1.attn.v_proj.B"] = torch.zeros(7, 4)  # another model's width
    save_file(state, tmp_path / "other.safetensors", metadata={"format": lora.FORMAT, "rank": "4", "alpha": "8"})
    fresh, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="does not fit this model: layers.1.attn.v_proj.B"):
        lora.apply(fresh, tmp_path / "other.safetensors")
