"""svf.py on tiny random Llama and Qwen2 models: the base model back at initialisation, every forward
against the others and against formulas computed independently with numpy, gradients that reach z
only, the SVD cache, expert files, mixing, and the errors for bad input."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import common
import model as m
import svf
from conftest import evaluate_main_inputs
from tiny_models import tiny_hf_model

TOKENS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread_and_private_cache(monkeypatch, tmp_path):
    """One torch thread: on a loaded 2-core machine a 2-thread LAPACK SVD of a 96x64 matrix takes
    ~0.4 s instead of 0.5 ms (its threads wait on each other at every step behind a busy core), and
    tiny matrices gain nothing from threads. The SVD cache goes to a temporary folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_hf_model("qwen2", folder)  # q/k/v biases, perturbed away from 0 by tiny_hf_model
    return folder


@pytest.fixture(scope="module")
def tiny_llama_other_seed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_seed1")
    tiny_hf_model("llama", folder, seed=1)
    return folder


def load(folder):
    model, _ = m.load(folder, dtype=torch.float32, device="cpu")
    return model


def random_z(adapter, seed=0, scale=0.5):
    """A non-trivial z: far from the initialisation, different for every singular value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for z in adapter.parameters():
            z.copy_(z + scale * torch.randn(z.shape, generator=g))


def count_svd_calls(monkeypatch) -> list:
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(args[0].shape)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    return calls


# ----------------------------------------------------------------------------------------------
# The formulas, by hand


def test_materialize_matches_numpy_svd():
    """W' = U diag(σ z) Vᵀ (scale) and U diag(σ m) Vᵀ Σσ/Σ(σ m), m = sigmoid(z) (mask), built from numpy's
    SVD, against svf.materialize on torch's SVD; the mask keeps the nuclear norm."""
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (4, 9)]:
        W = rng.standard_normal(shape).astype(np.float32)
        U, S, Vt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
        z = rng.normal(0.0, 1.0, size=S.shape)
        Ut, St, Vht = torch.linalg.svd(torch.from_numpy(W), full_matrices=False)
        zt = torch.tensor(z, dtype=torch.float32)

        expected = U @ np.diag(S * z) @ Vt
        got = svf.materialize(Ut, St, Vht, zt, "scale").double().numpy()
        assert np.abs(got - expected).max() <= 1e-5

        mask = 1 / (1 + np.exp(-z))
        expected = U @ np.diag(S * mask) @ Vt * S.sum() / (S * mask).sum()
        got = svf.materialize(Ut, St, Vht, zt, "mask").double().numpy()
        assert np.abs(got - expected).max() <= 1e-5
        assert np.linalg.norm(got, "nuc") == pytest.approx(np.linalg.norm(W, "nuc"), rel=1e-5)
        assert np.linalg.norm(got, "nuc") == pytest.approx(S.sum(), rel=1e-5)
        # ... whereas the plain mask, without the rescale, shrinks it
        assert np.linalg.norm(U @ np.diag(S * mask) @ Vt, "nuc") < 0.9 * S.sum()


def test_decompose_gives_numpys_singular_values(tiny_llama):
    model = load(tiny_llama)
    names = svf.target_names(model, "all")
    factors = svf.decompose(model, names, cache=False, progress=False)
    for name in names:
        W = model.get_submodule(name).weight.detach().double().numpy()
        U, S, Vh = factors[name]
        assert S.dtype == torch.float32 and U.shape == (W.shape[0], min(W.shape)) and Vh.shape == (min(W.shape), W.shape[1])
        assert np.allclose(S.numpy(), np.linalg.svd(W, compute_uv=False), atol=1e-5)
        assert np.abs((U.double() * S.double()) @ Vh.double() - W).max().item() <= 1e-5


def test_parameter_count_hand_computed(tiny_llama):
    """Tiny config: dim 64, MLP 96, 4 heads x 16, 2 kv heads, 2 layers. r = min(out, in) per matrix:
    q (64x64) 64, k and v (32x64) 32, o (64x64) 64; gate, up (96x64) and down (64x96) 64 each."""
    mlp, attn = 64 + 64 + 64, 64 + 32 + 32 + 64
    for targets, per_layer in [("mlp", mlp), ("attn", attn), ("all", mlp + attn)]:
        model = load(tiny_llama)
        adapter = svf.SVF(model, targets=targets, progress=False)
        assert adapter.num_parameters() == 2 * per_layer
        assert len(adapter.parameters()) == 2 * len(svf.TARGETS[targets])


# ----------------------------------------------------------------------------------------------
# The base model at initialisation


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_identity_at_initialisation(family, tiny_llama, tiny_qwen2):
    folder = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    model = load(folder)
    if family == "qwen2":
        assert model.layers[0].attn.q_proj.bias is not None  # the biases ride along unchanged
    with torch.no_grad():
        base = model(TOKENS)
        for targets in svf.TARGETS:
            for param, init_std in [("scale", None), ("mask", 0.0)]:
                adapter = svf.SVF(model, targets=targets, parametrization=param, init_std=init_std, progress=False)
                assert (model(TOKENS) - base).abs().max().item() <= 1e-4, (targets, param)
                adapter.remove()
            # The paper's mask init, z ~ N(0.1, var 1e-3), is only near the base model: the noise in z
            # reweights the singular values by ~1%.
            adapter = svf.SVF(model, targets=targets, parametrization="mask", progress=False)
            difference = (model(TOKENS) - base).abs().max().item()
            assert 1e-4 < difference < 0.1, (targets, difference)
            adapter.remove()
        assert torch.equal(model(TOKENS), base)


# ----------------------------------------------------------------------------------------------
# The forwards, merge and remove


def forward_and_grads(model, adapter):
    for z in adapter.parameters():
        z.grad = None
    logits = model(TOKENS)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), [z.grad.clone() for z in adapter.parameters()]


def test_factored_and_materialized_forwards_agree_with_merged(tiny_llama):
    model = load(tiny_llama)
    with torch.no_grad():
        base = model(TOKENS)
    adapter = svf.SVF(model, targets="all", parametrization="mask", progress=False)
    random_z(adapter)
    adapter.configure_forward("factored")
    factored, factored_grads = forward_and_grads(model, adapter)
    adapter.configure_forward("materialized")
    materialized, materialized_grads = forward_and_grads(model, adapter)
    assert (factored - base).abs().max().item() > 1e-2  # z does change the model
    assert (materialized - factored).abs().max().item() <= 1e-5
    for a, b in zip(materialized_grads, factored_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    with adapter.merged(), torch.no_grad():
        assert (model(TOKENS) - factored).abs().max().item() <= 1e-5


def test_compiled_forwards_agree_with_eager(tmp_path):
    """torch.compile'd training forwards, values and z gradients. Every shape pattern (which of m, n, r
    are equal) and grad mode compiles its own graph, a few seconds each on 2 cores: one layer's MLP of
    square matrices keeps this test to one pattern per forward."""
    tiny_hf_model("llama", tmp_path / "square", intermediate_size=64)
    model = load(tmp_path / "square")
    adapter = svf.SVF(model, targets="mlp", parametrization="mask", layers=[1], progress=False)
    random_z(adapter)
    for kind in ("factored", "materialized"):
        adapter.configure_forward(kind, use_compile=False)
        eager, eager_grads = forward_and_grads(model, adapter)
        adapter.configure_forward(kind, use_compile=True)
        compiled, compiled_grads = forward_and_grads(model, adapter)
        assert (compiled - eager).abs().max().item() <= 1e-5, kind
        for a, b in zip(compiled_grads, eager_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), kind


def test_merge_disable_and_remove_leave_the_base_weights_untouched(tiny_llama):
    model = load(tiny_llama)
    weights_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    strides_before = {name: p.stride() for name, p in model.named_parameters()}
    up_before = model.layers[0].mlp.up_proj
    with torch.no_grad():
        base = model(TOKENS)

    adapter = svf.SVF(model, targets="all", parametrization="scale", progress=False)
    random_z(adapter)
    with torch.no_grad():
        trained = model(TOKENS)
        with adapter.merged():
            assert (model(TOKENS) - trained).abs().max().item() <= 1e-5
            for name, layer in adapter.modules.items():
                # nn.Linear's row-major layout, as model.load gives it
                out_features, in_features = layer.base.weight.shape
                assert layer.merged_weight.stride() == (in_features, 1) == layer.base.weight.stride(), name
        with adapter.disabled():
            assert torch.equal(model(TOKENS), base)
        assert torch.equal(model(TOKENS), trained)  # back in training mode
        for mode in ("merged", "disabled", "merged", "train"):
            adapter.set_mode(mode)
        assert all(layer.merged_weight is None for layer in adapter.modules.values())
        assert torch.equal(model(TOKENS), trained)

    adapter.remove()
    assert model.layers[0].mlp.up_proj is up_before and type(up_before) is nn.Linear
    assert not any(isinstance(module, svf.SVFLinear) for module in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, weights_before[name]) and p.stride() == strides_before[name], name
    with torch.no_grad():
        assert torch.equal(model(TOKENS), base)


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("param", svf.PARAMETRIZATIONS)
def test_gradients_reach_z_only_and_a_step_raises_the_target(param, tiny_llama):
    model = load(tiny_llama)
    model.requires_grad_(True)  # SVF must freeze the base itself, whatever the caller left trainable
    adapter = svf.SVF(model, targets="all", parametrization=param, progress=False)
    z_ids = {id(z) for z in adapter.parameters()}
    target = 7

    def loss_fn():
        return -torch.log_softmax(model(TOKENS)[:, -1], dim=-1)[:, target].mean()  # raise the target's logit

    loss = loss_fn()
    loss.backward()
    for name, p in model.named_parameters():
        if id(p) not in z_ids:
            assert not p.requires_grad and p.grad is None, name
    for name, layer in adapter.modules.items():
        assert layer.z.grad is not None and layer.z.grad.abs().sum() > 0, name
    total = torch.sqrt(sum(z.grad.square().sum() for z in adapter.parameters()))
    with torch.no_grad():
        for z in adapter.parameters():
            z -= 0.05 * z.grad / total  # a small step against the gradient
        assert loss_fn() < loss - 1e-4


# ----------------------------------------------------------------------------------------------
# The SVD cache


def test_svd_cache_is_read_back_and_written_atomically(tiny_llama, monkeypatch):
    calls = count_svd_calls(monkeypatch)
    model = load(tiny_llama)
    adapter = svf.SVF(model, targets="all", progress=False)
    assert len(calls) == 14  # 2 layers x 7 matrices
    first = {name: (layer.U.clone(), layer.S.clone(), layer.Vh.clone()) for name, layer in adapter.modules.items()}
    adapter.remove()

    second = svf.SVF(load(tiny_llama), targets="all", progress=False)  # a fresh model, same weights
    assert len(calls) == 14  # read from the cache: no new SVD
    for name, layer in second.modules.items():
        assert all(torch.equal(a, b) for a, b in zip(first[name], (layer.U, layer.S, layer.Vh))), name
    files = sorted(p.name for p in (common.CACHE_DIR / "svd").iterdir())
    assert len(files) == 1 and files[0].endswith(".safetensors")  # no .tmp left behind


def test_svd_cache_write_interrupted_leaves_no_cache_file(tiny_llama, monkeypatch):
    """A writer killed half-way leaves at most a temporary file, never a partial file at the cache path."""
    import safetensors.torch

    model = load(tiny_llama)
    path = svf.svd_cache_path(svf.weight_fingerprint(model, svf.target_names(model, "mlp")))
    real_save = safetensors.torch.save_file

    def save_half_then_die(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        svf.SVF(model, targets="mlp", progress=False)
    assert not path.exists()
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    calls = count_svd_calls(monkeypatch)
    svf.SVF(load(tiny_llama), targets="mlp", progress=False)
    assert len(calls) == 6 and path.exists() and svf._read_key(path) is not None


def test_stale_svd_cache_is_not_reused(tiny_llama, monkeypatch):
    calls = count_svd_calls(monkeypatch)
    model = load(tiny_llama)
    svf.SVF(model, targets="mlp", progress=False).remove()
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[5, 3] += 0.05  # other weights: another key, another file
    adapter = svf.SVF(model, targets="mlp", progress=False)
    assert len(calls) == 12
    assert len(list((common.CACHE_DIR / "svd").glob("*.safetensors"))) == 2
    layer = adapter.modules["layers.1.mlp.up_proj"]
    rebuilt = (layer.U * layer.S) @ layer.Vh
    assert (rebuilt - layer.base.weight).abs().max().item() <= 1e-5  # the factors of the changed weight


@pytest.mark.parametrize("damage", ["garbage", "truncated", "another_models_cache"])
def test_damaged_svd_cache_is_recomputed_and_rewritten(damage, tiny_llama, tiny_llama_other_seed, monkeypatch, capsys):
    model = load(tiny_llama)
    names = svf.target_names(model, "mlp")
    key = svf.weight_fingerprint(model, names)
    path = svf.svd_cache_path(key)
    path.parent.mkdir(parents=True)
    if damage == "garbage":
        path.write_bytes(b"\x00\xff not a safetensors file" * 10)
    elif damage == "truncated":
        svf.SVF(load(tiny_llama), targets="mlp", progress=False)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a readable cache written for other weights, sitting at this model's path
        other = load(tiny_llama_other_seed)
        other_path = svf.svd_cache_path(svf.weight_fingerprint(other, names))
        svf.SVF(other, targets="mlp", progress=False)
        path.write_bytes(other_path.read_bytes())
    capsys.readouterr()

    calls = count_svd_calls(monkeypatch)
    adapter = svf.SVF(model, targets="mlp", progress=False)
    assert len(calls) == 6
    message = capsys.readouterr().err
    assert str(path) in message and "recomputing" in message
    assert ("does not match" if damage == "another_models_cache" else "unreadable") in message
    stored = load_file(path)  # rewritten, readable, and this model's
    assert svf._read_key(path) == key
    for name, layer in adapter.modules.items():
        assert torch.equal(stored[f"{name}.S"], layer.S)
        assert (((layer.U * layer.S) @ layer.Vh) - layer.base.weight).abs().max().item() <= 1e-5
    assert not list(path.parent.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# Experts on disk


def trained_expert(folder, path, targets="all", parametrization="mask", layers=None, seed=0):
    adapter = svf.SVF(load(folder), targets=targets, parametrization=parametrization, layers=layers, progress=False)
    random_z(adapter, seed)
    adapter.save_expert(path, task="gsm8k")
    return adapter


def test_expert_round_trip(tiny_llama, tmp_path, capsys):
    path = tmp_path / "experts" / "math.safetensors"
    trained = trained_expert(tiny_llama, path)
    assert not list(path.parent.glob("*.tmp"))
    with torch.no_grad():
        expected = trained.model(TOKENS)
    capsys.readouterr()
    adapter = svf.SVF(load(tiny_llama), targets="all", parametrization="mask", progress=False)
    meta = adapter.load_expert(path)
    assert meta["task"] == "gsm8k" and meta["param"] == "mask" and meta["targets"] == "all"
    assert "cross-model" not in capsys.readouterr().err  # the same model: no transfer note
    for name, z in trained.state().items():
        assert torch.equal(adapter.state()[name], z), name
    with torch.no_grad():
        assert torch.equal(adapter.model(TOKENS), expected)


@pytest.mark.parametrize("overrides", [dict(intermediate_size=128), dict(intermediate_size=48), dict(num_hidden_layers=3)])
def test_expert_on_other_shapes_is_refused(overrides, tiny_llama, tmp_path):
    """intermediate_size 128 keeps every r = min(m, n) = 64 (only the shapes tell), 48 changes r, 3 layers
    change the set of matrices."""
    path = tmp_path / "expert.safetensors"
    trained_expert(tiny_llama, path)
    tiny_hf_model("llama", tmp_path / "other", **overrides)
    adapter = svf.SVF(load(tmp_path / "other"), targets="all", parametrization="mask", progress=False)
    before = adapter.state()
    with pytest.raises(ValueError, match="does not fit this model|other matrices"):
        adapter.load_expert(path)
    assert all(torch.equal(before[n], z) for n, z in adapter.state().items())  # nothing half-loaded


def test_expert_of_other_param_or_targets_is_refused(tiny_llama, tmp_path):
    path = tmp_path / "expert.safetensors"
    trained_expert(tiny_llama, path, targets="mlp", parametrization="mask")
    for targets, param in [("mlp", "scale"), ("all", "mask")]:
        adapter = svf.SVF(load(tiny_llama), targets=targets, parametrization=param, progress=False)
        with pytest.raises(ValueError, match="is a mask expert on mlp"):
            adapter.load_expert(path)


def test_bad_expert_files_give_clear_errors(tiny_llama, tmp_path):
    adapter = svf.SVF(load(tiny_llama), targets="mlp", progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        adapter.load_expert(tmp_path / "missing.safetensors")
    save_file({"layers.0.mlp.up_proj": torch.ones(64)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="is not an SVF expert"):
        adapter.load_expert(tmp_path / "weights.safetensors")
    good = tmp_path / "good.safetensors"
    adapter.save_expert(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        adapter.load_expert(truncated)


def test_cross_model_transfer_and_shuffled_control(tiny_llama, tiny_llama_other_seed, tmp_path, capsys):
    """Same shapes, other weights: the expert loads by shape and says so. shuffle_seed permutes each z."""
    path = tmp_path / "expert.safetensors"
    trained = trained_expert(tiny_llama, path, targets="mlp", parametrization="scale").state()
    capsys.readouterr()
    adapter = svf.SVF(load(tiny_llama_other_seed), targets="mlp", parametrization="scale", progress=False)
    adapter.load_expert(path)
    assert "cross-model" in capsys.readouterr().err
    assert all(torch.equal(adapter.state()[n], z) for n, z in trained.items())

    # The same model in bf16 (as on a GPU) has the same singular values to ~0.1%: no note.
    bf16, _ = m.load(tiny_llama, dtype=torch.bfloat16, device="cpu")
    svf.SVF(bf16, targets="mlp", parametrization="scale", progress=False).load_expert(path)
    assert "cross-model" not in capsys.readouterr().err

    adapter.load_expert(path, shuffle_seed=3)
    shuffled = adapter.state()
    for name, z in trained.items():
        assert torch.equal(shuffled[name].sort().values, z.sort().values), name  # the same values ...
        assert not torch.equal(shuffled[name], z), name  # ... in another order
    adapter.load_expert(path, shuffle_seed=3)
    assert all(torch.equal(adapter.state()[n], z) for n, z in shuffled.items())  # reproducible
    adapter.load_expert(path, shuffle_seed=4)
    assert not all(torch.equal(adapter.state()[n], z) for n, z in shuffled.items())


def test_apply_expert_and_evaluate_uses_it(tiny_llama, tmp_path, monkeypatch):
    path = tmp_path / "expert.safetensors"
    trained = trained_expert(tiny_llama, path, targets="attn", parametrization="mask", layers=[1])
    with torch.no_grad():
        expected = trained.model(TOKENS)

    model = load(tiny_llama)
    adapter = svf.apply_expert(model, path)
    assert (adapter.targets, adapter.parametrization, adapter.names) == ("attn", "mask", svf.target_names(model, "attn", [1]))
    assert all(layer.mode == "merged" for layer in adapter.modules.values())
    with torch.no_grad():
        assert (model(TOKENS) - expected).abs().max().item() <= 1e-5

    # evaluate.py --expert: the model it evaluates is the merged expert
    model, _, _ = evaluate_main_inputs(monkeypatch, ["--task", "gsm8k", "--limit", "1", "--model", str(tiny_llama), "--expert",
                                                     str(path), "--threads", "1", "--out", str(tmp_path / "e.jsonl")])
    with torch.no_grad():
        assert (model(TOKENS) - expected).abs().max().item() <= 1e-5
    assert any(isinstance(mod, svf.SVFLinear) and mod.mode == "merged" for mod in model.modules())


@pytest.mark.parametrize("trained_rule, flag, strict", [("strict", None, True), ("strict", "lenient", False),
                                                        (None, None, False), (None, "strict", True)])
def test_evaluate_scores_a_classifier_with_the_rule_it_was_trained_with(tiny_llama, tmp_path, monkeypatch,
                                                                         trained_rule, flag, strict):
    """evaluate.py --task cls --expert F reads replies with F's label rule (train.py --label-rule);
    --label-rule overrides it; files that do not say are read leniently."""
    path = tmp_path / "classifier.safetensors"
    adapter = svf.SVF(load(tiny_llama), targets="attn", parametrization="mask", progress=False)
    adapter.save_expert(path, task="cls", **({"label_rule": trained_rule} if trained_rule else {}))
    argv = ["--task", "cls", "--limit", "1", "--model", str(tiny_llama), "--expert", str(path), "--threads", "1"]
    _, _, task = evaluate_main_inputs(monkeypatch, [*argv, *(["--label-rule", flag] if flag else [])])
    # an unboxed right label scores only under the lenient rule
    assert task.score({"label": "code"}, "Classification: Code") is (not strict)


# ----------------------------------------------------------------------------------------------
# Mixing experts


def test_mixing_scale_and_mask():
    names = ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    g = torch.Generator().manual_seed(0)
    experts = [{n: torch.randn(6, generator=g) for n in names} for _ in range(2)]
    z0, z1 = experts

    # scale: z' = Σ α_k z_k, the paper's formula
    assert all(torch.equal(svf.mix(experts, torch.tensor([1.0, 0.0]), "scale")[n], z0[n]) for n in names)
    mean = svf.mix(experts, torch.tensor([0.5, 0.5]), "scale")
    assert all(torch.allclose(mean[n], (z0[n] + z1[n]) / 2, atol=1e-7) for n in names)

    # mask: mix m = sigmoid(z), divide by Σα, map back through the logit
    for alpha in ([1.0, 0.0], [3.0, 0.0], [0.0, 1.0]):
        one = svf.mix(experts, torch.tensor(alpha), "mask")
        chosen = experts[int(alpha[1] > 0)]
        assert all((one[n] - chosen[n]).abs().max().item() <= 1e-5 for n in names)
    mixed = svf.mix(experts, torch.tensor([0.25, 1.0]), "mask")
    for n in names:
        s0, s1 = (1 / (1 + np.exp(-z[n].double().numpy())) for z in (z0, z1))
        mask = (0.25 * s0 + 1.0 * s1) / 1.25
        assert np.abs(mixed[n].double().numpy() - np.log(mask / (1 - mask))).max() <= 1e-5
        raw = (0.25 * z0[n] + 1.0 * z1[n]) / 1.25  # not the reference code's mix of raw logits
        assert (mixed[n] - raw).abs().max().item() > 1e-3

    # per layer: α of shape (K, n_layers), here layer 0 from expert 0 and layer 1 from expert 1
    per_layer = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for param, tolerance in [("scale", 0.0), ("mask", 1e-5)]:
        mixed = svf.mix(experts, per_layer, param)
        assert (mixed[names[0]] - z0[names[0]]).abs().max().item() <= tolerance
        assert (mixed[names[1]] - z1[names[1]]).abs().max().item() <= tolerance
    with pytest.raises(ValueError, match="2 experts"):
        svf.mix(experts, torch.tensor([1.0, 0.0, 0.0]), "scale")


# ----------------------------------------------------------------------------------------------
# Which layers, and errors


def test_layers_subset_and_bad_arguments(tiny_llama):
    model = load(tiny_llama)
    with torch.no_grad():
        base = model(TOKENS)
    for kwargs, message in [(dict(layers=[2]), "out of range"), (dict(layers=[-1]), "out of range"),
                            (dict(targets="mlps"), "unknown targets"), (dict(parametrization="lora"), "unknown parametrization")]:
        with pytest.raises(ValueError, match=message):
            svf.SVF(model, **kwargs, progress=False)
    assert not any(isinstance(module, svf.SVFLinear) for module in model.modules())  # refused before any change

    adapter = svf.SVF(model, targets="mlp", layers=[0], progress=False)
    assert adapter.names == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    assert adapter.num_parameters() == 3 * 64
    assert isinstance(model.layers[0].mlp.up_proj, svf.SVFLinear)
    assert all(type(model.layers[1].mlp.get_submodule(p)) is nn.Linear for p in svf.TARGETS["mlp"])
    assert not any(isinstance(module, svf.SVFLinear) for module in model.layers[0].attn.modules())
    random_z(adapter)
    with torch.no_grad():
        assert (model(TOKENS) - base).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="unknown forward"):
        adapter.configure_forward("dense")


@pytest.mark.parametrize("strategy", ["factored", "grouped"])
def test_row_adapter_runs_each_row_with_its_own_expert(tiny_llama, strategy):
    """One forward over rows with different experts, a mixture and none equals, row by row, the forward
    of that row alone with its expert merged (SVF.merged) or the base weights (SVF.disabled)."""
    model, _ = m.load(tiny_llama, dtype=torch.float64, device="cpu")
    adapter = svf.SVF(model, targets="mlp", parametrization="mask", cache=False, progress=False)
    g = torch.Generator().manual_seed(3)
    zs = [{n: torch.randn(layer.z.numel(), generator=g, dtype=torch.float64) for n, layer in adapter.modules.items()}
          for _ in range(3)]
    zs.append(svf.mix(zs[:2], torch.tensor([0.3, 0.9]), "mask"))
    tokens = torch.randint(3, 96, (6, 5), generator=g)
    choice = [None, 0, 1, 2, 3, 1]
    expected = []
    for row, c in zip(tokens, choice):
        if c is None:
            with adapter.disabled():
                expected.append(model(row[None])[0])
        else:
            adapter.load_state(zs[c])
            with adapter.merged():
                expected.append(model(row[None])[0])
    rows = svf.RowAdapter(adapter, strategy)
    slots = [rows.add(z) for z in zs]
    try:
        rows.set_rows([svf.RowAdapter.BASE if c is None else slots[c] for c in choice])
        got = model(tokens)
        rows.set_rows([slots[1]] * 2)  # all rows on one slot: its dense weights when it has them
        one = model(tokens[1:3])
    finally:
        rows.close()
    # Merged weights are formed in fp32 (svf.materialize) and U, σ, V come from an fp32 SVD, so the rows
    # agree to fp32 precision (differences ~1e-7; another expert's row differs by ~1e-2).
    for r in range(len(choice)):
        assert torch.allclose(got[r], expected[r], atol=1e-6), (r, (got[r] - expected[r]).abs().max())
    assert torch.allclose(one[1], expected[2], atol=1e-6)
    assert not torch.allclose(got[1], got[2], atol=1e-3)
    rows.remove(slots[3])
    assert rows.add(zs[3]) == slots[3]  # a freed slot is given again
