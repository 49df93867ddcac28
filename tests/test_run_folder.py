"""train.py's run folder: one run at a time, --out values that cannot be a folder refused before the
model loads, a full disk reported as one with the checkpoint intact, Ctrl-C during the final test
evaluation answered with what is saved, that evaluation's progress shown, and the run's minutes
counted over every process that resumed it."""

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as m
import reinforce
import svf as svf_lib
import train
from test_train_runs import FLAGS, interrupt, records, run  # noqa: F401 (run is a fixture)


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the run folder was checked")


# ---- one run at a time


def test_a_second_run_in_a_folder_being_written_is_refused_at_once(run, tiny_llama, tmp_path, monkeypatch):
    """A run started in a folder while another train.py process writes it stops before loading anything and
    names the folder and that process; once the process is gone (kill -9: no clean-up ran) the folder is
    free again."""
    out = tmp_path / "run"
    worker = Path(__file__).parent / "train_worker.py"
    first = subprocess.Popen([sys.executable, str(worker), str(tiny_llama), *FLAGS[2:], "--steps", "500",
                              "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists():  # the first run has loaded its model and begun
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(m, "load", no_model)
            with pytest.raises(SystemExit) as stop:
                run(out, "--steps", "1", "--seed", "1")
        message = str(stop.value.code)
        assert str(out) in message and f"process {first.pid}" in message and "another --out" in message
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    assert run(out, "--steps", "1", "--overwrite")["steps"] == 1


# ---- an --out that cannot be a folder is refused before the model loads


def test_a_dangling_symlink_or_a_file_as_out_is_refused_clearly(run, tmp_path, monkeypatch):
    monkeypatch.setattr(m, "load", no_model)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere" / "x")
    with pytest.raises(SystemExit) as stop:
        run(link)
    message = str(stop.value.code)
    assert str(link) in message and str(tmp_path / "nowhere" / "x") in message and "does not exist" in message
    file = tmp_path / "notes.txt"
    file.write_text("notes")
    with pytest.raises(SystemExit) as stop:
        run(file)
    assert str(file) in str(stop.value.code) and "is a file, not a folder" in str(stop.value.code)
    assert file.read_text() == "notes" and not (tmp_path / "nowhere").exists()


def test_a_read_only_out_is_refused_with_advice_before_the_model_loads(run, tmp_path, monkeypatch):
    """The folder cannot be created on a read-only disk (EROFS, as a read-only mount gives even to root)."""
    out = tmp_path / "ro" / "run"
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self == out or out in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    monkeypatch.setattr(m, "load", no_model)
    with pytest.raises(SystemExit) as stop:
        run(out)
    message = str(stop.value.code)
    assert str(out) in message and "Read-only file system" in message and "writable" in message


# ---- a full disk


def full_torch_save(calls_before):
    """torch.save that fails as on a full disk after `calls_before` good calls: a partial file, and the
    stream writer's error (the text torch 2.13 gives on a full tmpfs)."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > calls_before:
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, f, *args, **kwargs)
    return save


def full_metrics(real_open, metrics_path, appends_before):
    """open() for train.py whose append to metrics.jsonl fails with ENOSPC after `appends_before` good ones."""
    appends = []

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path) == metrics_path and "a" in mode:
            appends.append(1)
            if len(appends) > appends_before:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)
    return fake_open


def full_expert(path, **extra):
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("where, holds", [("checkpoint", 1), ("metrics", 1), ("expert", 2)])
def test_a_full_disk_says_so_and_the_run_continues_with_resume(run, tmp_path, monkeypatch, where, holds):
    """Writing step 2's checkpoint (torch's stream error), step 2's metrics record (ENOSPC) or the expert
    (safetensors' error) fails: the message says the disk is full, that the checkpoint holds the last
    saved step, and --resume; the checkpoint is that step's, and --resume finishes the run."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        if where == "checkpoint":
            patch.setattr(torch, "save", full_torch_save(calls_before=1))
        elif where == "metrics":  # appends: validation 0, step 1, then step 2 fails
            patch.setattr(train, "open", full_metrics(open, out / "metrics.jsonl", appends_before=2), raising=False)
        else:
            patch.setattr(svf_lib.SVF, "save_expert", lambda self, path, **extra: full_expert(path))
        with pytest.raises(SystemExit) as stop:
            run(out, "--steps", "2")
    message = str(stop.value.code)
    assert "disk" in message and "full" in message and "--resume" in message
    assert f"{out / 'checkpoint.pt'} is intact and holds step {holds}" in message
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == holds
    assert run(out, "--steps", "2", "--resume")["steps"] == 2
    assert [r["step"] for r in records(out)] == [0, 1, 2, 2]  # validation 0, step 1, step 2, validation 2


# ---- the final test evaluation


def test_ctrl_c_during_the_final_test_evaluation_says_the_expert_is_saved(run, tmp_path, capsys):
    """Calls of evaluate_split with --steps 1: validation at 0 and at 1, then the base model on the test
    split (interrupted here)."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch, train.parallel, "evaluate_split", on_call=3)
        try:
            run(out, "--steps", "1")
        except KeyboardInterrupt:  # caught here, or pytest would stop the whole session
            pytest.fail("Ctrl-C in the final test evaluation escaped train.py as a raw KeyboardInterrupt")
        except SystemExit as stop:
            assert stop.code == 130
        else:
            pytest.fail("the run went on after Ctrl-C")
    said = capsys.readouterr().out
    assert "final test evaluation" in said and str(out / "expert.safetensors") in said and "--resume" in said
    assert (out / "expert.safetensors").exists() and not (out / "summary.json").exists()
    assert run(out, "--steps", "1", "--resume")["test_n"] == 4
    assert (out / "summary.json").exists()


def test_the_final_test_evaluation_shows_its_progress(run, tmp_path, capsys):
    """Two progress bars over the 3 test examples (base model, then expert); the validation's 4 examples
    and the run's 1 step give no 3/3."""
    run(tmp_path / "run", "--steps", "1", "--test-limit", "3")
    bars = re.findall(r"\b3/3 \[", capsys.readouterr().err)
    assert len(bars) >= 2, bars


# ---- the run's minutes


def test_summary_minutes_count_the_processes_before_a_resume(run, tmp_path, monkeypatch):
    """Step 1 of the first process takes 10 minutes (a clock that jumps 600 s); Ctrl-C in step 2; the resumed
    process finishes in seconds. The summary counts the whole run: at least 10 minutes. A checkpoint from
    before the time was saved resumes too."""
    jump = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + jump[0])
    real_step, calls = reinforce.train_step, []

    def slow_then_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        jump[0] += 600.0
        return real_step(*args, **kwargs)

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reinforce, "train_step", slow_then_interrupted)
        with pytest.raises(SystemExit):
            run(out, "--steps", "2")
    old = tmp_path / "old"
    old.mkdir()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state.pop("seconds", None)
    torch.save(state, old / "checkpoint.pt")

    minutes = run(out, "--steps", "2", "--resume")["minutes"]
    assert 10 <= minutes < 12, minutes
    assert json.loads((out / "summary.json").read_text())["minutes"] == minutes
    assert run(old, "--steps", "2", "--resume")["minutes"] < 2  # its earlier time is unknown


def test_a_broken_sandbox_stops_the_run_with_its_checkpoint_and_advice(run, tmp_path):
    """A sandbox that cannot run the replies must stop training (not score them -1): the message names
    the sandbox, the step the checkpoint holds and --resume, which then finishes the run."""
    import sandbox
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch, train.reinforce, "rollout", on_call=2,
                  error=sandbox.SandboxError("the sandbox could not run 2 of 2 replies"))
        with pytest.raises(SystemExit) as stop:
            run(out, "--steps", "2")
    message = str(stop.value.code)
    assert "sandbox" in message and f"{out / 'checkpoint.pt'} is intact and holds step 1" in message and "--resume" in message
    assert run(out, "--steps", "2", "--resume")["steps"] == 2


def test_a_broken_sandbox_in_the_final_test_evaluation_says_resume_finishes_it(run, tmp_path):
    """Calls of evaluate_split with --steps 1: validation at 0 and at 1, then the base model on the test
    split (the sandbox fails here); --resume then does the evaluation."""
    import sandbox
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch, train.parallel, "evaluate_split", on_call=3,
                  error=sandbox.SandboxError("the sandbox could not run 2 of 2 replies"))
        with pytest.raises(SystemExit) as stop:
            run(out, "--steps", "1")
    message = str(stop.value.code)
    assert "sandbox" in message and "final test evaluation" in message
    assert f"{out / 'checkpoint.pt'} is intact and holds step 1" in message and "--resume" in message
    assert run(out, "--steps", "1", "--resume")["steps"] == 1
