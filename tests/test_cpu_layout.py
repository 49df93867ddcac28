"""The storage layout of the weights: every 2-D weight stays in nn.Linear's row-major contiguous layout
after model.load, an SVF merge and a LoRA apply. oneDNN's AMX bf16 matmul divides by zero (SIGFPE, the
process dies without a traceback) on column-major weights of some shapes, e.g. the output projection
of a 49152-token vocabulary: (32, 49152) @ (49152, 576)."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import lora
import common
import model as m
import svf
from conftest import ROOT
from tiny_models import TINY, write_tiny_tokenizer


@pytest.fixture(autouse=True)
def one_thread_and_private_cache(monkeypatch, tmp_path):
    """One torch thread (tiny matrices gain nothing from threads); the SVD cache in a temporary folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    yield
    torch.set_num_threads(threads)


def assert_row_major(name: str, weight: torch.Tensor):
    assert weight.ndim == 2, name
    assert weight.is_contiguous() and weight.stride()[1] == 1, f"{name}: {tuple(weight.shape)} with strides {weight.stride()}"


def linear_weights(model) -> dict[str, torch.Tensor]:
    """Every weight used as a matrix: nn.Linear weights (the bases inside adapters included), the
    embedding and the output projection."""
    weights = {f"{name}.weight": module.weight for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    weights["embed.weight"] = model.embed.weight
    weights["lm_head.weight"] = model.lm_head.weight
    return weights


def test_loaded_merged_and_lora_weights_are_row_major(tiny_llama, tmp_path):
    model, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    weights = linear_weights(model)
    # Square (q, o), wide (gate, up, lm_head: out >= in) and tall (k, v, down) matrices are all here.
    assert {"layers.0.attn.q_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "lm_head.weight"} <= set(weights)
    for name, weight in weights.items():
        assert_row_major(name, weight)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert_row_major(name, p)

    adapter = svf.SVF(model, targets="all", parametrization="scale", progress=False)
    with torch.no_grad():
        for z in adapter.parameters():
            z.add_(0.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0)))
    with adapter.merged():
        assert adapter.modules
        for name, layer in adapter.modules.items():
            assert layer.merged_weight.shape == layer.base.weight.shape, name
            assert_row_major(name, layer.merged_weight)
            assert_row_major(f"{name}.base", layer.base.weight)
    adapter.remove()

    path = tmp_path / "lora.safetensors"
    lora.LoRA(model, rank=4, alpha=8).save_expert(path)
    fresh, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    applied = lora.apply(fresh, path)
    for name, weight in linear_weights(fresh).items():
        assert_row_major(name, weight)
    for name, module in applied.modules.items():
        assert_row_major(f"{name}.A", module.A)
        assert_row_major(f"{name}.B", module.B)


CRASHING_MATMULS = textwrap.dedent("""
    import sys
    import torch
    import model as m

    torch.manual_seed(0)
    model, _ = m.load(sys.argv[1], dtype=torch.float32, device="cpu")
    W = model.lm_head.weight  # (49152, 576), laid out by model.load
    assert W.data_ptr() == model.embed.weight.data_ptr()
    Wb = W.to(torch.bfloat16)  # what bf16 autocast does to an fp32 weight (it keeps the strides)
    y = torch.randn(32, 576, dtype=torch.bfloat16) @ Wb.t()  # the output projection's forward
    grad_input = torch.randn(32, 49152, dtype=torch.bfloat16) @ Wb  # its backward to the input
    print("shapes", tuple(y.shape), tuple(grad_input.shape), flush=True)
""")


def write_random_model(folder, **config):
    """A random Llama checkpoint folder, written without transformers' (slow, for a 49152 x 576
    embedding) initialisation: its config, random safetensors weights, a word-level tokenizer."""
    import transformers

    cfg = transformers.LlamaConfig(**{**TINY, "bos_token_id": 1, "eos_token_id": 2, "architectures": ["LlamaForCausalLM"], **config})
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(0)
    save_file({name: 0.02 * torch.randn(shape, generator=g) for name, shape in shapes.items()}, folder / "model.safetensors")
    write_tiny_tokenizer(folder, cfg.vocab_size)


def test_bf16_output_projection_of_a_49152_vocab_runs(tmp_path):
    """The output projection of a 49152 x 576 model (SmolLM's shapes) in bf16, forward x @ Wᵀ with
    x (32, 576) and backward g @ W with g (32, 49152), W as model.load lays it out and cast to bf16 as
    autocast does. Run in a subprocess so that a SIGFPE fails this test instead of killing pytest.

    On a CPU without AMX (e.g. AMD EPYC) this passes whatever the layout; on an Intel Xeon with AMX it
    failed (SIGFPE, exit -8) when model.load stored wide projections column-major, since oneDNN's AMX
    bf16 kernel divides by zero for this shape with a column-major weight."""
    folder = tmp_path / "wide_vocab"
    write_random_model(folder, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    result = subprocess.run([sys.executable, "-c", CRASHING_MATMULS, str(folder)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr[-3000:]}"
    assert "shapes (32, 49152) (32, 576)" in result.stdout, result.stdout
