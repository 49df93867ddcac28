"""A training run's folder: held by one run at a time, its checkpoint written atomically and read back
without unpickling code, checked field by field before a run continues from it, resumed only by the
run it belongs to, and never overwritten by another run unless asked to."""

import errno
import fcntl
import json
import math
import os
import re
from pathlib import Path

import torch

import common


# ----------------------------------------------------------------------------------------------
# The run folder: one run at a time


LOCK_FILE = ".train.lock"


def check_folder(out: Path):
    """Refuse an --out that cannot be a folder, before anything loads."""
    if out.is_symlink() and not out.exists():
        raise SystemExit(f"train.py: --out {out} is a symbolic link to {os.readlink(out)}, which does not exist: "
                         f"create that folder, remove the link, or give another --out")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"train.py: --out {out} is a file, not a folder: give a folder for the run (it is created "
                         f"if missing)")


def lock_folder(out: Path):
    """Create out if needed and hold out/.train.lock locked (flock) for this run; return the open file.
    Two runs writing one folder interleave their metrics and replace each other's checkpoint and
    expert, so the second is refused at once. The lock belongs to the open file, so closing it or the
    end of the process, however it ends (kill -9 included), releases it: a stale lock file is never
    mistaken for a running run. The file holds the holder's process id, for the refusal's message."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_FILE, "a+")  # "a+": a refused run must not truncate the holder's pid
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            raise SystemExit(f"train.py: cannot create the folder --out {out}: a part of its path is a file, not a "
                             f"folder ({e.strerror}); give another --out") from None
        raise SystemExit(f"train.py: cannot write in --out {out} ({e.strerror}): give an --out on a writable disk, "
                         f"or make {out} writable") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip()
        lock.close()
        holder = f" (process {pid})" if pid.isdigit() else ""
        raise SystemExit(f"train.py: {out} is in use by another train.py run{holder}: wait for it to finish, or "
                         f"give this run another --out") from None
    except OSError as e:  # a file system without locks (some network mounts): run, but say what is not guarded
        print(f"[train] warning: cannot lock {out / LOCK_FILE} ({e.strerror}); another run started in {out} "
              f"meanwhile would not be refused")
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except OSError:
        pass  # the pid only improves another run's message
    return lock


def disk_full(error: BaseException) -> bool:
    """Whether a failed write ran out of space. Python and safetensors report ENOSPC; torch.save's
    stream writer loses the errno and says only that it wrote fewer bytes than it meant to
    ("unexpected pos 576 vs 534") or that the stream failed ("iostream error"), which on a local disk
    is a full disk or quota."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "os error 28", "Disk quota exceeded",
                                         "unexpected pos", "iostream error"))


# ----------------------------------------------------------------------------------------------
# The checkpoint


def save(path: Path, state: dict):
    """torch.save to a temporary file, then rename: an interrupted write never replaces a good checkpoint."""
    with common.atomic_path(path) as tmp:
        torch.save(state, tmp)


# torch's text around a refusal advises weights_only=False (which would run whatever the file holds) or
# allowlisting the global; neither is shown.
ADVICE = re.compile(r"weights.only|re-running|trusted source|documentation|file an issue|safe_globals|pytorch 2\.\d",
                    re.IGNORECASE)


def load(path: Path) -> dict:
    """The checkpoint at path, read with weights_only=True: tensors and plain Python data (all that
    save writes) load, and a file that asks to call anything else is refused before it runs."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        # torch names the callable after GLOBAL: "Unsupported global: GLOBAL posix.system was not an allowed
        # global" (older), "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" (2.13).
        refused = re.search(r"\bGLOBAL\s+([A-Za-z_][\w.]*)", message)
        if refused:
            raise RuntimeError(f"checkpoint {path} was refused: loading it would call {refused.group(1).rstrip('.')}, "
                               f"and train.py loads only tensors and plain data, so nothing in it ran. A checkpoint "
                               f"written by train.py holds no such thing: delete this file, or restore a copy from "
                               f"train.py") from None
        sentences = re.split(r"(?<=[.!?])\s+|\n+", message)
        reason = " ".join(s.strip() for s in sentences if s.strip() and not ADVICE.search(s))
        reason = reason.removeprefix("WeightsUnpickler error:").strip() or "torch gave no other reason"
        if "Weights only load failed" in message:
            # The weights-only reader stopped without naming a callable: a damaged file, or one holding
            # something other than tensors and plain data. Either way nothing in it ran.
            raise RuntimeError(f"checkpoint {path} is unreadable: torch's weights-only reader stopped at something "
                               f"that is not tensors or plain data and did not name what it would call ({reason}); "
                               f"nothing in it ran; delete it to start over, or restore a copy") from None
        raise RuntimeError(f"checkpoint {path} is unreadable ({e.__class__.__name__}: {reason}); "
                           f"delete it to start over, or restore a copy") from None


# ----------------------------------------------------------------------------------------------
# Starting a run, or continuing one


RUN_FILES = ("metrics.jsonl", "checkpoint.pt", "expert.safetensors", "summary.json", "test-base.jsonl",
             "test-expert.jsonl", "learning_curve.png", "config.json")


def holds_run(out: Path) -> list[str]:
    """The files of an earlier run in out: its records, checkpoint or results (an empty metrics.jsonl and a
    config.json alone are a run that stopped before it measured anything)."""
    held = [name for name in ("checkpoint.pt", "expert.safetensors", "summary.json") if (out / name).exists()]
    metrics = out / "metrics.jsonl"
    return (["metrics.jsonl"] if metrics.exists() and metrics.stat().st_size > 0 else []) + held


def start_fresh(out: Path, overwrite: bool, rank: int):
    """A new run never replaces an old one unless told to: without --overwrite a folder holding a run is
    refused; with it, that run's files are deleted, so none of them can be mistaken for the new run's."""
    held = holds_run(out)
    if held and not overwrite:
        raise SystemExit(f"{out} already holds a run ({', '.join(held)}): continue it with --resume, start the new "
                         f"run in another --out, or add --overwrite to delete the old one")
    if overwrite and rank == 0:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


CHECKPOINT_KEYS = ("z", "optimizer", "scheduler", "torch_rng", "history", "step", "best", "config")
# Settings that may change when a run is resumed: where and how fast the same computation runs.
# --micro-batch and --gen-batch split the same batch into other forward passes (train_step weighs each
# micro-batch into the batch mean), so a run that ran out of memory can continue with smaller ones; with
# another number of processes each rolls out another share (with --temperature > 0, other samples). Every
# other setting changes what is trained or how it is chosen and measured, and must match; --steps too,
# since the cosine schedule decays to 0 over the total, so another total would be neither run.
# Settings added after runs were checkpointed without them; such a run used these values.
SETTINGS_BEFORE_THEY_EXISTED = dict(samples=1, scale_by_std=False, shuffle_options=False)
RESUME_MAY_DIFFER = {"device", "threads", "compile", "dtype", "weights_dtype", "micro_batch", "gen_batch", "processes",
                     "out", "command", "resume", "overwrite", "tensorboard"}


def resume_state(path: Path, config: dict) -> dict:
    """The checkpoint to continue from, once it is known to be train.py's and of the run `config` describes."""
    try:
        state = load(path)
    except FileNotFoundError as e:
        held = holds_run(path.parent)
        raise SystemExit(f"{e}" + (f", and with --overwrite: {path.parent} holds files of a run ({', '.join(held)}) "
                                   f"but no checkpoint to continue it from" if held else "")) from None
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    if not (isinstance(state, dict) and all(key in state for key in CHECKPOINT_KEYS)
            and isinstance(state["config"], dict)):
        missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else []
        holds = f"it lacks {', '.join(missing)}" if missing else f"it holds a {type(state).__name__}"
        raise SystemExit(f"--resume: {path} is not a train.py checkpoint ({holds}); give the --out of the run to "
                         f"continue, or start a new run: in another --out, or in this one with --overwrite")
    check_contents(path, state)
    saved = {**SETTINGS_BEFORE_THEY_EXISTED, **state["config"]}
    differ = [key for key in sorted(set(saved) | set(config))
              if key not in RESUME_MAY_DIFFER and saved.get(key) != config.get(key)]
    if differ:
        def shown(value):
            return "unset" if value is None else str(value)
        lines = [f"  --{key.replace('_', '-')}: {shown(saved.get(key))} in the checkpoint, "
                 f"{shown(config.get(key))} on this command line" for key in differ]
        raise SystemExit(f"--resume: {path} is a run with other settings than this command's:\n" + "\n".join(lines) +
                         f"\nresume with the run's settings ({path.parent / 'config.json'} lists them), or start a "
                         f"new run in another --out")
    return state


# ----------------------------------------------------------------------------------------------
# A checkpoint's contents, field by field


def whole(value) -> bool:
    """An int that is not a bool (True == 1 in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def number(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def describe(value) -> str:
    """What a value is, for a message: its type, and a short repr."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        name, text = f"{str(value.dtype).removeprefix('torch.')} tensor", f"of shape {tuple(value.shape)}"
    else:
        name, text = type(value).__name__, repr(value)
        text = f"({text[:40]}{'...' if len(text) > 40 else ''})"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} {text}"


def scheduler_keys() -> set[str]:
    """The keys this torch's LambdaLR saves (older torch versions also saved verbose). LambdaLR.load_state_dict
    sets each key as an attribute of the scheduler, so another key (say, optimizer) would replace a part of it."""
    param = torch.zeros(1, requires_grad=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=1.0), lambda step: 1.0)
    return set(scheduler.state_dict()) | {"verbose"}


def check_contents(path: Path, state: dict):
    """Every field of a checkpoint of the type and in the range train.py writes. A damaged or edited file
    would otherwise resume silently with NaN z (the NaN spreads to every weight it touches), crash hours
    later (best=None at the final evaluation), rewrite metrics.jsonl from a string one character per line,
    or claim steps that were never taken."""
    def refuse(field, problem):
        raise SystemExit(f"--resume: {path} cannot be continued: its {field} {problem}. train.py never writes such a "
                         f"checkpoint, so the file was damaged or edited: restore a copy, or start the run again with "
                         f"--overwrite (which deletes it)")

    def check_tensors(field, tensors):
        if not isinstance(tensors, dict) or not tensors:
            refuse(field, f"is {describe(tensors)}, not the trained tensors by name")
        for name, value in tensors.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                refuse(field, f"holds {name!r} as {describe(value)}, not a floating-point tensor")
            if not torch.isfinite(value).all():
                refuse(field, f"holds non-finite values (NaN or inf) in {name}")

    # step: a checkpoint is written after each step, so 1 to the run's total.
    step, total = state["step"], state["config"].get("steps")
    if not whole(step) or step < 1:
        refuse("step", f"is {describe(step)}, not a number of steps >= 1 (a checkpoint is written after a step)")
    if whole(total) and step > total:
        refuse("step", f"is {step}, beyond the run's {total} steps")

    check_tensors("z", state["z"])

    # optimizer: AdamW's state_dict; its moments drive every later update, so they must be finite too.
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list) and optimizer["param_groups"]):
        refuse("optimizer", f"is {describe(optimizer)}, not an optimizer state (a dict of state and param_groups)")
    for group in optimizer["param_groups"]:
        if not (isinstance(group, dict) and number(group.get("lr")) and group["lr"] >= 0
                and isinstance(group.get("params"), list)):
            refuse("optimizer", f"has the parameter group {describe(group)}, not one with a finite learning rate >= 0 "
                                f"and its list of parameters")
    for index, moments in optimizer["state"].items():
        if not isinstance(moments, dict):
            refuse("optimizer", f"holds {describe(moments)} for parameter {index!r}, not a dict of its moments")
        for key, value in moments.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                refuse("optimizer", f"holds non-finite values (NaN or inf) in {key} of parameter {index!r}")

    # scheduler: LambdaLR's state_dict, stepped once per training step from last_epoch 0.
    scheduler, known = state["scheduler"], scheduler_keys()
    if not isinstance(scheduler, dict) or not set(scheduler) <= known:
        other = sorted(map(str, set(scheduler) - known)) if isinstance(scheduler, dict) else []
        refuse("scheduler", f"holds the keys {other}, which LambdaLR does not save" if other else
               f"is {describe(scheduler)}, not a learning-rate scheduler's state")
    last_epoch = scheduler.get("last_epoch")
    if not whole(last_epoch) or last_epoch != step:
        refuse("scheduler", f"is at step {last_epoch!r}, and the checkpoint at step {step}")
    for key in ("base_lrs", "_last_lr"):
        rates = scheduler.get(key, [0.0])
        if not isinstance(rates, list) or not all(number(rate) and rate >= 0 for rate in rates):
            refuse("scheduler", f"holds {key} = {describe(rates)}, not a list of finite learning rates >= 0")

    rng, expected = state["torch_rng"], torch.get_rng_state()
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == expected.shape):
        refuse("torch_rng", f"is {describe(rng)}, not torch's random-number state (a uint8 tensor of shape "
                            f"{tuple(expected.shape)})")

    # history: the records of metrics.jsonl up to this step, from the validation before training on.
    history = state["history"]
    if not isinstance(history, list) or not history:
        refuse("history", f"is {describe(history)}, not the list of logged records")
    last = 0
    for i, record in enumerate(history):
        if not (isinstance(record, dict) and whole(record.get("step")) and last <= record["step"] <= step):
            refuse("history", f"holds {describe(record)} as record {i}, not a record of a step from {last} to {step}")
        last = record["step"]
        accuracy = record.get("valid_accuracy", 0.0)
        if not (number(accuracy) and 0 <= accuracy <= 1):
            refuse("history", f"holds the validation accuracy {describe(accuracy)} in record {i}, not one from 0 to 1")
        try:
            json.dumps(record)
        except (TypeError, ValueError):
            refuse("history", f"holds record {i} with values that are not numbers and text: {describe(record)}")
    if history[0]["step"] != 0 or "valid_accuracy" not in history[0]:
        refuse("history", f"starts with {describe(history[0])}, not the validation before training (step 0)")
    if last != step:
        refuse("history", f"ends at step {last}, and the checkpoint is at step {step}")

    # best: the best validation so far and its z, which becomes the expert.
    best = state["best"]
    if not (isinstance(best, dict) and all(key in best for key in ("step", "accuracy", "interval", "z"))):
        refuse("best", f"is {describe(best)}, not the best validation so far (a dict of step, accuracy, interval, z)")
    if not whole(best["step"]) or not 0 <= best["step"] <= step:
        refuse("best", f"is from step {describe(best['step'])}, not one of steps 0 to {step}")
    interval = best["interval"]
    if not (number(best["accuracy"]) and 0 <= best["accuracy"] <= 1 and isinstance(interval, (list, tuple))
            and len(interval) == 2 and all(number(x) and 0 <= x <= 1 for x in interval)):
        refuse("best", f"has the accuracy {describe(best['accuracy'])} and interval {describe(interval)}, not "
                       f"an accuracy and a 95% interval from 0 to 1")
    check_tensors("best z", best["z"])
    if {k: tuple(v.shape) for k, v in best["z"].items()} != {k: tuple(v.shape) for k, v in state["z"].items()}:
        refuse("best z", "has other names or shapes than its z")

    # seconds: training time of the processes before this one (checkpoints from before it have none).
    seconds = state.get("seconds", 0.0)
    if not number(seconds) or seconds < 0:
        refuse("seconds", f"is {describe(seconds)}, not a training time in seconds >= 0")
