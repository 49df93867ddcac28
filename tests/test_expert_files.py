"""Expert files that are damaged, hand-edited or written by something else stop with an error that names
the file and the metadata key (or tensor) and says what to do, wherever they are read: svf.read_expert,
evaluate.py --expert, dispatch.load_experts and TwoPass (adapt.py). Values that would load silently and
ruin every reply (a z of 1e30, integer z) are refused the same way."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dispatch
import lora
import model as m
import svf
from conftest import evaluate_main_inputs

MATRICES = ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj")


def hand_made_expert(path, z=None, **metadata):
    """An expert file written directly (no model): three z of 8 values; metadata None deletes a key."""
    meta = {"format": svf.EXPERT_FORMAT, "param": "scale", "targets": "mlp", "layers": "[0]",
            "shapes": '{"layers.0.mlp.gate_proj": [8, 16]}', "sigma_sums": "[1.5, 2.0, 2.5]", **metadata}
    z = {name: torch.ones(8) for name in MATRICES} if z is None else z
    save_file(z, path, metadata={k: v for k, v in meta.items() if v is not None})
    return path


@pytest.fixture
def tiny_expert(tiny_llama, tmp_path):
    """A real scale expert of the tiny model, as train.py writes one: (path, z, metadata)."""
    path = tmp_path / "expert.safetensors"
    model, _ = m.load(tiny_llama, device="cpu")
    svf.SVF(model, targets="mlp", parametrization="scale", cache=False, progress=False).save_expert(
        path, task="gsm8k", category="math")
    with safe_open(str(path), "pt") as f:
        return path, {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# The metadata values that gave a raw JSONDecodeError, TypeError or KeyError naming no file.
MALFORMED = [("layers", "[1,"), ("layers", "5"), ("layers", '"0"'), ("layers", "[true]"), ("shapes", "{not json"),
             ("shapes", "[1, 2]"), ("sigma_sums", "oops"), ("sigma_sums", '["a"]'), ("param", None),
             ("targets", None), ("param", "bogus"), ("categories", "[oops"), ("categories", "7")]


@pytest.mark.parametrize("key, value", MALFORMED)
def test_malformed_metadata_names_the_file_and_the_key(tmp_path, key, value):
    path = hand_made_expert(tmp_path / "bad.safetensors", **{key: value})
    with pytest.raises(ValueError) as refused:
        svf.read_expert(path)
    message = str(refused.value)
    assert str(path) in message and repr(key) in message and "train it again" in message


@pytest.mark.parametrize("key, value", [("layers", "[1,"), ("layers", "5"), ("layers", '"0"'), ("shapes", "{not json"),
                                        ("sigma_sums", "oops"), ("param", None), ("targets", None)])
def test_evaluate_names_the_malformed_expert(tiny_expert, tiny_llama, tmp_path, monkeypatch, key, value):
    """evaluate.py --expert with each malformed value of the reproduction stops before evaluating, naming the file."""
    _, z, meta = tiny_expert
    path = tmp_path / "edited.safetensors"
    save_file(z, path, metadata={k: v for k, v in {**meta, key: value}.items() if v is not None})
    with pytest.raises(ValueError) as refused:
        evaluate_main_inputs(monkeypatch, ["--task", "gsm8k", "--limit", "1", "--model", str(tiny_llama),
                                           "--expert", str(path), "--threads", "1"])
    assert str(path) in str(refused.value) and repr(key) in str(refused.value)


def test_adapt_names_a_classifier_with_malformed_categories(tiny_expert, tiny_llama, tmp_path):
    """The experts folder adapt.py reads: a classifier whose categories are not a JSON list is named when
    the folder is read; TwoPass, given such metadata directly, names the expert and the key too."""
    _, z, meta = tiny_expert
    folder = tmp_path / "experts"
    folder.mkdir()
    save_file(z, folder / "gsm8k.safetensors", metadata=meta)
    save_file(z, folder / "cls.safetensors", metadata={**meta, "task": "cls", "category": "classifier",
                                                        "categories": "[oops"})
    with pytest.raises(ValueError, match="'categories'") as refused:
        dispatch.load_experts(folder)
    assert str(folder / "cls.safetensors") in str(refused.value)

    model, _ = m.load(tiny_llama, device="cpu")
    experts = {"math": (z, {**meta, "file": "gsm8k.safetensors"}),
               "classifier": (z, {**meta, "categories": "7", "file": "cls.safetensors"})}
    with pytest.raises(ValueError, match="'categories'") as refused:
        dispatch.TwoPass(model, None, experts)
    assert "cls.safetensors" in str(refused.value)


@pytest.mark.parametrize("param, limit", [("scale", 10.0), ("mask", 30.0)])
def test_huge_finite_z_is_refused(tmp_path, param, limit):
    """A finite z that overflows W' (scale) or underflows the mask to all zeros is refused like a NaN. The
    bound is |z| <= 10 for scale (σ' at most 10σ) and 30 for mask: a file at the bound loads as it is, one
    just past it (or at ±1e30) is refused, naming the file and the vector."""
    at_bound = {name: torch.full((8,), sign * limit) for name, sign in zip(MATRICES, (1, -1, 1))}
    loaded, _ = svf.read_expert(hand_made_expert(tmp_path / "edge.safetensors", z=at_bound, param=param))
    assert all(torch.equal(loaded[name], at_bound[name]) for name in MATRICES)
    for value in (1.05 * limit, -1.05 * limit, 1e30, -1e30):
        z = {name: torch.ones(8) for name in MATRICES}
        z["layers.0.mlp.up_proj"][5] = value
        path = hand_made_expert(tmp_path / "huge.safetensors", z=z, param=param)
        with pytest.raises(ValueError) as refused:
            svf.read_expert(path)
        message = str(refused.value)
        assert str(path) in message and "layers.0.mlp.up_proj" in message and "gate_proj" not in message


def test_evaluate_refuses_a_scale_expert_of_huge_z(tiny_expert, tiny_llama, tmp_path, monkeypatch):
    """The reproduction: every z = 1e30 under scale answered only end-of-text with exit status 0."""
    _, z, meta = tiny_expert
    path = tmp_path / "huge.safetensors"
    save_file({k: torch.full_like(v, 1e30) for k, v in z.items()}, path, metadata=meta)
    with pytest.raises(ValueError, match="diverged or the file is damaged") as refused:
        evaluate_main_inputs(monkeypatch, ["--task", "gsm8k", "--limit", "1", "--model", str(tiny_llama),
                                           "--expert", str(path), "--threads", "1"])
    assert str(path) in str(refused.value)


@pytest.mark.parametrize("dtype, stored", [(torch.int64, "I64"), (torch.int32, "I32"), (torch.uint8, "U8")])
def test_integer_z_is_refused(tmp_path, dtype, stored):
    z = {name: torch.ones(8, dtype=torch.float32) for name in MATRICES}
    z["layers.0.mlp.down_proj"] = torch.full((8,), 2, dtype=dtype)  # an integer z of 2 would read back as 2.0
    path = hand_made_expert(tmp_path / "int.safetensors", z=z)
    with pytest.raises(ValueError) as refused:
        svf.read_expert(path)
    message = str(refused.value)
    assert str(path) in message and "layers.0.mlp.down_proj" in message and stored in message


def test_integer_lora_factors_are_refused(tiny_llama, tmp_path):
    model, _ = m.load(tiny_llama, device="cpu")
    state = {k: v.to(torch.int64) for k, v in lora.LoRA(model, rank=4, alpha=8, dropout=0.0).state().items()}
    path = tmp_path / "lora.safetensors"
    save_file(state, path, metadata={"format": lora.FORMAT, "rank": "4", "alpha": "8"})
    with pytest.raises(ValueError, match="I64") as refused:
        lora.apply(m.load(tiny_llama, device="cpu")[0], path)
    assert str(path) in str(refused.value)


def test_expert_without_tensors_is_refused(tmp_path):
    path = hand_made_expert(tmp_path / "empty.safetensors", z={})
    with pytest.raises(ValueError, match="no z vectors") as refused:
        svf.read_expert(path)
    assert str(path) in str(refused.value)


def test_expert_of_matrices_the_model_lacks_names_the_file(tiny_llama, tmp_path):
    """layers [99] on a two-layer model: the error names the file (it used to name only the layers)."""
    path = hand_made_expert(tmp_path / "deep.safetensors", z={f"layers.99.mlp.{p}": torch.ones(8) for p in
                                                               ("gate_proj", "up_proj", "down_proj")},
                            layers="[99]", shapes=None, sigma_sums=None)
    model, _ = m.load(tiny_llama, device="cpu")
    with pytest.raises(ValueError, match=r"\[99\].*2 layers") as refused:
        svf.apply_expert(model, path)
    assert str(path) in str(refused.value)
