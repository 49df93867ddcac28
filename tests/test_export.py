"""export.py: the merged model read back by transformers gives the logits of our model with the expert
merged, in the source checkpoint's dtype and names, tied embeddings kept tied."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import export
import model as m
import svf as svf_lib
from tiny_models import tiny_hf_model

TOKENS = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def random_expert(model, path, parametrization="scale", targets="all", seed=0, task="gsm8k", category="math"):
    """An expert file with z far from its start, so the merged model differs from the base clearly."""
    adapter = svf_lib.SVF(model, targets=targets, parametrization=parametrization, cache=False, progress=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for z in adapter.parameters():
            z.add_(0.5 * torch.randn(z.shape, generator=g))
    adapter.save_expert(path, task=task, category=category)
    return adapter


@pytest.mark.parametrize("family, overrides", [
    ("llama", {}), ("llama", dict(tie_word_embeddings=True, attention_bias=True)),
    ("mistral", dict(sliding_window=8)), ("qwen2", dict(tie_word_embeddings=True)), ("qwen2", {}),
])
def test_transformers_reads_the_merged_model(family, overrides, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tmp_path / "source"
    tiny_hf_model(family, source, **overrides)
    model, _ = m.load(source, dtype=torch.float32, device="cpu")
    base = model(TOKENS)
    adapter = random_expert(model, tmp_path / "expert.safetensors")
    out = export.export(model, adapter, source, tmp_path / "exported", "card")
    with adapter.merged():
        ours = model(TOKENS)
    assert (ours - base).abs().max() > 1e-2  # the expert changes the model: the comparison below can fail
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(TOKENS).logits
    assert (theirs - ours).abs().max().item() <= 1e-4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    tied = overrides.get("tie_word_embeddings", False)
    assert ("lm_head.weight" in names) is not tied
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' private 0600
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_the_source_dtype_is_kept(tmp_path):
    """A bf16 checkpoint exports as bf16: W' is computed in fp32 and cast once."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "source"
    tiny_hf_model("llama", source).to(torch.bfloat16).save_pretrained(source, safe_serialization=True)
    model, _ = m.load(source, dtype=torch.float32, device="cpu")
    adapter = random_expert(model, tmp_path / "expert.safetensors", parametrization="mask", targets="mlp")
    out = export.export(model, adapter, source, tmp_path / "exported", "card")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        merged = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    with adapter.merged():
        expected = model.layers[0].mlp.up_proj.merged_weight.to(torch.bfloat16)
    assert torch.equal(merged, expected)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_export_command_with_a_mixture(tmp_path, capsys):
    """export.py --experts DIR --alpha: the mixture svf.mix gives, merged; one-hot α equals that expert."""
    source = tmp_path / "source"
    tiny_hf_model("llama", source)
    model, _ = m.load(source, dtype=torch.float32, device="cpu")
    for seed, (task, category) in enumerate([("gsm8k", "math"), ("mbpp", "code")]):
        random_expert(model, tmp_path / "experts" / f"{task}.safetensors", targets="mlp", seed=seed, task=task,
                      category=category).remove()
    export.main(["--experts", str(tmp_path / "experts"), "--alpha", "code=0,math=1", "--model", str(source),
                 "--out", str(tmp_path / "mix"), "--threads", "1"])
    export.main(["--expert", str(tmp_path / "experts" / "gsm8k.safetensors"), "--model", str(source),
                 "--out", str(tmp_path / "one"), "--threads", "1"])
    with safe_open(str(tmp_path / "mix" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as b:
        assert all(torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-6) for k in a.keys())
    assert "math α=1" in (tmp_path / "mix" / "README.md").read_text()
    assert "| math | gsm8k.safetensors | gsm8k |" in (tmp_path / "one" / "README.md").read_text()  # named by category
    with pytest.raises(SystemExit):
        export.main(["--experts", str(tmp_path / "experts"), "--alpha", "poetry=1", "--model", str(source),
                     "--out", str(tmp_path / "bad")])
    assert "poetry" in capsys.readouterr().err


def test_the_default_model_with_a_shipped_expert(tmp_path):
    """The real model and the shipped math expert: transformers on the export equals ours merged."""
    from transformers import AutoModelForCausalLM

    import common

    source = common.resolve(m.DEFAULT_MODEL)
    model, tokenizer = m.load(source, dtype=torch.float32, device="cpu")
    adapter = svf_lib.apply_expert(model, export.ROOT / "experts" / "math.safetensors", merge=False)
    out = export.export(model, adapter, source, tmp_path / "exported", "card")
    tokens = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": "What is 12 times 7?"}])])
    with adapter.merged():
        ours = model(tokens)
    with adapter.disabled():
        base = model(tokens)
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert (ours - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max().item() <= 1e-4


def bpe_tokenizer(folder, vocab_size):
    """Replace the tiny model's word-level tokenizer with a byte-level BPE one over the same words (no
    merges): the kind GGUF export writes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("llama", dict(tie_word_embeddings=True)),
                                               ("qwen2", dict(tie_word_embeddings=True))])
def test_gguf_holds_the_merged_tensors(family, overrides, tmp_path):
    """Read back with the gguf package (llama.cpp's reader) and its q/k rows put back in Hugging Face
    order (convert_gguf.unpermute_qk, itself checked against llama.cpp's permute), every tensor of the
    GGUF equals the exported folder's."""
    import gguf

    import convert_gguf

    source = tmp_path / "source"
    tiny_hf_model(family, source, **overrides)
    bpe_tokenizer(source, 96)
    model, _ = m.load(source, dtype=torch.float32, device="cpu")
    adapter = random_expert(model, tmp_path / "expert.safetensors")
    out = export.export(model, adapter, source, tmp_path / "exported", "card", tmp_path / "model.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = {"llama": "llama", "qwen2": "qwen2"}[family]
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.attention.head_count_kv"] == 2 and fields["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(k).numpy() for k in f.keys()}
    read = {}
    for tensor in reader.tensors:
        values = tensor.data.reshape(tuple(reversed(tensor.shape.tolist())))
        name = convert_gguf.hf_name(tensor.name) if not tensor.name.endswith(".bias") else \
            convert_gguf.hf_name(tensor.name.replace(".bias", ".weight")).replace(".weight", ".bias")
        if family == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            values = convert_gguf.unpermute_qk(values, 4 if "attn_q" in tensor.name else 2)
        read[name] = values
    assert set(read) == set(exported)
    for name, values in exported.items():
        assert (read[name] == values).all(), name


def test_default_model_gguf_through_transformers(tmp_path):
    """transformers' own GGUF loader (its config, q/k un-permute and tokenizer) on the exported GGUF of
    the default model with the shipped math expert gives our merged logits and our tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import common

    source = common.resolve(m.DEFAULT_MODEL)
    model, tokenizer = m.load(source, dtype=torch.float32, device="cpu")
    adapter = svf_lib.apply_expert(model, export.ROOT / "experts" / "math.safetensors", merge=False)
    export.export(model, adapter, source, tmp_path / "exported", "card", tmp_path / "math.gguf", "f32")
    text = "What is 12 times 7? Answer: 84."
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="math.gguf")
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
    tokens = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": text}])])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="math.gguf", torch_dtype=torch.float32).eval()
    with adapter.merged():
        ours = model(tokens)
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert (theirs - ours).abs().max().item() <= 1e-4
