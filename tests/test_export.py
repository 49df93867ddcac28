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


# ---- Where export writes: a new or empty folder, or an earlier export; someone's folder, the current folder or
# a non-finite model never. Checked before the model loads.


def no_model_load(monkeypatch):
    """Make a model load fail the test: what is refused must be refused before any work."""
    def load(*args, **kwargs):
        raise AssertionError("the model loaded before the command line was checked")

    monkeypatch.setattr(m, "load", load)


@pytest.fixture
def experts_of_a_tiny_model(tmp_path):
    """A tiny Llama with a byte-level BPE tokenizer (GGUF export needs one) and two scale experts of it:
    (source folder, experts folder)."""
    source = tmp_path / "source"
    tiny_hf_model("llama", source)
    bpe_tokenizer(source, 96)
    model, _ = m.load(source, dtype=torch.float32, device="cpu")
    for seed, (task, category) in enumerate([("gsm8k", "math"), ("mbpp", "code")]):
        random_expert(model, tmp_path / "experts" / f"{task}.safetensors", targets="mlp", seed=seed, task=task,
                      category=category).remove()
    return source, tmp_path / "experts"


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_keeps_a_folder_of_someone_elses_files(experts_of_a_tiny_model, tmp_path, monkeypatch, capsys):
    """--out runs, a folder holding notes and a run, is refused before the model loads; every file stays."""
    source, experts = experts_of_a_tiny_model
    runs = tmp_path / "runs"
    (runs / "mbpp-run").mkdir(parents=True)
    (runs / "NOTES.txt").write_text("notes")
    (runs / "mbpp-run" / "expert.safetensors").write_bytes((experts / "mbpp.safetensors").read_bytes())
    before = tree(runs)
    (tmp_path / "a-file").write_text("mine")
    no_model_load(monkeypatch)
    for out, says in ((runs, "not an earlier export"), (tmp_path / "a-file", "is a file")):
        with pytest.raises(SystemExit):
            export.main(["--expert", str(experts / "gsm8k.safetensors"), "--model", str(source), "--out", str(out),
                         "--threads", "1"])
        err = capsys.readouterr().err
        assert str(out) in err and says in err
    assert tree(runs) == before and (tmp_path / "a-file").read_text() == "mine"


def test_export_function_keeps_someone_elses_folder(experts_of_a_tiny_model, tmp_path):
    """export.export, which adapt.py --export calls after its run, refuses the same folder and deletes nothing."""
    source, experts = experts_of_a_tiny_model
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"my own model")  # an export's file name, but no export's card
    model, _ = m.load(source, dtype=torch.float32, device="cpu")
    adapter = svf_lib.apply_expert(model, experts / "gsm8k.safetensors", merge=False)
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export.export(model, adapter, source, mine, export.model_card("tiny", "the expert", {}))
    assert tree(mine) == {"model.safetensors": b"my own model"}


def test_adapt_export_into_someone_elses_folder_stops_before_the_run(tmp_path, monkeypatch, capsys):
    """adapt.py --export DIR checks DIR as export.py checks --out, before its model loads, not after the run."""
    import adapt

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "NOTES.txt").write_text("notes")
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        adapt.main(["--mode", "expert", "--expert-name", "math", "--task", "gsm8k", "--limit", "1", "--threads", "1",
                    "--out", str(tmp_path / "report.json"), "--export", str(runs)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"--export {runs} already holds files that are not an earlier export" in err
    assert tree(runs) == {"NOTES.txt": b"notes"}


def test_an_earlier_export_is_replaced_and_nothing_else(experts_of_a_tiny_model, tmp_path, monkeypatch, capsys):
    source, experts = experts_of_a_tiny_model
    out, fresh = tmp_path / "exported", tmp_path / "fresh"

    def export_expert(file, to):
        export.main(["--expert", str(experts / file), "--model", str(source), "--out", str(to), "--threads", "1"])

    export_expert("gsm8k.safetensors", out)
    export_expert("mbpp.safetensors", out)  # replaces the earlier export
    export_expert("mbpp.safetensors", fresh)
    assert tree(out) == tree(fresh) and "| code | mbpp.safetensors | mbpp |" in (out / "README.md").read_text()
    (out / "NOTES.txt").write_text("added by hand")  # now the folder is no longer only an export
    before = tree(out)
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit):
        export_expert("gsm8k.safetensors", out)
    assert "not an earlier export" in capsys.readouterr().err and tree(out) == before


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_export_to_the_current_folder_is_refused_clearly(experts_of_a_tiny_model, tmp_path, monkeypatch, capsys, out):
    """The current folder (empty here, so only its being the current folder is wrong) is refused with a message."""
    source, experts = experts_of_a_tiny_model
    here = tmp_path / "parent" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit):
        export.main(["--expert", str(experts / "gsm8k.safetensors"), "--model", str(source), "--out", out,
                     "--threads", "1"])
    assert "is the current folder or holds it" in capsys.readouterr().err
    assert here.is_dir() and not list(here.iterdir()) and sorted(p.name for p in here.parent.iterdir()) == ["here"]


def test_a_gguf_inside_the_out_folder_is_written_and_kept(experts_of_a_tiny_model, tmp_path, capsys):
    """--out D --gguf D/model.gguf: both there after the command (twice: the second replaces the first export),
    and the GGUF holds the folder's merged up_proj."""
    import gguf

    source, experts = experts_of_a_tiny_model
    out = tmp_path / "exported"
    for _ in range(2):
        export.main(["--expert", str(experts / "gsm8k.safetensors"), "--model", str(source), "--out", str(out),
                     "--gguf", str(out / "model.gguf"), "--gguf-dtype", "f32", "--threads", "1"])
        assert f"wrote {out} and {out / 'model.gguf'}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                         "model.gguf", "model.safetensors", "tokenizer.json",
                                                         "tokenizer_config.json"]
    tensor = next(t for t in gguf.GGUFReader(out / "model.gguf").tensors if t.name == "blk.0.ffn_up.weight")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(torch.tensor(tensor.data.reshape(tuple(reversed(tensor.shape.tolist())))), up)


@pytest.mark.parametrize("gguf, says", [("notes.txt", "is not a GGUF file"), ("exported", "is a folder"),
                                        ("folder", "is a folder")])
def test_a_gguf_path_that_is_not_a_gguf_file_is_refused(experts_of_a_tiny_model, tmp_path, monkeypatch, capsys,
                                                         gguf, says):
    source, experts = experts_of_a_tiny_model
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "folder").mkdir()
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit):
        export.main(["--expert", str(experts / "gsm8k.safetensors"), "--model", str(source),
                     "--out", str(tmp_path / "exported"), "--gguf", str(tmp_path / gguf), "--threads", "1"])
    assert says in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "my notes" and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("alpha, says", [
    ("code=nan,math=1", "finite number >= 0"), ("code=inf,math=1", "finite number >= 0"),
    ("code=-inf,math=1", "finite number >= 0"), ("code=1e308,math=1e308", "sum past the largest float"),
    ("code=-1,math=1", "finite number >= 0"), ("code=0,math=0", "every weight is 0"), ("code=1,code=2", "'code' twice"),
])
def test_alpha_that_no_mixture_can_use_is_refused(experts_of_a_tiny_model, tmp_path, monkeypatch, capsys, alpha, says):
    """Refused by argparse (exit status 2) before the model loads; a valid --alpha still reads as given."""
    assert export.parse_alpha("code=0.2, math = 0.8,reasoning=0") == {"code": 0.2, "math": 0.8, "reasoning": 0.0}
    source, experts = experts_of_a_tiny_model
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        export.main(["--experts", str(experts), "--alpha", alpha, "--model", str(source), "--out", str(tmp_path / "a"),
                     "--threads", "1"])
    assert stopped.value.code == 2 and says in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_non_finite_merged_weights_are_not_written(experts_of_a_tiny_model, tmp_path):
    """code=1e308 is a finite --alpha, but mixed in fp32 it is inf, and so is every merged W'. Nothing is written:
    no folder, no GGUF."""
    source, experts = experts_of_a_tiny_model
    with pytest.raises(ValueError, match="not finite.*Nothing was written"):
        export.main(["--experts", str(experts), "--alpha", "code=1e308", "--model", str(source),
                     "--out", str(tmp_path / "a"), "--gguf", str(tmp_path / "a.gguf"), "--threads", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts", "source"]


def test_atomic_folder_replaces_only_what_its_caller_recognises(tmp_path):
    """common.atomic_folder with a replaceable test: a folder it rejects is kept, whether it was there
    before the block or appeared while the block ran; an empty folder or a recognised one is replaced."""
    import common

    def only_mine(folder):
        return (folder / "mine").exists()

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "theirs.txt").write_text("theirs")
    with pytest.raises(FileExistsError, match="already holds files"):
        with common.atomic_folder(kept, replaceable=only_mine) as partial:
            raise AssertionError("the block ran")
    late = tmp_path / "late"
    with pytest.raises(FileExistsError, match="already holds files"):
        with common.atomic_folder(late, replaceable=only_mine) as partial:
            (partial / "mine").write_text("new")
            late.mkdir()
            (late / "theirs.txt").write_text("theirs")
    for name in ("empty", "recognised"):
        (tmp_path / name).mkdir()
    (tmp_path / "recognised" / "mine").write_text("old")
    for name in ("empty", "recognised"):
        with common.atomic_folder(tmp_path / name, replaceable=only_mine) as partial:
            (partial / "mine").write_text("new")
    assert (kept / "theirs.txt").read_text() == (late / "theirs.txt").read_text() == "theirs"
    assert (tmp_path / "empty" / "mine").read_text() == (tmp_path / "recognised" / "mine").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "kept", "late", "recognised"]  # no partial left
