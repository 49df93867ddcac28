"""model.py against transformers on tiny random configs (a sliding window shorter than the input), loading and the
errors for bad input. The KV cache and generation: test_generate.py."""

import json
import shutil

import pytest
import torch

import common
import model as m
from tokenizer import Tokenizer
from tiny_models import tiny_hf_model

FAMILIES = {
    "llama": {},
    "llama_tied_bias_llama3rope": dict(
        tie_word_embeddings=True, attention_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0),
    "mistral_window": dict(sliding_window=8),
    "qwen2": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", FAMILIES)
def test_logits_match_transformers(case, tmp_path):
    family = case.split("_")[0]
    hf = tiny_hf_model(family, tmp_path, **FAMILIES[case])
    ours, _ = m.load(tmp_path, dtype=torch.float32, device="cpu")
    tokens = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    got = ours(tokens)
    assert got.shape == (2, 24, 96)
    assert (got - expected).abs().max().item() <= 1e-4


# ---- configuration and loading errors


def test_unsupported_config_is_refused(tiny_llama, tmp_path):
    base = json.loads((tiny_llama / "config.json").read_text())
    for change, message in [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope"),
        ({"mlp_bias": True}, "mlp_bias"),
    ]:
        with pytest.raises(ValueError, match=message):
            m.ModelArgs.from_config({**base, **change})


def test_bad_paths_and_checkpoints(tiny_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        m.load(empty)
    not_a_model = tmp_path / "plain"
    not_a_model.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        m.load(not_a_model)


def _copy_with_state(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_misshapen_tensors(tiny_llama, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _copy_with_state(tiny_llama, tmp_path / "missing", lambda s: s.pop(name))
    with pytest.raises(ValueError, match="missing tensors.*layers.1.mlp.up_proj"):
        m.load(tmp_path / "missing")
    _copy_with_state(tiny_llama, tmp_path / "shape", lambda s: s.__setitem__(name, s[name][:, :-1].contiguous()))
    with pytest.raises(ValueError, match="up_proj.weight has shape"):
        m.load(tmp_path / "shape")
    _copy_with_state(tiny_llama, tmp_path / "extra", lambda s: s.__setitem__("model.vision_tower.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected tensor"):
        m.load(tmp_path / "extra")


def test_sharded_checkpoint_loads(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / f, folder / f)
    state = load_file(tiny_llama / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, _ = m.load(folder, device="cpu")
    single, _ = m.load(tiny_llama, device="cpu")
    tokens = torch.tensor([[4, 5, 6, 7]])
    assert torch.equal(sharded(tokens), single(tokens))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing shards"):
        m.load(folder)


def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="cannot reach the Hugging Face hub"):
        common.resolve("some-org/some-model-that-is-not-cached")


def test_hub_cache_is_used(monkeypatch, tiny_llama, tmp_path):
    """A model already in the huggingface_hub cache resolves offline to its snapshot folder."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_llama, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert common.resolve("org/tiny") == snapshot
    model, _ = m.load("org/tiny", device="cpu")
    assert model.args.n_layers == 2


def test_chat_template_matches_transformers(tmp_path):
    """Our Jinja rendering equals transformers' apply_chat_template for a ChatML and a Llama-3 style template."""
    from transformers import PreTrainedTokenizerFast

    from tiny_models import write_tiny_tokenizer

    chatml = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    llama3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there  "}]
    write_tiny_tokenizer(tmp_path, 16)
    for template in (chatml, llama3):
        config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        ours = Tokenizer(tmp_path)
        reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
        reference.chat_template = template
        for msgs in (messages, messages[1:]):
            for add in (True, False):
                assert ours.render_chat(msgs, add) == reference.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add)


def test_atomic_path_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "sub" / "report.json"
    with common.atomic_path(path) as tmp:
        tmp.write_text("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError), common.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "first"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_atomic_path_gives_the_permissions_of_open(tmp_path):
    """safetensors writes 0600; an expert written through atomic_path is as readable as any new file."""
    from safetensors.torch import save_file

    plain = tmp_path / "plain"
    plain.write_text("x")
    with common.atomic_path(tmp_path / "expert.safetensors") as tmp:
        save_file({"z": torch.ones(2)}, tmp)
    assert (tmp_path / "expert.safetensors").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
