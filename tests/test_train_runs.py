"""train.py runs that are safe to resume and cannot be lost or misreported: checkpoints load without
running code from the file, --resume refuses another run's checkpoint, a fresh run never overwrites an
old one unless told to, the Ctrl-C message says what is on disk, metrics.jsonl holds each step once,
concurrent writes of one file both succeed, and bad flags stop at argparse."""

import json
import threading

import pytest
import torch

import checkpoint
import common
import model as m
import reinforce
import svf as svf_lib
import tasks
import train
from test_reinforce import EvenFirstToken

FLAGS = ["--task", "cls", "--preset", "cpu", "--batch-size", "4", "--micro-batch", "4", "--gen-batch", "4",
         "--eval-every", "2", "--eval-limit", "4", "--test-limit", "4", "--max-new-tokens", "2", "--temperature", "1.0",
         "--lr", "0.05", "--targets", "attn", "--autocast", "none", "--threads", "1"]


@pytest.fixture
def run(tiny_llama, monkeypatch):
    """train.main on the synthetic task of test_reinforce.py with a tiny random model."""
    _, tokenizer = m.load(tiny_llama, device="cpu")
    monkeypatch.setattr(tasks, "get", lambda name, **kw: EvenFirstToken(tokenizer))

    def run(out, *extra):
        return train.main([*FLAGS, "--model", str(tiny_llama), "--out", str(out), *extra])
    return run


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def interrupt(monkeypatch, module, name, on_call, error=KeyboardInterrupt):
    """Replace module.name by a function that raises `error` on its on_call-th call (by default
    KeyboardInterrupt: Ctrl-C)."""
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


# ---- checkpoints load without unpickling code


class RunsCode:
    """Unpickling this calls open(marker, "w"): what a crafted checkpoint could do with any callable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(run, tmp_path):
    marker = tmp_path / "payload-ran"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"z": RunsCode(marker), "step": 1}, out / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="checkpoint.pt.*refused"):
        checkpoint.load(out / "checkpoint.pt")
    assert not marker.exists()
    with pytest.raises(SystemExit, match="checkpoint.pt") as stop:
        run(out, "--resume", "--steps", "2")
    assert "refused" in str(stop.value.code)
    assert not marker.exists()


def test_a_checkpoint_of_train_py_loads_as_plain_data(run, tmp_path):
    """Everything train.py saves (z, AdamW and LambdaLR state, the RNG state, history, config) loads with
    weights_only=True, so refusing pickled objects costs nothing."""
    run(tmp_path / "run", "--steps", "1")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and state["config"]["lr"] == 0.05


# ---- --resume refuses what is not this run's checkpoint


def test_resume_refuses_other_settings_and_names_each(run, tmp_path):
    out = tmp_path / "run"
    run(out, "--steps", "2")
    with pytest.raises(SystemExit) as stop:
        run(out, "--steps", "2", "--resume", "--lr", "0.1", "--param", "scale")
    message = str(stop.value.code)
    assert "--lr: 0.05 in the checkpoint, 0.1 on this command line" in message
    assert "--param: mask in the checkpoint, scale on this command line" in message
    assert "--steps" not in message and str(out / "checkpoint.pt") in message
    with pytest.raises(SystemExit, match="--steps: 2 in the checkpoint, 3 on this command line"):
        run(out, "--steps", "3", "--resume")


def test_resume_allows_settings_that_do_not_change_the_training(run, tmp_path):
    """How the same batch is split into forward passes and generation batches, threads, device and
    compilation may change on resume (e.g. a smaller --micro-batch after running out of memory)."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch, reinforce, "train_step", on_call=2)
        with pytest.raises(SystemExit):
            run(out, "--steps", "2")
    summary = run(out, "--steps", "2", "--resume", "--micro-batch", "2", "--gen-batch", "2", "--compile", "off",
                  "--device", "cpu")
    assert summary["steps"] == 2
    assert [r["step"] for r in records(out) if "reward" in r] == [1, 2]


@pytest.mark.parametrize("content", [{"weight": torch.ones(2)}, torch.ones(3), [1, 2]],
                         ids=["dict-without-our-keys", "tensor", "list"])
def test_resume_from_a_foreign_file_names_it_and_says_what_to_do(run, tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    torch.save(content, out / "checkpoint.pt")
    with pytest.raises(SystemExit) as stop:
        run(out, "--resume", "--steps", "2")
    message = str(stop.value.code)
    assert str(out / "checkpoint.pt") in message and "not a train.py checkpoint" in message
    assert "--overwrite" in message


# ---- a fresh run never overwrites an old one


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(run, tmp_path):
    out = tmp_path / "run"
    run(out, "--steps", "1")
    _, meta = svf_lib.read_expert(out / "expert.safetensors")
    assert (meta["task"], meta["category"]) == ("even", "parity")  # what adapt.py names the expert by
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as stop:
        run(out, "--steps", "1", "--seed", "1")
    message = str(stop.value.code)
    assert str(out) in message and "--resume" in message and "--overwrite" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    # metrics alone (a run stopped before its first checkpoint) are a run too
    (out / "checkpoint.pt").unlink()
    (out / "expert.safetensors").unlink()
    with pytest.raises(SystemExit, match="--overwrite"):
        run(out, "--steps", "1", "--seed", "1")
    with pytest.raises(SystemExit, match="no checkpoint.*start without --resume.*--overwrite.*metrics.jsonl"):
        run(out, "--steps", "1", "--resume")
    assert (out / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


def test_overwrite_replaces_the_old_run(run, tmp_path):
    out = tmp_path / "run"
    run(out, "--steps", "2")
    run(out, "--steps", "1", "--overwrite")
    assert [r["step"] for r in records(out)] == [0, 1, 1]  # validation 0, step 1, validation 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    with pytest.raises(SystemExit) as stop:
        train.parse_args([*FLAGS, "--resume", "--overwrite"])
    assert stop.value.code == 2


# ---- Ctrl-C says what is on disk


def test_ctrl_c_before_any_checkpoint_says_nothing_was_saved(run, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch, reinforce, "train_step", on_call=1)
        with pytest.raises(SystemExit) as stop:
            run(out, "--steps", "2")
    assert stop.value.code == 130
    said = capsys.readouterr().out
    assert not (out / "checkpoint.pt").exists()
    assert "holds step" not in said and "continue with --resume" not in said
    assert "no checkpoint" in said and "--overwrite" in said
    assert run(out, "--steps", "2", "--overwrite")["steps"] == 2  # the restart it names works


def test_ctrl_c_after_a_checkpoint_names_its_step(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupt(monkeypatch, reinforce, "train_step", on_call=3)
    with pytest.raises(SystemExit):
        run(out, "--steps", "4")
    said = capsys.readouterr().out
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert "holds step 2; continue with --resume" in said


# ---- metrics.jsonl holds each step once


def test_resume_after_a_kill_during_validation_logs_each_step_once(run, tmp_path, monkeypatch):
    """Killed while validating after step 2 (its training record written, its checkpoint not yet):
    the resumed run repeats step 2, and metrics.jsonl still holds it once."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch, train.parallel, "evaluate_split", on_call=2)  # 1: validation at 0, 2: at step 2
        with pytest.raises(SystemExit):
            run(out, "--steps", "3")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    run(out, "--steps", "3", "--resume")
    logged = records(out)
    assert [r["step"] for r in logged if "reward" in r] == [1, 2, 3]
    assert [r["step"] for r in logged if "valid_accuracy" in r] == [0, 2, 3]
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    assert logged == json.loads(json.dumps(history))  # the log is the checkpoint's history (tuples as lists)


# ---- atomic writes from two writers at once


def test_two_writers_of_one_path_both_succeed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    both_written = threading.Barrier(2, timeout=10)
    errors = []

    def write(content):
        try:
            with common.atomic_path(path) as tmp:
                tmp.write_bytes(content)
                both_written.wait()  # neither renames before both have written
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    contents = [b"a" * 100_000, b"b" * 50_000]
    threads = [threading.Thread(target=write, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert path.read_bytes() in contents
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


# ---- flags are checked by argparse before anything loads


@pytest.mark.parametrize("flags, named", [
    (["--steps", "0"], "--steps"), (["--steps", "-1"], "--steps"), (["--batch-size", "0"], "--batch-size"),
    (["--micro-batch", "0"], "--micro-batch"), (["--gen-batch", "0"], "--gen-batch"),
    (["--eval-every", "0"], "--eval-every"), (["--eval-limit", "0"], "--eval-limit"),
    (["--test-limit", "0"], "--test-limit"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--threads", "0"], "--threads"), (["--seed", "-1"], "--seed"),
    (["--lr", "0"], "--lr"), (["--lr", "-1e-3"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--lr", "x"], "--lr"), (["--epochs", "0"], "--epochs"), (["--epochs", "nan"], "--epochs"),
    (["--clip", "0"], "--clip"), (["--clip", "inf"], "--clip"), (["--kl", "-0.1"], "--kl"), (["--kl", "nan"], "--kl"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--batch-size", "4", "--micro-batch", "8"], "--micro-batch"),
])
def test_bad_flags_stop_at_argparse(tmp_path, monkeypatch, capsys, flags, named):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(m, "load", no_model)
    monkeypatch.setattr(tasks, "get", no_model)
    with pytest.raises(SystemExit) as stop:
        train.main(["--task", "cls", "--out", str(tmp_path / "run"), *flags])
    assert stop.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, said", [
    (["--baseline", "group"], "--samples 2 or more"),
    (["--baseline", "group", "--samples", "1", "--temperature", "1"], "--samples 2 or more"),
    (["--samples", "4", "--temperature", "0"], "--temperature > 0"),
    (["--samples", "4"], "--temperature > 0"),  # greedy is the default
    (["--scale-by-std", "--samples", "4", "--temperature", "1", "--baseline", "mean"], "--baseline group"),
    (["--objective", "nexttoken", "--samples", "4", "--temperature", "1"], "--objective rl"),
])
def test_contradictory_recipes_are_refused_before_loading(tmp_path, monkeypatch, flags, said):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(m, "load", no_model)
    with pytest.raises(SystemExit) as stop:
        train.main(["--task", "cls", "--preset", "cpu", "--out", str(tmp_path / "run"), *flags])
    assert said in str(stop.value.code)
    assert not (tmp_path / "run").exists()


def test_micro_batch_counts_replies(tmp_path):
    """With K samples a step has batch-size x K replies; --micro-batch slices those."""
    args = train.parse_args(["--task", "cls", "--batch-size", "4", "--samples", "8", "--micro-batch", "32",
                             "--temperature", "1", "--baseline", "group", "--out", str(tmp_path)])
    assert train.resolve_config(args)["micro_batch"] == 32
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "cls", "--batch-size", "4", "--samples", "8", "--micro-batch", "33"])


def test_group_run_logs_equal_groups_and_resumes_an_older_checkpoint(run, tmp_path):
    """A group run logs the share of prompts whose replies all scored the same; a checkpoint written before
    --samples existed (its config lacks the new settings) resumes as the K = 1 run it was."""
    out = tmp_path / "group"
    run(out, "--steps", "2", "--samples", "4", "--baseline", "group", "--shuffle-options")
    steps = [r for r in records(out) if "reward" in r]
    assert len(steps) == 2 and all(0 <= r["equal_groups"] <= 1 for r in steps)
    old = tmp_path / "old"
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch, reinforce, "train_step", on_call=2)  # a checkpoint of step 1 of 2, to continue
        with pytest.raises(SystemExit):
            run(old, "--steps", "2")
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    for key in ("samples", "scale_by_std", "shuffle_options"):
        del state["config"][key]
    torch.save(state, old / "checkpoint.pt")
    run(old, "--steps", "2", "--resume")


def test_boundary_values_are_accepted():
    args = train.parse_args(["--task", "cls", "--kl", "0", "--temperature", "0", "--lr", "1e-9", "--steps", "1",
                             "--batch-size", "4", "--micro-batch", "4", "--seed", "0"])
    assert (args.kl, args.temperature, args.steps, args.micro_batch) == (0.0, 0.0, 1, 4)


@pytest.mark.parametrize("native, flag, expected", [
    (True, [], "bf16"), (False, [], "none"),                       # the CPU preset, by the CPU
    (False, ["--autocast", "bf16"], "bf16"), (True, ["--autocast", "none"], "none"),  # the flag wins
])
def test_cpu_preset_uses_bf16_only_where_the_cpu_has_it(monkeypatch, native, flag, expected):
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
    config = train.resolve_config(train.parse_args(["--task", "cls", "--preset", "cpu", "--device", "cpu", *flag]))
    assert config["autocast"] == expected


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    for flags, expected in [("fpu avx2 avx512f", False), ("fpu avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)]:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
        assert train.common.cpu_has_native_bf16() is expected
        monkeypatch.setattr(builtins, "open", real_open)


def test_tensorboard_gets_every_logged_metric(run, tmp_path, monkeypatch):
    """--tensorboard writes each numeric metric of metrics.jsonl at its step (a stand-in SummaryWriter
    records the calls: the tensorboard package is not a dependency), and says how to install it when
    it is missing."""
    import sys
    import types

    scalars = []

    class SummaryWriter:
        def __init__(self, folder):
            scalars.append(("folder", folder))

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    out = tmp_path / "run"
    run(out, "--steps", "2", "--tensorboard")
    assert scalars[0] == ("folder", str(out / "tensorboard"))
    expected = [(k, v, r["step"]) for r in records(out) for k, v in r.items()
                if k != "step" and isinstance(v, (int, float))]
    assert scalars[1:] == expected and any(k == "reward" for k, _, _ in expected)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        run(tmp_path / "other", "--steps", "1", "--tensorboard")
