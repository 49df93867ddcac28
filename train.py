"""Train an SVF expert with REINFORCE on one task (the paper's §3.1; reinforce.py holds the objective).

    python train.py --task gsm8k                 # the paper's settings on a GPU; a small preset on a CPU
    python train.py --task cls --steps 30        # the classification expert z^c
    python train.py --task arc_easy --resume     # continue from runs/arc_easy-.../checkpoint.pt

Evaluates on the validation split before training and every --eval-every steps, keeps the best z by
validation accuracy (the paper's early stopping), and evaluates that expert and the base model on the
test split at the end. Writes to --out: config.json, metrics.jsonl, checkpoint.pt (atomic, after every
step; --resume continues from it, with the run's settings), expert.safetensors (the best z, with its
metadata and command), and learning_curve.png when matplotlib is installed. A folder that holds a run is
not started over without --overwrite, and a folder another run is writing is refused (.train.lock). A run
whose loss, gradient or z becomes non-finite stops there, before it saves anything non-finite.

Data parallel over several GPUs (or CPU processes) with torchrun:

    torchrun --nproc_per_node 4 train.py --task gsm8k

Every process holds the whole model and its own z; each rolls out and evaluates its share of the
examples, gradients are summed over the processes (reinforce.py), so all of them take the same step.
Process 0 alone prints, logs and writes files.
"""

import argparse
import dataclasses
import json
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import common
import evaluate
import generate as gen
import model as m
import parallel
import reinforce
import sandbox
import svf as svf_lib
import tasks
from lora import LoRA


@dataclass
class Settings:
    """What a run trains and how, where a preset decides it: PAPER and CPU below are values of it, and a
    flag given on the command line wins over either."""
    targets: str = "mlp"  # the matrices with a z: mlp, attn or all
    param: str = "mask"  # scale: the paper's formula; mask: the reference code's
    kl: float = 0.0  # λ, weight of KL(π_W' || π_W)
    baseline: str = "mean"  # see reinforce.py for why the paper's recipe is run with the mean baseline
    samples: int = 1  # replies per prompt
    temperature: float = 0.0  # 0: greedy rollouts, as the reference code
    scale_by_std: bool = False
    shuffle_options: bool = False
    lr: float = 2e-3
    clip: float = 1e-3  # max gradient norm
    batch_size: int = 256  # prompts per update
    micro_batch: int = 16  # replies per forward+backward
    gen_batch: int = 64  # rows of the generation batch
    steps: int | None = None  # None: `epochs` over the train split
    epochs: float = 1
    max_new_tokens: int | None = None  # None: the task's own reply budget
    eval_every: int = 5
    eval_limit: int | None = None  # None: the whole validation split
    test_limit: int | None = None  # None: the whole test split
    autocast: str | None = None  # "bf16": bf16 autocast for forward+backward; None or "none": the weights' dtype


# The paper's settings (Table 6).
PAPER = Settings()
# A preset for a CPU-only machine given no flags: 20-60 minutes on 2 cores, and the cls task still learns.
# Measured settings of a prototype on the default model: batch 16, lr 1e-2, MLP targets, short replies,
# bf16 autocast where the CPU has bf16 in hardware (fp32 elsewhere), about 20 s per step.
CPU = Settings(batch_size=16, micro_batch=8, gen_batch=16, steps=30, lr=1e-2, eval_limit=100, test_limit=200,
               autocast="bf16")
# Reply budgets per task, and fewer steps and evaluations where replies are long. Measured on 2 cores
# with one thread each (RESULTS.md): gsm8k 19 minutes, mbpp 43 minutes, cls 63, arc_easy 19.
CPU_PER_TASK = {"cls": dict(max_new_tokens=24), "arc_easy": dict(max_new_tokens=24),
                "gsm8k": dict(max_new_tokens=128, steps=10, eval_limit=50, test_limit=100),
                "mbpp": dict(max_new_tokens=128, steps=20, eval_limit=50)}


def preset_settings(preset: str, task: str) -> Settings:
    return PAPER if preset == "paper" else dataclasses.replace(CPU, **CPU_PER_TASK.get(task, {}))


def with_defaults(name: str, text: str = "") -> str:
    """A recipe flag's help, ending with what each preset gives it (--help shows the real defaults)."""
    cpu = {task: getattr(preset_settings("cpu", task), name) for task in TRAINABLE_TASKS}
    shown = repr(cpu["cls"]) if len(set(cpu.values())) == 1 else ", ".join(f"{t} {v!r}" for t, v in cpu.items())
    return f"{text}{' ' if text else ''}[paper: {getattr(PAPER, name)!r}; CPU preset: {shown}]"


TRAINABLE_TASKS = ("gsm8k", "mbpp", "arc_easy", "cls")
VALID_SPLIT = "valid"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=TRAINABLE_TASKS)
    p.add_argument("--model", default=m.DEFAULT_MODEL)
    p.add_argument("--targets", choices=sorted(svf_lib.TARGETS), help=with_defaults("targets"))
    p.add_argument("--param", choices=svf_lib.PARAMETRIZATIONS,
                   help=with_defaults("param", "scale: the paper's formula; mask: the reference code's"))
    p.add_argument("--kl", type=common.non_negative_float, help=with_defaults("kl", "λ, weight of KL(π_W' || π_W)"))
    p.add_argument("--baseline", choices=("group", "mean", "none"), help=with_defaults(
        "baseline", "advantage: group, r minus the mean of the other replies to the same prompt (needs --samples "
                    ">= 2); mean, r - mean(r) over the batch; none, r (the paper's exact setting)"))
    p.add_argument("--samples", type=common.positive_int,
                   help=with_defaults("samples", "replies sampled per prompt, K (1: the paper's setting)"))
    p.add_argument("--scale-by-std", action="store_true", default=None, help=with_defaults(
        "scale_by_std", "divide each prompt's group advantages by the std of its K rewards (as GRPO)"))
    p.add_argument("--shuffle-options", action="store_true", default=None, help=with_defaults(
        "shuffle_options", "multiple-choice tasks: train on the options in a new random order every time a prompt is used"))
    p.add_argument("--batch-size", type=common.positive_int, help=with_defaults("batch_size", "prompts per update"))
    p.add_argument("--micro-batch", type=common.positive_int, help=with_defaults(
        "micro_batch", "replies per forward+backward (gradient accumulation); a step has batch-size x samples"))
    p.add_argument("--gen-batch", type=common.positive_int,
                   help=with_defaults("gen_batch", "rows of the generation batch (replies decoded at once)"))
    p.add_argument("--steps", type=common.positive_int,
                   help=with_defaults("steps", "updates (None: --epochs over the train split)"))
    p.add_argument("--epochs", type=common.positive_float, help=with_defaults("epochs"))
    p.add_argument("--lr", type=common.positive_float, help=with_defaults("lr"))
    p.add_argument("--clip", type=common.positive_float, help=with_defaults("clip", "max gradient norm"))
    p.add_argument("--max-new-tokens", type=common.positive_int,
                   help=with_defaults("max_new_tokens", "reply budget (None: the task's own)"))
    p.add_argument("--temperature", type=common.non_negative_float,
                   help=with_defaults("temperature", "rollout sampling; 0 is greedy, as the reference code"))
    p.add_argument("--eval-every", type=common.positive_int, help=with_defaults("eval_every"))
    p.add_argument("--eval-limit", type=common.positive_int,
                   help=with_defaults("eval_limit", "validation examples per evaluation (None: all)"))
    p.add_argument("--test-limit", type=common.positive_int,
                   help=with_defaults("test_limit", "test examples in the final evaluation (None: all)"))
    p.add_argument("--autocast", choices=("bf16", "none"), help=with_defaults(
        "autocast", "bf16 autocast for forward+backward (the CPU preset's bf16 becomes none on a CPU without "
                    "bf16 in hardware)"))
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/<task>-<param>-<targets>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one, deleting its files")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=common.thread_count, default=None)
    p.add_argument("--method", choices=("svf", "lora"), default="svf", help="what is trained: SVF z vectors or LoRA (q, v)")
    p.add_argument("--objective", choices=("rl", "nexttoken"), default="rl",
                   help="REINFORCE on the task's reward, or supervised next-token loss on reference replies")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the SVF training forward and the decode step of the rollouts and "
                        "evaluations (auto: on a GPU, where decode steps are captured as CUDA graphs either way; "
                        "on a CPU it did not help in bench/svf.py)")
    p.add_argument("--dtype", choices=common.DTYPES, default="auto", help=common.DTYPE_HELP)
    p.add_argument("--label-rule", choices=("strict", "lenient"),
                   help="--task cls only: how a reply names its category, for the reward: strict, boxed only (the "
                        "paper's rule); lenient (default), else the first category word")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log every metric to <out>/tensorboard (needs the tensorboard package; metrics.jsonl stays the record)")
    p.add_argument("--preset", choices=("auto", "paper", "cpu"), default="auto",
                   help="auto: the CPU preset when there is no GPU, else the paper's settings")
    args = p.parse_args(argv)
    if args.label_rule and args.task != "cls":
        p.error("--label-rule is for --task cls (the classification expert)")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite deletes it: give one of them")
    replies = args.batch_size * (args.samples or 1) if args.batch_size else None
    if args.micro_batch and replies and args.micro_batch > replies:
        p.error(f"--micro-batch {args.micro_batch} is larger than one update's {replies} replies (--batch-size x "
                f"--samples): a micro-batch is a slice of one update's batch; give --micro-batch {replies} or less")
    return args


def check_recipe(config: dict):
    """Settings that contradict each other, once the preset has filled in what the flags left out."""
    def fail(message):
        raise SystemExit(f"train.py: {message}")
    if config["baseline"] == "group" and config["samples"] < 2:
        fail(f"--baseline group compares the replies to one prompt: give --samples 2 or more (now {config['samples']})")
    if config["samples"] > 1 and config["temperature"] == 0:
        fail(f"--samples {config['samples']} greedy replies to one prompt are identical: give --temperature > 0 (e.g. 1.0)")
    if config["scale_by_std"] and config["baseline"] != "group":
        fail("--scale-by-std scales the group advantages: it goes with --baseline group")
    if config["objective"] == "nexttoken" and config["samples"] > 1:
        fail("--samples is for --objective rl (the next-token objective trains on the reference replies)")
    # AdamW's first step moves every z by about the learning rate (its bias-corrected update is ±lr), so an
    # lr of svf.Z_LIMIT or more takes z out of the range an expert file may hold in one step.
    limit = svf_lib.Z_LIMIT[config["param"]]
    if config["method"] == "svf" and config["lr"] >= limit:
        fail(f"--lr {config['lr']:g} is too large: AdamW's first step moves each z by about the learning rate, and an "
             f"expert holds |z| <= {limit:g} (--param {config['param']}); give an --lr below {limit:g} (the paper's is "
             f"{PAPER.lr:g})")


def make_task(config) -> tasks.Task:
    """The task to train on; the classification task with the label rule of its reward."""
    if config["task"] == "cls":
        return tasks.get("cls", strict=config["label_rule"] == "strict")
    return tasks.get(config["task"])


def resolve_config(args) -> dict:
    """Flags given on the command line win; the rest come from the preset."""
    device = torch.device(args.device) if args.device else common.default_device()
    preset = args.preset if args.preset != "auto" else ("cpu" if device.type == "cpu" else "paper")
    config = dataclasses.asdict(preset_settings(preset, args.task))
    for key, value in vars(args).items():
        if value is not None or key not in config:
            config[key] = value
    if preset == "cpu" and args.autocast is None and device.type == "cpu" and not common.cpu_has_native_bf16():
        config["autocast"] = "none"  # emulated bf16 is many times slower than fp32 (common.cpu_has_native_bf16)
    config["preset"] = preset
    config["device"] = str(device)
    config["compile"] = common.compile_wanted(args.compile, device)
    config["max_new_tokens"] = config["max_new_tokens"] or tasks.get(args.task).max_new_tokens
    # A preset's micro-batch can exceed a smaller --batch-size; the batch then goes in one pass, the same
    # update, and the config says so.
    config["micro_batch"] = min(config["micro_batch"], config["batch_size"] * config["samples"])
    if args.task == "cls":
        config["label_rule"] = args.label_rule or "lenient"
    adapter = f"{config['param']}-{config['targets']}" if config["method"] == "svf" else "lora"
    strict = "-strict" if config.get("label_rule") == "strict" else ""
    config["out"] = config["out"] or f"runs/{args.task}-{adapter}-{config['objective']}{strict}"
    config["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    check_recipe(config)
    return config


def batches(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples for a step: a fresh seeded permutation each epoch, so the order depends
    only on (seed, step) and a resumed run sees exactly the examples an uninterrupted one would."""
    per_epoch = max(n_examples // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return order[position * batch_size:(position + 1) * batch_size]


def plot(history: list[dict], path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [h for h in history if "reward" in h]
    valid = [h for h in history if "valid_accuracy" in h]
    groups = [h for h in train if "equal_groups" in h]
    fig, axes = plt.subplots(1, 2 if train else 1, figsize=(11 if train else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot([h["step"] for h in train], [h["accuracy"] for h in train], label="train batch accuracy", alpha=0.6)
    ax.errorbar([h["step"] for h in valid], [h["valid_accuracy"] for h in valid],
                yerr=[[h["valid_accuracy"] - h["valid_interval"][0] for h in valid],
                      [h["valid_interval"][1] - h["valid_accuracy"] for h in valid]],
                marker="o", capsize=3, label="validation accuracy (95% CI)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    if train:  # the training signal: mean reward, and the share of prompts that gave no gradient
        ax = axes[0, 1]
        ax.plot([h["step"] for h in train], [h["reward"] for h in train], label="mean reward (±1)")
        if groups:
            ax.plot([h["step"] for h in groups], [h["equal_groups"] for h in groups],
                    label="share of prompts whose replies all scored the same")
        ax.set_xlabel("step")
        ax.set_ylim(-1, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    args.device = args.device or parallel.setup_distributed()
    rank, world = parallel.rank_and_world()
    config = resolve_config(args)
    config["processes"] = world
    out = Path(config["out"])
    # Before anything loads: a folder that can hold the run and that no other run is writing (process 0
    # writes every file, so it alone holds the lock; a --resume of a folder that does not exist creates
    # nothing, as there is no checkpoint to continue), then the checkpoint to continue from, or a folder
    # free for a new run.
    checkpoint.check_folder(out)
    lock = checkpoint.lock_folder(out) if rank == 0 and (out.is_dir() or not config["resume"]) else None
    try:
        state = checkpoint.resume_state(out / "checkpoint.pt", config) if config["resume"] else None
        if state is None:
            checkpoint.start_fresh(out, config["overwrite"], rank)
        out.mkdir(parents=True, exist_ok=True)
        return run(config, state, args.threads, rank, world)
    finally:
        if lock is not None:
            lock.close()  # the process's end releases it too; a caller that runs main again needs it now


def run(config: dict, state: dict | None, threads: int | None, rank: int, world: int) -> dict:
    """The run in its checked and locked folder: train from the start or from `state`, keep the best z by
    validation accuracy, then test it against the base model."""
    out = Path(config["out"])
    checkpoint_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    threads = common.set_threads(threads)
    if rank != 0:  # process 0 alone prints and writes
        sys.stdout = open(os.devnull, "w")
    print(f"[train] preset {config['preset']}" + (" (no GPU: a small preset; see CPU in train.py)" if config["preset"] == "cpu" else ""))
    print("config: " + json.dumps({**config, "threads": threads}))

    board = None
    if config["tensorboard"] and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        board = SummaryWriter(str(out / "tensorboard"))
    task = make_task(config)
    train_set, valid_set = task.load("train"), task.load(VALID_SPLIT)[: config["eval_limit"]]
    test_set = task.load("test")[: config["test_limit"]]
    steps = config["steps"] or max(int(config["epochs"] * len(train_set) / config["batch_size"]), 1)
    model, tokenizer = m.load(config["model"], dtype=common.DTYPES[config["dtype"]], device=config["device"],
                              probe_rows=config["gen_batch"])
    config["weights_dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    print(f"[train] {gen.setup_decode(config['compile'], model.embed.weight.device)}")
    torch.manual_seed(config["seed"])
    if config["method"] == "lora":
        adapter = LoRA(model, seed=config["seed"])
    else:
        adapter = svf_lib.SVF(model, targets=config["targets"], parametrization=config["param"], seed=config["seed"])
        adapter.configure_forward(svf_lib.TRAINING_FORWARD, use_compile=config["compile"])
    optimizer, scheduler = reinforce.make_optimizer(adapter.parameters(), config["lr"], steps)
    autocast = torch.bfloat16 if config["autocast"] == "bf16" else None

    history, start_step, best = [], 0, None
    saved_step = None  # the step checkpoint.pt holds, None while there is none of this run
    seconds_before = 0.0  # training time of the processes that ran this run before this one
    if state is not None:
        # checkpoint.check_contents checked each field's type and range; what remains is whether they fit
        # this model and adapter, which the settings (model, method, targets) already match.
        if state["step"] > steps:  # with --epochs the total is known only now, from the train split
            raise SystemExit(f"--resume: {checkpoint_path} cannot be continued: its step is {state['step']}, beyond "
                             f"the run's {steps} steps. The file was damaged or edited: restore a copy, or start the "
                             f"run again with --overwrite (which deletes it)")
        try:
            adapter.load_state(state["z"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise SystemExit(f"--resume: {checkpoint_path} does not fit this run's model and adapter ({e}). The file "
                             f"was damaged or edited: restore a copy, or start the run again with --overwrite (which "
                             f"deletes it)") from None
        torch.set_rng_state(state["torch_rng"])
        history, start_step, best = state["history"], state["step"], state["best"]
        seconds_before = state.get("seconds", 0.0)  # checkpoints from before it was saved: not known, counted as 0
        saved_step = start_step
        print(f"[train] resumed from {checkpoint_path} at step {start_step}")

    def log(record):
        history.append(record)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, record["step"])
            board.flush()

    def save_state(step):
        nonlocal saved_step
        if rank == 0:
            seconds = seconds_before + time.perf_counter() - started  # so that a resumed run's summary counts all
            checkpoint.save(checkpoint_path, dict(z=adapter.state(), optimizer=optimizer.state_dict(),
                                             scheduler=scheduler.state_dict(), torch_rng=torch.get_rng_state(),
                                             history=history, step=step, best=best, config=config, seconds=seconds))
        saved_step = step

    def validate(step):
        nonlocal best
        result = parallel.evaluate_split(model, tokenizer, adapter, task, valid_set, config)
        log(dict(step=step, valid_accuracy=result["accuracy"], valid_interval=result["interval"], valid_n=result["n"]))
        if best is None or result["accuracy"] > best["accuracy"]:
            best = dict(step=step, accuracy=result["accuracy"], interval=result["interval"], z=adapter.state())
        return result

    def stop_for(error) -> SystemExit | None:
        """The message for a failure of the machine rather than of the run: a write that ran out of space, or
        a code sandbox that could not run the replies (no reward was given for them, so no step used them).
        Every file is written atomically (checkpoint, expert) or rebuilt from the checkpoint on --resume
        (metrics.jsonl), so the checkpoint is whole. None for any other error."""
        if checkpoint.disk_full(error):
            what = f"the disk holding {out} is full; a write failed during {doing} ({error.__class__.__name__}: {error})"
            fix = f"free some space (or move {out} to a disk with room)"
        elif isinstance(error, sandbox.SandboxError):
            what = f"the code sandbox failed during {doing}, so those replies could not be scored ({error})"
            fix = "make sandbox.run work here (see sandbox.py's docstring)"
        else:
            return None
        if saved_step is None:
            held = f"no step had finished, so there is no checkpoint: {fix} and run the same command with --overwrite"
        else:
            held = f"{checkpoint_path} is intact and holds step {saved_step}: {fix} and continue with --resume"
        return SystemExit(f"train.py: {what}. {held}")

    started = time.perf_counter()
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=f"train {task.name}", disable=rank != 0)
    doing = "the start of the run"
    try:
        if rank == 0:
            # A run killed after logging a step but before its checkpoint left records past the checkpoint; the
            # resumed run repeats those steps. The checkpoint's history is the log up to its step, so the file
            # restarts from it (atomically) and every step appears once.
            with common.atomic_path(metrics_path) as tmp:
                tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
            (out / "config.json").write_text(json.dumps(config, indent=2))
        doing = "the validation before training"
        if start_step == 0:
            validate(0)
        for step in bar:
            doing = f"step {step + 1}"
            batch = [train_set[i] for i in batches(len(train_set), config["batch_size"], config["seed"], step)]
            if config["shuffle_options"]:  # a new order each time, from (seed, step): a resumed run sees the same
                order = random.Random(config["seed"] * 1000003 + step)
                batch = [task.shuffle_options(e, order) for e in batch]
            examples = batch[rank::world]  # this process's share of the global batch
            if config["objective"] == "nexttoken":
                stats = reinforce.nexttoken_step(model, adapter, tokenizer, task, examples, optimizer, scheduler,
                                       config["micro_batch"], config["clip"], autocast)
            else:
                rollouts = reinforce.rollout(model, tokenizer, adapter, task, examples, config["max_new_tokens"],
                                             batch_size=config["gen_batch"], temperature=config["temperature"],
                                             seed=config["seed"] * 1000003 + step + rank * 7919,
                                             samples=config["samples"])
                stats = reinforce.train_step(model, adapter, rollouts, optimizer, scheduler, config["baseline"], config["kl"],
                                             config["micro_batch"], config["clip"], autocast, config["scale_by_std"])
            if config["method"] == "svf":  # finite, but more than an expert file may hold: evaluate.py would refuse it
                largest = max(z.detach().abs().max().item() for z in adapter.parameters())
                if largest > svf_lib.Z_LIMIT[config["param"]]:
                    raise reinforce.Diverged(f"a z reached {largest:.3g}, beyond the {svf_lib.Z_LIMIT[config['param']]:g} "
                                             f"an expert may hold (--param {config['param']})")
            log(dict(step=step + 1, **stats, examples_per_process=len(examples)))
            if (step + 1) % config["eval_every"] == 0 or step + 1 == steps:
                validate(step + 1)
            last_valid = next(h for h in reversed(history) if "valid_accuracy" in h)["valid_accuracy"]
            shown = {k: f"{stats[k]:.3f}" for k in ("reward", "equal_groups", "kl", "nll") if k in stats}
            bar.set_postfix(**shown, valid=f"{last_valid:.2f}")
            save_state(step + 1)
    except KeyboardInterrupt:
        # Every finished step is already checkpointed (atomically); the step in progress is dropped, so a
        # resumed run repeats it exactly rather than applying half of it twice.
        bar.close()
        if saved_step is None:
            print(f"\n[train] interrupted during {doing}: no step had finished, so nothing was saved (no checkpoint "
                  f"in {out}); to start again, run the same command with --overwrite")
        else:
            print(f"\n[train] interrupted during {doing}: {checkpoint_path} holds step {saved_step}; continue with --resume")
        sys.exit(130)
    except reinforce.Diverged as e:
        # The step stopped before its checkpoint: the last one saved holds finite z, but continuing it with
        # the same settings would diverge again, so the advice is a new run with smaller ones.
        bar.close()
        saved = (f"{checkpoint_path} holds step {saved_step}, from before it" if saved_step is not None
                 else "nothing was saved")
        kl = f" or --kl (now {config['kl']})" if config["objective"] == "rl" and config["kl"] > 0 else ""
        raise SystemExit(f"train.py: the run diverged at {doing}: {e}; {saved}. Train again with a smaller --lr "
                         f"(now {config['lr']}){kl}, in another --out or here with --overwrite") from None
    except Exception as e:
        stop = stop_for(e)
        if stop is None:
            raise
        bar.close()
        raise stop from None
    bar.close()

    # The best expert by validation accuracy, then base vs expert on the test split.
    expert_path = out / "expert.safetensors"
    doing = f"the writing of {expert_path}"
    try:
        adapter.load_state(best["z"])
        if rank == 0:
            # The category names the expert for adapt.py; a classifier also records the categories it learnt.
            classifier = dict(label_rule=config["label_rule"], categories=json.dumps(task.categories)) if task.name == "cls" else {}
            adapter.save_expert(expert_path, task=task.name, category=task.category, base_model=str(config["model"]),
                                step=best["step"], valid_accuracy=f"{best['accuracy']:.4f}", command=config["command"], **classifier)
        doing = "the final test evaluation"
        print(f"[train] test split ({len(test_set)} examples): the base model, then the expert")
        base_test = parallel.evaluate_split(model, tokenizer, adapter, task, test_set, config, adapted=False,
                                            progress=rank == 0)
        expert_test = parallel.evaluate_split(model, tokenizer, adapter, task, test_set, config, progress=rank == 0)
        paired = evaluate.paired_difference([r["correct"] for r in base_test["records"]],
                                            [r["correct"] for r in expert_test["records"]])
        minutes = (seconds_before + time.perf_counter() - started) / 60
        valid0 = history[0]["valid_accuracy"] if history and "valid_accuracy" in history[0] else float("nan")
        summary = dict(task=task.name, steps=steps, best_step=best["step"], valid_before=valid0, valid_best=best["accuracy"],
                       test_n=base_test["n"], test_base=base_test["accuracy"], test_base_interval=base_test["interval"],
                       test_expert=expert_test["accuracy"], test_expert_interval=expert_test["interval"],
                       test_difference=paired["difference"], test_difference_interval=paired["interval"],
                       test_gained=paired["gained"], test_lost=paired["lost"], minutes=minutes,
                       expert=str(expert_path))
        figure = None
        if rank == 0:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            for name, result in (("base", base_test), ("expert", expert_test)):
                with open(out / f"test-{name}.jsonl", "w") as f:
                    for record in result["records"]:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
            figure = plot(history, out / "learning_curve.png")
    except KeyboardInterrupt:
        # The checkpoint holds the last step, so --resume skips the training and does only what is left.
        if doing == "the final test evaluation":
            print(f"\n[train] interrupted during the final test evaluation: the expert is saved ({expert_path}); "
                  f"run the same command with --resume to finish the evaluation (summary.json, test-*.jsonl)")
        else:
            print(f"\n[train] interrupted during {doing}: {checkpoint_path} holds step {saved_step}, the last; run the "
                  f"same command with --resume to write the expert and evaluate it")
        sys.exit(130)
    except Exception as e:
        stop = stop_for(e)
        if stop is None:
            raise
        raise stop from None
    print(f"[train] {task.name}: valid {valid0:.3f} -> {best['accuracy']:.3f} (best at step {best['step']}); "
          f"test n={base_test['n']}: base {base_test['accuracy']:.3f} [{base_test['interval'][0]:.3f}, {base_test['interval'][1]:.3f}] "
          f"-> expert {expert_test['accuracy']:.3f} [{expert_test['interval'][0]:.3f}, {expert_test['interval'][1]:.3f}], "
          f"paired difference {paired['difference']:+.3f} [{paired['interval'][0]:+.3f}, {paired['interval'][1]:+.3f}] "
          f"({paired['gained']} gained, {paired['lost']} lost); "
          f"{minutes:.1f} min; expert {expert_path}" + (f"; curve {figure}" if figure else ""))
    if parallel.distributed():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
