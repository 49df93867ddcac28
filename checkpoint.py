"""A training run's folder: its checkpoint written atomically and read back without unpickling code,
resumed only by the run it belongs to, and never overwritten by another run unless asked to."""

import re
from pathlib import Path

import torch

import common


def save(path: Path, state: dict):
    """torch.save to a temporary file, then rename: an interrupted write never replaces a good checkpoint."""
    with common.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path) -> dict:
    """The checkpoint at path, read with weights_only=True: tensors and plain Python data (all that
    save_checkpoint writes) load, and a file that asks to call anything else is refused before it runs."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if refused:
            raise RuntimeError(f"checkpoint {path} was refused: loading it would call {refused.group(1)}, and train.py "
                               f"loads only tensors and plain data, so nothing in it ran. A checkpoint written by "
                               f"train.py holds no such thing: delete this file, or restore a copy from train.py") from None
        # A truncated or foreign file. torch's text suggests weights_only=False, which would run whatever the
        # file holds, so keep only its reason.
        reason = " ".join(message.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
        raise RuntimeError(f"checkpoint {path} is unreadable ({e.__class__.__name__}: {reason}); "
                           f"delete it to start over, or restore a copy") from None


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
