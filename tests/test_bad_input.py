"""Bad input stops with a clear error that names what is wrong, never a silent wrong run: command-line
values out of range, adapter files holding NaN or inf, and damaged model and data files."""

import errno
import gzip
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adapt
import evaluate
import generate as gen
import lora
import common
import model as m
from tokenizer import Tokenizer
import svf
import tasks
import train
from conftest import evaluate_main_inputs


# ----------------------------------------------------------------------------------------------
# Command lines: argparse refuses a value out of range (exit status 2, the flag named) before any model loads


class ModelLoaded(Exception):
    pass


def run_main(monkeypatch, script, argv):
    """Run script.main() with these arguments; a model load stops it with ModelLoaded."""
    def no_load(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(m, "load", no_load)
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    script.main()


EVALUATE = ["--task", "gsm8k", "--threads", "1"]
HUGE = str(10**22)
ADAPT = ["--mode", "none", "--task", "gsm8k", "--threads", "1"]
GENERATE = ["--threads", "1"]

BAD_COMMAND_LINES = [
    (evaluate, EVALUATE, "--limit", "-1"),
    (evaluate, EVALUATE, "--limit", "0"),
    (evaluate, EVALUATE, "--batch-size", "0"),
    (evaluate, EVALUATE, "--max-new-tokens", "0"),
    (evaluate, EVALUATE, "--max-new-tokens", "-5"),
    (evaluate, EVALUATE, "--threads", "0"),
    (adapt, ADAPT, "--limit", "-1"),
    (adapt, ADAPT, "--shots", "-3"),
    (adapt, ADAPT, "--shots", "0"),
    (adapt, ADAPT, "--batch-size", "0"),
    (adapt, ADAPT, "--threads", "0"),
    (gen, GENERATE, "--max-new-tokens", "0"),
    (gen, GENERATE, "--temperature", "-0.5"),
    (gen, GENERATE, "--temperature", "nan"),
    (gen, GENERATE, "--temperature", "inf"),
    (gen, GENERATE, "--top-p", "0"),
    (gen, GENERATE, "--top-p", "1.5"),
    (gen, GENERATE, "--top-p", "nan"),
    (gen, GENERATE, "--threads", "0"),
    (gen, GENERATE, "--threads", "-2"),
    # Integers past what torch takes (int64; seeds 32-bit; threads one per CPU) stop at argparse too.
    (evaluate, EVALUATE, "--shuffle-seed", HUGE),
    (evaluate, EVALUATE, "--shuffle-seed", "4294967296"),
    (evaluate, EVALUATE, "--threads", HUGE),
    (evaluate, EVALUATE, "--threads", str(os.cpu_count() + 1)),
    (evaluate, EVALUATE, "--batch-size", HUGE),
    (evaluate, EVALUATE, "--limit", "9223372036854775808"),
    (adapt, ADAPT, "--seed", HUGE),
    (adapt, ADAPT, "--threads", HUGE),
    (gen, GENERATE, "--seed", HUGE),
    (gen, GENERATE, "--threads", HUGE),
]


@pytest.mark.parametrize("script, base, flag, value", BAD_COMMAND_LINES,
                         ids=[f"{s.__name__}{flag}={v}" for s, _, flag, v in BAD_COMMAND_LINES])
def test_out_of_range_flag_is_an_argparse_error(monkeypatch, capsys, script, base, flag, value):
    with pytest.raises(SystemExit) as stopped:
        run_main(monkeypatch, script, [*base, flag, value])
    assert stopped.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    (evaluate, [*EVALUATE, "--limit", "1", "--batch-size", "1", "--max-new-tokens", "1"]),
    (adapt, [*ADAPT, "--limit", "1", "--shots", "1", "--batch-size", "1"]),
    (gen, [*GENERATE, "--max-new-tokens", "1", "--temperature", "0", "--top-p", "1"]),
    (gen, [*GENERATE, "--temperature", "0.7", "--top-p", "0.01"]),
], ids=["evaluate", "adapt", "model-greedy", "model-sampling"])
def test_smallest_allowed_values_reach_the_model(monkeypatch, script, argv):
    with pytest.raises(ModelLoaded):
        run_main(monkeypatch, script, argv)


@pytest.mark.parametrize("flag, value", [("--seed", HUGE), ("--seed", "4294967296"), ("--threads", HUGE),
                                         ("--gen-batch", HUGE), ("--batch-size", HUGE), ("--steps", HUGE)])
def test_train_refuses_huge_integers_at_argparse(capsys, flag, value):
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--task", "arc_easy", flag, value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "too large" in err


def test_integer_types_take_their_whole_range_and_no_more():
    """Seeds 0 .. 2**32 - 1, threads 1 .. the machine's CPUs, counts 1 .. 2**63 - 1 (int64)."""
    import argparse

    assert common.seed("0") == 0 and common.seed("4294967295") == 4294967295
    assert common.thread_count("1") == 1 and common.thread_count(str(os.cpu_count())) == os.cpu_count()
    assert common.positive_int("9223372036854775807") == 9223372036854775807
    assert common.non_negative_int("9223372036854775807") == 9223372036854775807
    for parse, text in [(common.seed, "4294967296"), (common.seed, "-1"), (common.thread_count, str(os.cpu_count() + 1)),
                        (common.positive_int, "9223372036854775808"), (common.non_negative_int, HUGE)]:
        with pytest.raises(argparse.ArgumentTypeError, match="too large|below"):
            parse(text)


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "1.5", HUGE, str(os.cpu_count() + 1)])
def test_bad_t2_threads_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("T2_THREADS", value)
    threads = torch.get_num_threads()
    with pytest.raises(ValueError) as refused:
        common.set_threads()
    message = str(refused.value)
    assert f"T2_THREADS={value!r}" in message and f"from 1 to {os.cpu_count()}" in message, message
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("threads", [os.cpu_count() + 1, 10**22])
def test_set_threads_refuses_more_threads_than_cpus(threads):
    """A caller other than argparse (export.py takes --threads as any positive count) gets a clear error."""
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=f"from 1 to {os.cpu_count()}"):
        common.set_threads(threads)
    assert torch.get_num_threads() == before


def capture_load(monkeypatch):
    """Replace model.load by one that records its keyword arguments, then stops the script."""
    calls = []

    def load(*args, **kwargs):
        calls.append(kwargs)
        raise ModelLoaded

    monkeypatch.setattr(m, "load", load)
    return calls


@pytest.mark.parametrize("script, argv", [
    (evaluate, ["evaluate.py", *EVALUATE, "--limit", "1", "--batch-size", "100000000"]),
    (adapt, ["adapt.py", *ADAPT, "--limit", "1", "--shots", "1", "--batch-size", "100000000"]),
], ids=["evaluate", "adapt"])
def test_dtype_probe_rows_are_the_rows_that_will_run(monkeypatch, script, argv):
    """One prompt to answer with a batch of 10**8: the dtype probe times one row, not 10**8."""
    calls = capture_load(monkeypatch)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ModelLoaded):
        script.main()
    assert calls[0]["probe_rows"] == 1


# ----------------------------------------------------------------------------------------------
# --out: a path the results cannot be written to stops evaluate.py and adapt.py before the model loads


def bad_outs(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing" / "folder")
    return {  # --out: what the error must name
        "a directory": (tmp_path / "folder", [str(tmp_path / "folder"), "is a directory", "give a file name"]),
        "a new directory": (f"{tmp_path / 'new'}/", [str(tmp_path / "new"), "is a directory", "give a file name"]),
        "under a file": (tmp_path / "file" / "r.json", [str(tmp_path / "file"), "is a file, not a directory"]),
        "under a dangling link": (tmp_path / "dangling" / "r.json",
                                  [str(tmp_path / "dangling"), str(tmp_path / "missing" / "folder"), "does not exist"]),
        "in /proc": ("/proc/t2-records.json", ["/proc/t2-records.json", "does not let this process create files"]),
    }


BAD_OUTS = ["a directory", "a new directory", "under a file", "under a dangling link", "in /proc"]


@pytest.mark.parametrize("script, base", [(evaluate, ["evaluate.py", *EVALUATE]), (adapt, ["adapt.py", *ADAPT])],
                         ids=["evaluate", "adapt"])
@pytest.mark.parametrize("case", BAD_OUTS)
def test_unwritable_out_stops_before_the_model_loads(tmp_path, monkeypatch, capsys, script, base, case):
    out, named = bad_outs(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    calls = capture_load(monkeypatch)
    monkeypatch.setattr(sys, "argv", [*base, "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        script.main()
    assert stopped.value.code == 2 and calls == []
    err = capsys.readouterr().err
    assert "--out" in err and all(text in err for text in named), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing made or left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a folder without write permission")
def test_out_in_a_folder_without_write_permission_is_refused(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="Permission denied") as refused:
            common.check_writable_file(folder / "r.jsonl")
        assert str(folder / "r.jsonl") in str(refused.value)
    finally:
        folder.chmod(0o755)


def test_out_on_a_read_only_filesystem_is_refused(tmp_path, monkeypatch):
    """A read-only mount answers EROFS to creating a file; the error names the path and the reason."""
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    with monkeypatch.context() as patch, pytest.raises(ValueError) as refused:
        patch.setattr(common.os, "open", read_only)
        common.check_writable_file(tmp_path / "ro" / "r.jsonl")
    assert str(tmp_path / "ro" / "r.jsonl") in str(refused.value) and "Read-only file system" in str(refused.value)


def test_writable_out_is_accepted_and_nothing_is_made_yet(tmp_path):
    """A new file, also under directories still to be made (atomic_path makes them at the end)."""
    for out in (tmp_path / "r.jsonl", tmp_path / "runs" / "deeper" / "r.jsonl"):
        assert common.check_writable_file(str(out)) == out
    (tmp_path / "old.jsonl").write_text("earlier\n")
    assert common.check_writable_file(tmp_path / "old.jsonl") == tmp_path / "old.jsonl"  # an explicit --out is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.jsonl"]


# ----------------------------------------------------------------------------------------------
# Adapter files: a z (or LoRA factor) with NaN or inf is refused on load, naming the file and the tensor


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_expert_with_non_finite_z_is_refused(tmp_path, bad):
    path = tmp_path / "expert.safetensors"
    z = {name: torch.ones(8) for name in ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.1.mlp.down_proj")}
    z["layers.0.mlp.up_proj"][3] = bad
    z["layers.1.mlp.down_proj"][:] = bad
    save_file(z, path, metadata={"format": svf.EXPERT_FORMAT, "param": "mask", "targets": "mlp"})
    with pytest.raises(ValueError, match="not finite") as refused:
        svf.read_expert(path)
    message = str(refused.value)
    assert str(path) in message and "layers.0.mlp.up_proj" in message and "down_proj" not in message


def test_evaluate_refuses_an_expert_full_of_nan(tiny_llama, tmp_path, monkeypatch):
    """The whole path a user takes: evaluate.py --expert with a NaN file stops instead of scoring end-of-text replies."""
    path = tmp_path / "expert.safetensors"
    svf.SVF(m.load(tiny_llama, device="cpu")[0], targets="mlp", parametrization="mask", cache=False,
            progress=False).save_expert(path, task="gsm8k")
    with safe_open(str(path), framework="pt") as f:
        meta, z = f.metadata(), {k: torch.full_like(f.get_tensor(k), float("nan")) for k in f.keys()}
    save_file(z, path, metadata=meta)
    with pytest.raises(ValueError, match="not finite"):
        evaluate_main_inputs(monkeypatch, ["--task", "gsm8k", "--limit", "1", "--model", str(tiny_llama),
                                           "--expert", str(path), "--threads", "1"])


def test_lora_file_with_nan_is_refused(tiny_llama, tmp_path):
    model, _ = m.load(tiny_llama, device="cpu")
    state = lora.LoRA(model, rank=4, alpha=8, dropout=0.0).state()
    state["layers.1.attn.q_proj.B"][0, 0] = float("nan")
    path = tmp_path / "lora.safetensors"
    save_file(state, path, metadata={"format": lora.FORMAT, "rank": "4", "alpha": "8"})
    fresh, _ = m.load(tiny_llama, device="cpu")
    with pytest.raises(ValueError, match="not finite") as refused:
        lora.apply(fresh, path)
    assert str(path) in str(refused.value) and "layers.1.attn.q_proj.B" in str(refused.value)


# ----------------------------------------------------------------------------------------------
# Damaged model files: the error names the file, says what is wrong and what to do


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    return folder


def assert_names_file(error, path):
    assert str(path) in str(error), str(error)
    assert error.__cause__ is not None  # the parser's own error stays chained for the details


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors.index.json"])
def test_malformed_config_names_the_file(model_copy, name):
    (model_copy / name).write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="not valid JSON") as refused:
        m.load(model_copy, device="cpu")
    assert_names_file(refused.value, model_copy / name)


@pytest.mark.parametrize("damage", ["truncated", "corrupt header"])
def test_damaged_weight_file_names_the_file(model_copy, damage):
    path = model_copy / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00not json" + raw[17:])
    with pytest.raises(ValueError, match="not a readable safetensors file") as refused:
        m.load(model_copy, device="cpu")
    assert_names_file(refused.value, path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_malformed_tokenizer_file_names_the_file(model_copy, name):
    (model_copy / name).write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError) as refused:
        Tokenizer(model_copy)
    assert_names_file(refused.value, model_copy / name)


def test_damaged_default_model_says_to_delete_and_rebuild(tiny_llama, tmp_path, monkeypatch):
    """The default model built offline lives in CACHE_DIR/models; deleting it makes the next run rebuild it."""
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    shutil.copytree(tiny_llama, folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(ValueError, match=f"delete {folder}") as refused:
        m.load(folder, device="cpu")
    assert_names_file(refused.value, folder / "config.json")


# ----------------------------------------------------------------------------------------------
# Damaged data files: the error names the file and the line


def write_gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl.gz"
    write_gz(path, ['{"question": "1 + 1?", "answer": "2"}', "", '{"question": "2 + 2?", "answer": '])
    with pytest.raises(ValueError, match="line 3") as refused:
        tasks.read_jsonl_gz(path)
    assert_names_file(refused.value, path)


def test_malformed_arc_file_says_how_to_rebuild_it(tmp_path):
    path = tmp_path / "arc_easy" / "test.jsonl.gz"
    write_gz(path, ['{"id": "a", "question": '])
    with pytest.raises(ValueError, match="build_arc.py") as refused:
        tasks.read_jsonl_gz(path)
    assert_names_file(refused.value, path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl.gz"
    write_gz(path, ['{"question": "1 + 1?", "answer": "2"}'] * 200)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="truncated") as refused:
        tasks.read_jsonl_gz(path)
    assert_names_file(refused.value, path)
