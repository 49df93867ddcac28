"""What train.py continues from and what it saves: a checkpoint that would run code is refused without
torch's advice to load it unsafely, a checkpoint whose contents are not what train.py writes is refused
with its name and what is wrong, and a run whose loss, gradient or z stops being finite stops there,
before anything non-finite is saved."""

import os
import pickle
import shutil

import pytest
import torch

import checkpoint
import model as m
import reinforce
import tasks
import train
from test_reinforce import EvenFirstToken
from test_train_runs import FLAGS, records, run  # noqa: F401 (run is a fixture)

ADVICE = ("weights_only", "Re-running", "will likely succeed", "add_safe_globals")


# ---- a checkpoint that would run code


class CallsSystem:
    """Unpickling this calls os.system (pickled as posix.system): a shell command from a crafted file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_call_os_system_is_refused_by_name_without_unsafe_advice(run, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    run(out, "--steps", "1")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["history"] = [CallsSystem(marker)]
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(SystemExit) as stop:
        run(out, "--steps", "1", "--resume")
    message = str(stop.value.code)
    assert str(out / "checkpoint.pt") in message and "refused" in message and "would call posix.system" in message
    assert not any(advice in message for advice in ADVICE), message
    assert not marker.exists()


@pytest.mark.parametrize("text, named", [
    # torch's advice with no WeightsUnpickler marker and no name: the reason is kept, the advice is not
    ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
     "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
     "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
     "source.\n\nUnsupported operand 149", None),
    # another wording around the name
    ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed. "
     "Refusing GLOBAL nt.system, which is not allowed.", "nt.system"),
])
def test_refusals_in_other_wordings_never_repeat_the_advice(tmp_path, monkeypatch, text, named):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not read")

    def refusing_load(*args, **kwargs):
        raise pickle.UnpicklingError(text)

    monkeypatch.setattr(torch, "load", refusing_load)
    with pytest.raises(RuntimeError) as error:
        checkpoint.load(path)
    message = str(error.value)
    assert str(path) in message and not any(advice in message for advice in ADVICE), message
    if named:
        assert f"would call {named}," in message
    else:
        assert "Unsupported operand 149" in message and "did not name" in message


# ---- a checkpoint whose contents train.py never writes


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory):
    """The folder of a finished 2-step run, to copy and edit."""
    out = tmp_path_factory.mktemp("finished") / "run"
    _, tokenizer = m.load(tiny_llama, device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks, "get", lambda name, **kw: EvenFirstToken(tokenizer))
        train.main([*FLAGS, "--model", str(tiny_llama), "--out", str(out), "--steps", "2"])
    return out


def nan_moments(state):
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"].fill_(float("nan"))


HOSTILE = {
    "nan-z": (lambda s: [v.fill_(float("nan")) for v in s["z"].values()], "its z holds non-finite values"),
    "best-none": (lambda s: s.update(best=None), "its best is None"),
    "history-str": (lambda s: s.update(history="not a list"), "its history is a str ('not a list')"),
    "step-huge": (lambda s: s.update(step=10**6), "its step is 1000000, beyond the run's 2 steps"),
    "step-bool": (lambda s: s.update(step=True), "its step is a bool"),
    "int-z": (lambda s: s.update(z={k: v.long() for k, v in s["z"].items()}), "not a floating-point tensor"),
    "nan-moments": (nan_moments, "its optimizer holds non-finite values (NaN or inf) in exp_avg"),
    "scheduler-key": (lambda s: s["scheduler"].update(optimizer="x"), "its scheduler holds the keys ['optimizer']"),
    "scheduler-step": (lambda s: s["scheduler"].update(last_epoch=7), "its scheduler is at step 7, and the checkpoint at step 2"),
    "rng": (lambda s: s.update(torch_rng=torch.zeros(3)), "its torch_rng is a float32 tensor of shape (3,)"),
    "history-tensor": (lambda s: s["history"][-1].update(reward=torch.ones(2)), "values that are not numbers"),
    "history-ahead": (lambda s: s["history"].append(dict(step=5)), "not a record of a step from 2 to 2"),
    "best-nan-z": (lambda s: [v.fill_(float("nan")) for v in s["best"]["z"].values()], "its best z holds non-finite"),
    "best-accuracy": (lambda s: s["best"].update(accuracy=7.0), "its best has the accuracy a float (7.0)"),
    "seconds": (lambda s: s.update(seconds=-1.0), "its seconds is a float (-1.0)"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_checkpoint_with_contents_train_py_never_writes_is_refused(run, finished, tmp_path, case):
    edit, said = HOSTILE[case]
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, out / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".train.lock"}
    with pytest.raises(SystemExit) as stop:
        run(out, "--steps", "2", "--resume")
    message = str(stop.value.code)
    assert str(out / "checkpoint.pt") in message and said in message, message
    assert "--overwrite" in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".train.lock"} == before  # nothing rewritten


# ---- a run that diverges


@pytest.mark.parametrize("flags, advice", [
    (["--method", "lora", "--lr", "1e308"], "a smaller --lr (now 1e+308),"),  # LoRA factors have no bound at parse time
    (["--kl", "1e308"], "a smaller --lr (now 0.05) or --kl (now 1e+308),"),
])
def test_a_huge_lr_or_kl_stops_the_run_at_step_1_and_saves_nothing(run, tmp_path, flags, advice):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run(out, "--steps", "2", *flags)
    message = str(stop.value.code)
    assert "diverged at step 1" in message and advice in message and "nothing was saved" in message
    assert not (out / "checkpoint.pt").exists() and not (out / "expert.safetensors").exists()
    assert [r["step"] for r in records(out)] == [0]  # the validation before training, no record of the step


@pytest.mark.parametrize("flags, limit", [(["--lr", "1e308"], "30"), (["--lr", "30"], "30"),
                                          (["--lr", "10", "--param", "scale"], "10")])
def test_an_lr_that_moves_z_out_of_an_experts_range_in_one_step_is_refused_before_loading(tmp_path, monkeypatch,
                                                                                           flags, limit):
    """AdamW's first step moves each z by about lr; an expert holds |z| <= 30 (mask) or 10 (scale)."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --lr was checked")

    monkeypatch.setattr(m, "load", no_model)
    monkeypatch.setattr(tasks, "get", no_model)
    with pytest.raises(SystemExit) as stop:
        train.main(["--task", "cls", "--preset", "cpu", "--out", str(tmp_path / "run"), *flags])
    message = str(stop.value.code)
    assert f"--lr {float(flags[1]):g} is too large" in message and f"below {limit}" in message
    assert not (tmp_path / "run").exists()


def test_a_z_beyond_what_an_expert_may_hold_stops_the_run_before_it_is_saved(run, tmp_path):
    """--param scale with lr 9: the first step moves z (from 1) by about 9, the second beyond 10."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run(out, "--steps", "4", "--param", "scale", "--lr", "9")
    message = str(stop.value.code)
    assert "diverged at step" in message and "an expert may hold" in message and "--lr (now 9.0)" in message
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] < 4 and max(z.abs().max().item() for z in state["z"].values()) <= 10
    assert not (out / "expert.safetensors").exists()


def test_a_non_finite_loss_at_step_2_keeps_the_finite_checkpoint_of_step_1(run, tmp_path, monkeypatch):
    real_loss, calls = reinforce.policy_loss, []

    def nan_from_step_2(*args, **kwargs):
        calls.append(1)
        loss, pg, kl = real_loss(*args, **kwargs)
        return (loss * float("nan"), pg, kl) if len(calls) >= 2 else (loss, pg, kl)

    monkeypatch.setattr(reinforce, "policy_loss", nan_from_step_2)  # one micro-batch per step
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run(out, "--steps", "3")
    message = str(stop.value.code)
    assert "diverged at step 2" in message and f"{out / 'checkpoint.pt'} holds step 1" in message
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(z).all() for z in state["z"].values())
    assert not (out / "expert.safetensors").exists()
