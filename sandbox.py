"""Run untrusted, model-written Python in isolation: a program (it passes iff it exits 0), or a
solution with its tests (it passes iff judge.py says every test ran and none failed).

    outcome = sandbox.run("print(1)\n", timeout=5)                           # exit status 0?
    outcome = sandbox.run(sandbox.Tests(solution, tests, solution_names=("add",)), timeout=5)
    outcomes = sandbox.run_many([...], timeout=5)                            # in parallel, in order

Threat model. The programs come from a model that is being optimised, by RL, for passing tests. It
is not trying to attack the machine, but it will, sooner or later, write an infinite loop, allocate
20 GB, fork without end, print gigabytes, overwrite or delete files, start a daemon, open a
connection, or find a shortcut that passes without solving anything. Such a program must cost at
most `timeout` seconds and a bounded share of the machine, leave nothing running or written behind,
never touch the caller's process or files, and never pass by a shortcut. How a pass is decided so
that exiting early, hooking exceptions, tracing or threads cannot forge it is judge.py's docstring.
This is not a defence against a deliberate attacker with a kernel exploit; for that, run the whole
evaluation in a VM or gVisor.

No state crosses runs. A reply that could tell which of its answers were right (as it could if the
judge stopped at the first failed assert) and leave a note for a later run of itself would learn
the answers over a few tries without solving anything: RL would find and keep that. Every run therefore starts from nothing another run could have written: a fresh uid, fresh
network, PID, IPC and mount namespaces, a /tmp and /dev/shm that vanish with it, a read-only view of
the rest, and no kernel keyring (keyrings are not namespaced and a uid's keys outlive its processes:
layer 7). Some shared kernel state is still written by one run and read by the next, and no layer
here closes it: which pages of the read-only system files are in the page cache (readable exactly,
through /proc/self/pagemap or page-fault counts), host-wide counters in /proc (forks since boot),
and, between runs that overlap, locks on shared files. What makes such notes worthless is the
judge: a run never learns whether its answers were right (judge.py runs every assert whatever the
solution answers), so it has nothing worth leaving for the next one.

Layers of defence, each with the failure it stops:

 1. A separate interpreter, started clean. Never exec() in the caller: a crash, a MemoryError or
    a monkey-patched builtin would take the caller with it. `python -s -P` is `python -I` without
    -E: -E would also ignore PYTHONHASHSEED, and we pass a minimal environment of our own anyway
    (PATH, LANG, HOME, PYTHONHASHSEED=0 so set order, and so results, are reproducible). stdin is
    /dev/null; stdout is discarded; stderr goes to a file whose tail becomes `Outcome.detail`, so
    a program printing gigabytes costs neither the caller's memory nor the disk (file-size limit).
 2. A wall-clock timeout. The sandbox starts in a session of its own; on timeout its whole process
    group gets SIGKILL, and then every process of the sandbox's uid (layer 4), which catches
    children that escaped the group with setsid().
 3. Nothing outlives the caller. The sandbox is started under `setpriv --pdeathsig KILL`, so it
    gets SIGKILL when the caller dies (even by kill -9); `unshare --kill-child` passes that on to
    the program, and the launcher sets it again after changing uid, which clears it. Ctrl-C in
    run_many kills every running sandbox at once, starts no new one, and removes their folders
    before KeyboardInterrupt reaches the caller.
 4. Resource limits (setrlimit, per process, inherited by children): CPU seconds (a backstop),
    address space MEMORY_LIMIT (a MemoryError instead of swapping the machine to death), file size
    FILE_SIZE_LIMIT, OPEN_FILES_LIMIT descriptors, MAX_PROCESSES processes (fork bombs), no core
    dumps. These are per process, and RLIMIT_AS counts only a process's own mappings, so as root
    each run also gets a memory cgroup of its own (v1 or v2, under the caller's) limited to
    MEMORY_LIMIT in all: every process of the run, its files in /tmp and /dev/shm, and the kernel
    memory they cost (inodes, page tables, pipe buffers). Where no cgroup can be made (not root, or
    no writable memory hierarchy: a warning says so), a fork bomb of big processes can ask for
    MAX_PROCESSES x MEMORY_LIMIT; memfd, whose pages no rlimit counts, is denied either way (layer
    7), and the tmpfs mounts are bounded in bytes and inodes. oom_score_adj=1000 makes the kernel's
    OOM killer pick sandbox processes before anything else.
 5. A uid of its own (when the caller is root). Root ignores RLIMIT_NPROC and may write anywhere,
    so the program runs under a fresh, unused uid from SANDBOX_UIDS. Not 'nobody': a uid shared by
    parallel sandboxes (and by system daemons) would share one process count, so one fork bomb
    would make its neighbours fail, and "kill every process of this uid" would hit them too.
    no_new_privs and an empty capability bounding set mean no setuid binary can give privileges
    back.
 6. Namespaces, made by util-linux `unshare` (Python 3.11 has no os.unshare):
    - network: a new, empty network namespace (only a loopback that is down), so nothing can
      connect anywhere, not even to 127.0.0.1 or to an abstract Unix socket;
    - PID: the program is PID 1 of its own namespace, and when it exits the kernel kills
      everything it started, daemons included; other processes are invisible in /proc;
    - IPC: System V shared memory, message queues and semaphores (and POSIX message queues) made
      inside are the namespace's own and vanish with it;
    - mount: the program sees a root of its own, a tmpfs holding read-only bind mounts of the
      system directories (/usr, /etc and the /bin, /lib links), the Python installation, /proc of
      its PID namespace, four devices (null, zero, random, urandom), a private tmpfs on /tmp that
      is its working directory and HOME, and one on /dev/shm (POSIX semaphores and shared memory:
      multiprocessing needs them); both are limited in bytes and files and vanish with the
      namespace.
      Everything else on the host (the project folder and its datasets, /root, /home, /run and
      /var, so every Unix socket on the host's filesystem) is not in that root at all.
    As root, unshare makes the namespaces directly; otherwise `unshare --map-root-user` makes them
    inside a user namespace (no uid of its own then: it runs as the caller, without capabilities).
 7. A seccomp filter (installed last, inherited by everything the program starts) denies the few
    system calls that get around the layers above: the kernel keyring (add_key, request_key,
    keyctl), io_uring (whose operations no filter sees), memfd (memory outside RLIMIT_AS),
    userfaultfd, bpf and perf_event_open, and every call made through another ABI (32-bit int 0x80,
    x32), whose numbers a deny list would miss. DENIED_SYSCALLS says why for each. On an
    architecture with no table in SYSCALL_NUMBERS every run is an error rather than unprotected.

Fallbacks, when `unshare` is missing or does not work here (probed once, with a warning):
 - no network namespace: a prelude replaces socket.socket and friends with functions that raise.
   This stops accidents, not a program that uses ctypes or runs curl;
 - no PID namespace: daemons are still killed by uid when the caller is root; for a non-root
   caller a setsid() daemon survives, and so does everything after the caller dies;
 - no IPC namespace: System V objects made inside stay on the host;
 - no mount namespace: the working directory is a host temporary directory (deleted afterwards),
   and the program can read whatever its uid can (the datasets included) and write wherever its
   uid can: as the sandbox uid, world-writable places such as /tmp; as a non-root caller, all of
   the caller's files. Root without namespaces also needs a Python installation the sandbox uid
   can reach; when it cannot, every run is an "error".

Leftovers: each run's folder (and cgroup) is named after the caller's pid; when a caller is killed
with SIGKILL, its processes die with it (layer 3) and the next run on the machine removes the
folders and cgroups of callers that are no longer alive.

Status "error" means the sandbox could not start the program, never that the program failed: the
launcher writes "exec" to a close-on-exec pipe just before it becomes the program, and a run
without that word is the sandbox's failure (tasks.py raises SandboxError instead of scoring it).
Under a PID namespace the program is PID 1, so a signal it sends itself without installing a
handler is ignored (os.kill(os.getpid(), SIGTERM) does not stop it); crashes and the limits'
signals still end it.
"""

import ctypes
import functools
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# Limits. Per process; see the module docstring for what each one stops.

MEMORY_LIMIT = 2 * 1024**3        # bytes: address space per process, and the whole run's memory (cgroup)
FILE_SIZE_LIMIT = 16 * 1024**2    # bytes per file written (stderr included)
MAX_PROCESSES = 32                # processes and threads of one sandbox
OPEN_FILES_LIMIT = 256            # file descriptors per process
SCRATCH_SIZE = 64 * 1024**2       # bytes in the private /tmp (namespace mode)
SHM_SIZE = 64 * 1024**2           # bytes in the private /dev/shm (namespace mode)
SCRATCH_INODES = 4096             # files and folders in each of those two
# The interpreter that runs programs: the real one behind a virtual environment's symlink. Programs
# need only the standard library, and a venv kept under /tmp (a CI checkout, say) would be hidden by
# the private /tmp mounted over it.
PROGRAM_PYTHON = os.path.realpath(sys.executable)
DETAIL_CHARS = 2000               # tail of stderr kept in Outcome.detail
SANDBOX_UIDS = range(2_000_000_000, 2_100_000_000)  # no real user or subuid range lives up here
LAUNCH_FAILED = 125               # exit status of the launcher when it cannot start the program

ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
SANDBOX_FILE = os.path.abspath(__file__)
JUDGE_FILE = os.path.join(os.path.dirname(SANDBOX_FILE), "judge.py")


@dataclass(frozen=True)
class Outcome:
    passed: bool  # a program: exit status 0 within the limits; Tests: judge.py's verdict
    status: str   # "passed" | "failed" | "timeout" | "error" (the sandbox could not start it)
    detail: str   # tail of stderr (at most DETAIL_CHARS), for debugging


@dataclass(frozen=True)
class Tests:
    """A solution and the tests that decide it, for judge.py: the tests (and the prelude, trusted
    code they rely on, such as HumanEval's helper functions) run in the judge's process, the
    solution in another one; `solution_names` are the names the tests must take from the solution
    even where a builtin has the same name."""
    solution: str
    tests: str
    prelude: str = ""
    solution_names: tuple[str, ...] = ()


# -----------------------------------------------------------------------------
# Caller side


class SandboxError(RuntimeError):
    """The sandbox itself failed (it could not start a program): not an answer to score."""


def run(job: "str | Tests", timeout: float = 10.0, _stop: "threading.Event | None" = None) -> Outcome:
    """Run a program (str: passes iff it exits 0) or Tests (passes iff the judge says so) in a fresh
    sandbox, for at most `timeout` seconds."""
    unshare = _unshare_command()
    _remove_leftovers()
    uid = _claim_uid() if os.geteuid() == 0 else None
    # The caller's pid in the name tells a later run whether the folder's owner is still alive.
    workdir = tempfile.mkdtemp(prefix=f"{LEFTOVER_PREFIX}{os.getpid()}-")
    cgroup = None
    try:
        cgroup = _make_cgroup(os.path.basename(workdir))
        return _run_in(workdir, job, timeout, unshare, uid, cgroup, _stop)
    finally:
        if uid is not None:
            _release_uid(uid)
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(jobs: "list[str | Tests]", timeout: float = 10.0, workers: int | None = None,
             progress: bool = False) -> list[Outcome]:
    """run() each job, `workers` at a time (default: one per core); outcomes in input order.
    Ctrl-C (or any exception here) kills the running sandboxes and starts no more."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    stop = threading.Event()
    # Threads are enough: each one only waits on its subprocess.
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        futures = {pool.submit(run, job, timeout, stop): i for i, job in enumerate(jobs)}
        finished = as_completed(futures)
        if progress:
            from tqdm import tqdm
            finished = tqdm(finished, total=len(futures), desc="sandbox")
        for future in finished:
            outcomes[futures[future]] = future.result()
    except BaseException:
        # A second Ctrl-C must not cut the clean-up short; it takes well under a second.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            _stop_all(stop)
            pool.shutdown(wait=True, cancel_futures=True)  # each worker removes its own folder
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        raise
    pool.shutdown(wait=True)
    return outcomes


# The sandboxes running now, by the Event that stops their run_many, so Ctrl-C can kill them.
_running: dict[subprocess.Popen, "threading.Event | None"] = {}
_running_lock = threading.Lock()


def _stop_all(stop: threading.Event) -> None:
    with _running_lock:
        stop.set()  # under the lock: no sandbox can start after this
        for process, its_stop in _running.items():
            if its_stop is stop:
                _kill_group(process)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group id is the pid: start_new_session
    except ProcessLookupError:
        pass


def _run_in(workdir: str, job: "str | Tests", timeout: float, unshare: list[str] | None,
            uid: int | None, cgroup: str | None, stop: "threading.Event | None") -> Outcome:
    # The program's files go in workdir/files; with namespaces the launcher copies them into the
    # private /tmp, without, that folder is the working directory.
    files_dir = os.path.join(workdir, "files")
    os.mkdir(files_dir)
    python = [PROGRAM_PYTHON, "-s", "-P"] + ([] if unshare else ["-c", NETWORK_GUARD])
    verdict_read = verdict_write = None
    if isinstance(job, Tests):
        with open(JUDGE_FILE) as f:
            files = {"judge.py": f.read(), "solution.py": job.solution, "tests.py": job.tests,
                     "prelude.py": job.prelude}
        verdict_read, verdict_write = os.pipe()
        arguments = ["judge.py", str(verdict_write), "solution.py", "tests.py", "prelude.py",
                     json.dumps(list(job.solution_names)), "--", *python]
    else:
        files, arguments = {"program.py": job}, ["program.py"]
    for name, text in files.items():
        # surrogatepass: a string no UTF-8 file can hold (a lone surrogate) is still written, as
        # bytes Python then refuses to compile, so that reply fails instead of the caller crashing.
        with open(os.path.join(files_dir, name), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
    if unshare is None and uid is not None:  # the sandbox uid works in files_dir
        os.chmod(workdir, 0o711)
        os.chown(files_dir, uid, uid)
        for name in files:
            os.chmod(os.path.join(files_dir, name), 0o644)
    if uid is not None:
        max_processes = MAX_PROCESSES
    else:
        # Without a uid of its own the count may include the caller's processes (always on Linux
        # < 5.14 or without a user namespace), so the allowance comes on top of those.
        max_processes = MAX_PROCESSES + len(_pids_owned_by(os.getuid()))
    # The launcher writes "exec" here just before it becomes the program; the pipe closes on exec.
    # Anything else (nothing, or an error) means the program never ran: the sandbox failed.
    launch_read, launch_write = os.pipe()
    settings = {"files_dir": files_dir, "cpu_seconds": math.ceil(timeout) + 1,
                "uid": uid, "max_processes": max_processes, "namespaces": unshare is not None,
                "cgroup": cgroup, "launch_fd": launch_write, "memory_limit": MEMORY_LIMIT,
                "open_files_limit": OPEN_FILES_LIMIT, "file_size_limit": FILE_SIZE_LIMIT,
                "scratch_size": SCRATCH_SIZE, "shm_size": SHM_SIZE, "scratch_inodes": SCRATCH_INODES,
                "command": python + arguments}
    launcher = [sys.executable, "-I", "-S", SANDBOX_FILE, "--launch", json.dumps(settings)]
    command = [*_pdeathsig_command(), *(unshare or []), *launcher]
    passed_fds = (launch_write,) if verdict_write is None else (launch_write, verdict_write)

    stderr_path = os.path.join(workdir, "stderr")
    try:
        with open(stderr_path, "wb") as stderr, _running_lock:
            if stop is not None and stop.is_set():
                os.close(launch_read)
                return Outcome(False, "error", "not started: run_many was stopped")
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=stderr, env=ENVIRONMENT, cwd=workdir,
                                           start_new_session=True, pass_fds=passed_fds)
            except OSError as error:
                os.close(launch_read)
                return Outcome(False, "error", f"could not start the sandbox: {error}")
            _running[process] = stop
    finally:
        for fd in passed_fds:
            os.close(fd)  # the sandbox holds the only write ends now
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        # Kill whatever is left: everything on a timeout (or Ctrl-C); after a normal exit, children
        # still in the process group and, by uid, the ones that left it with setsid(). Under a PID
        # namespace nothing is left by then.
        _kill_group(process)
        if uid is not None:
            _kill_all_owned_by(uid)
        process.wait()
        with _running_lock:
            _running.pop(process, None)
        verdict = b"" if verdict_read is None else _read_verdict(verdict_read)
        launched = _read_verdict(launch_read)
    if launched != b"exec\n" and returncode is not None:
        detail = _detail(stderr_path)
        return Outcome(False, "error", detail or f"the sandbox exited with status {returncode} "
                                                 "before it started the program")
    if cgroup is not None and _oom_kills(cgroup):
        memory_note = f"the run's processes reached the memory limit ({MEMORY_LIMIT} bytes in all)"
    else:
        memory_note = ""
    if returncode is None:
        return Outcome(False, "timeout", _detail(stderr_path, f"timed out after {timeout:g} s.", memory_note))
    passed = verdict == b"passed\n" if verdict_read is not None else returncode == 0
    if passed:
        return Outcome(True, "passed", _detail(stderr_path, memory_note))
    if returncode < 0:
        note = f"killed by signal {-returncode} ({signal.strsignal(-returncode)})."
    elif verdict_read is not None and not verdict:
        note = "the judge gave no verdict."
    else:
        note = ""
    return Outcome(False, "failed", _detail(stderr_path, note, memory_note))


def _read_verdict(fd: int) -> bytes:
    """The judge's verdict (or the launcher's "exec"): one short line, written at once, in a pipe
    whose writers have exited."""
    os.set_blocking(fd, False)  # a writer that survived (it cannot) must not make us hang
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""
    finally:
        os.close(fd)


def _detail(stderr_path: str, *notes: str) -> str:
    # Read only the end: the file can be up to FILE_SIZE_LIMIT long.
    with open(stderr_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - 4 * DETAIL_CHARS))
        text = f.read().decode("utf-8", errors="replace")
    if size >= FILE_SIZE_LIMIT:
        notes = (f"stderr reached the file-size limit ({FILE_SIZE_LIMIT} bytes).", *notes)
    note = " ".join(n for n in notes if n)
    if note:
        text = f"{text.rstrip()}\n[sandbox] {note}"
    return text[-DETAIL_CHARS:]


@functools.cache
def _pdeathsig_command() -> list[str]:
    """`setpriv --pdeathsig KILL` where util-linux has it (2.33 and later), else nothing: then a
    sandbox can outlive a caller killed by SIGKILL, until its CPU limit or its end."""
    setpriv = shutil.which("setpriv")
    if setpriv and subprocess.run([setpriv, "--pdeathsig", "KILL", "true"],
                                  capture_output=True).returncode == 0:
        return [setpriv, "--pdeathsig", "KILL"]
    warnings.warn("sandbox: `setpriv --pdeathsig` is not available; a sandbox may outlive a caller "
                  "that is killed with SIGKILL", RuntimeWarning)
    return []


@functools.cache
def _unshare_command() -> list[str] | None:
    """The unshare command line that works on this machine, or None (then: fallbacks)."""
    command = [shutil.which("unshare") or "unshare", "--net", "--pid", "--ipc", "--fork",
               "--kill-child", "--mount-proc", "--propagation", "private"]
    if os.geteuid() != 0:
        command.insert(1, "--map-root-user")  # the same namespaces, through a user namespace
    try:
        probe = subprocess.run([*command, sys.executable, "-I", "-S", "-c", "pass"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if probe.returncode == 0:
            return command
        reason = probe.stderr.decode(errors="replace").strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        reason = str(error)
    warnings.warn(f"sandbox: `unshare` does not work here ({reason}); falling back to weaker "
                  "guards without network/PID/IPC/mount namespaces (see sandbox.py's docstring)",
                  RuntimeWarning)
    return None


_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()
# Not the global generator: callers seed it, and two processes seeded alike must not pick alike.
_uid_random = random.SystemRandom()


def _claim_uid() -> int:
    with _uids_lock:
        while True:
            uid = _uid_random.choice(SANDBOX_UIDS)
            # Unused by our other sandboxes and, right now, by any process on the machine.
            if uid not in _uids_in_use and not _pids_owned_by(uid):
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uids_lock:
        _uids_in_use.discard(uid)


def _pids_owned_by(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`, from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # it exited while we looked
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(name))
    return pids


def _kill_all_owned_by(uid: int) -> None:
    # Repeat until none is left: a process that has not been killed yet may fork meanwhile, but
    # RLIMIT_NPROC bounds how many there can be. Killing the PID-namespace init ends all of them.
    for _ in range(500):
        pids = _pids_owned_by(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)  # let the killed ones exit
    raise RuntimeError(f"sandbox: could not kill every process of uid {uid}")


# Each run's folder (and memory cgroup) is named sandbox-<caller's pid>-<random>. A caller killed with
# SIGKILL cannot remove its own; the next run on the machine removes those whose caller is dead.
LEFTOVER_PREFIX = "sandbox-"


def _remove_leftovers() -> None:
    places = [tempfile.gettempdir()] + ([] if _cgroup_parent() is None else [_cgroup_parent()[0]])
    for place in places:
        try:
            names = [n for n in os.listdir(place) if n.startswith(LEFTOVER_PREFIX)]
        except OSError:
            continue
        for name in names:
            owner = name[len(LEFTOVER_PREFIX):].split("-", 1)[0]
            if not owner.isdigit() or _alive(int(owner)):
                continue
            path = os.path.join(place, name)
            if place == tempfile.gettempdir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                _remove_cgroup(path, patience=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# A memory cgroup per run bounds what all of its processes hold together, kernel memory included:
# anonymous memory, memfd and tmpfs pages (/tmp, /dev/shm), inodes, page tables, pipe buffers. The
# per-process limits cannot: RLIMIT_AS counts only each process's mappings. Creating cgroups needs
# root and a memory hierarchy this process may write to; where there is none, the limits of
# layer 4 and the seccomp filter (no memfd) are what bounds memory.
CGROUP_FILES = {  # flavour: (limit, swap limit, the file counting OOM kills)
    "v1": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.oom_control"),
    "v2": ("memory.max", "memory.swap.max", "memory.events"),
}


_cgroup_lock = threading.Lock()


def _cgroup_parent() -> tuple[str, str] | None:
    """(folder, "v1" | "v2"): the memory cgroup of this process, under which each run gets a cgroup
    of its own; None where that cannot be done (then a warning says so, once). Found once per process,
    under a lock: run_many's threads all ask at their first run, and two probes at once would share
    one probe cgroup and fail each other."""
    with _cgroup_lock:
        return _find_cgroup_parent()


@functools.cache
def _find_cgroup_parent() -> tuple[str, str] | None:
    if os.geteuid() != 0:
        return None
    reasons = []
    for folder, flavour in _memory_cgroup_folders():
        try:
            if flavour == "v2":
                with open(os.path.join(folder, "cgroup.subtree_control")) as f:
                    enabled = f.read().split()
                if "memory" not in enabled:
                    with open(os.path.join(folder, "cgroup.subtree_control"), "w") as f:
                        f.write("+memory")
            _probe_cgroup(folder, flavour)
            return folder, flavour
        except (OSError, subprocess.SubprocessError) as error:
            reasons.append(f"{folder} ({flavour}): {error}")
    reason = "; ".join(reasons) or "no memory cgroup hierarchy is mounted"
    warnings.warn(f"sandbox: no memory cgroup ({reason}); a run's total memory is bounded only by "
                  "per-process limits (see sandbox.py's docstring)", RuntimeWarning)
    return None


def _memory_cgroup_folders() -> list[tuple[str, str]]:
    """Where this process's memory cgroup is: cgroup v1's memory hierarchy first, then v2's."""
    mounts = {}  # "v1" / "v2" -> mount point
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            fstype, _, options = tail.split()[:3]
            if fstype == "cgroup" and "memory" in options.split(","):
                mounts.setdefault("v1", fields.split()[4])
            elif fstype == "cgroup2":
                mounts.setdefault("v2", fields.split()[4])
    folders = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(",") and "v1" in mounts:
                folders.insert(0, (mounts["v1"] + path.rstrip("/"), "v1"))
            elif number == "0" and "v2" in mounts:
                folders.append((mounts["v2"] + path.rstrip("/"), "v2"))
    return folders


def _probe_cgroup(folder: str, flavour: str) -> None:
    """Make a cgroup, move a short-lived process into it, remove it: raises where any step fails."""
    name = f"{LEFTOVER_PREFIX}{os.getpid()}-probe"
    _remove_cgroup(os.path.join(folder, name), patience=0)  # left by an earlier process with this pid
    probe = _new_cgroup(folder, flavour, name)
    try:
        join = "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid()))"
        subprocess.run([sys.executable, "-I", "-S", "-c", join, os.path.join(probe, "cgroup.procs")],
                       check=True, capture_output=True, timeout=30)
    finally:
        _remove_cgroup(probe)


def _make_cgroup(name: str) -> str | None:
    """A memory cgroup limited to MEMORY_LIMIT (swap included) for one run, or None where there is
    no memory cgroup hierarchy to use."""
    return None if _cgroup_parent() is None else _new_cgroup(*_cgroup_parent(), name)


def _new_cgroup(parent: str, flavour: str, name: str) -> str:
    """The cgroup parent/name, made and limited to MEMORY_LIMIT."""
    limit_file, swap_file, _ = CGROUP_FILES[flavour]
    path = os.path.join(parent, name)
    os.mkdir(path)
    with open(os.path.join(path, limit_file), "w") as f:
        f.write(str(MEMORY_LIMIT))
    try:  # only where swap is accounted; v1 counts memory+swap, v2 swap alone
        with open(os.path.join(path, swap_file), "w") as f:
            f.write(str(MEMORY_LIMIT) if flavour == "v1" else "0")
    except OSError:
        pass
    return path


def _oom_kills(path: str) -> int:
    """How many of the run's processes the kernel killed for reaching the cgroup's limit."""
    try:
        with open(os.path.join(path, CGROUP_FILES[_cgroup_parent()[1]][2])) as f:
            counts = dict(line.split() for line in f if len(line.split()) == 2)
        return int(counts.get("oom_kill", 0))
    except (OSError, ValueError):
        return 0


def _remove_cgroup(path: str, patience: float = 2.0) -> None:
    # rmdir fails while processes are still leaving it (EBUSY); they are all killed by now.
    deadline = time.monotonic() + patience
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= deadline:
                return  # removed later, with the leftovers
            time.sleep(0.01)


# -----------------------------------------------------------------------------
# Sandbox side: `python -I -S sandbox.py --launch ...`, run by unshare inside the new namespaces
# (or directly, in fallback mode). It still has the caller's privileges: it builds the program's
# root, sets the limits, drops privileges, and then exec()s the program's interpreter in its place.

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 0x1, 0x2, 0x4, 0x20, 0x1000, 0x4000
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # 442 on every architecture
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
# What of the host the program's root holds (read-only), besides the Python installation.
SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "random", "urandom")

# System calls the program may not make (seccomp), with why. A deny list, not an allow list: the
# namespaces and limits above are the isolation; these are the calls that get around them.
#  - add_key, request_key, keyctl: kernel keyrings are not namespaced, and a uid's keys outlive
#    its processes, so a run could leave notes that a later run reads (which guesses passed).
#  - io_uring_setup, io_uring_enter, io_uring_register: io_uring's operations are not system calls,
#    so no filter sees them; a large kernel attack surface that no solution needs.
#  - memfd_create, memfd_secret: their pages are in no process's address space, so outside
#    RLIMIT_AS (without a memory cgroup, one process could pin fds x file size of memory).
#  - userfaultfd, bpf, perf_event_open: kernel attack surface and side channels (Docker's default
#    profile denies them too).
DENIED_SYSCALLS = ("add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter",
                   "io_uring_register", "memfd_create", "memfd_secret", "userfaultfd", "bpf",
                   "perf_event_open")
# Per architecture: the AUDIT_ARCH value seccomp reports, and the system call numbers.
SYSCALL_NUMBERS = {
    "x86_64": (0xC000003E, {"add_key": 248, "request_key": 249, "keyctl": 250, "io_uring_setup": 425,
                            "io_uring_enter": 426, "io_uring_register": 427, "memfd_create": 319,
                            "memfd_secret": 447, "userfaultfd": 323, "bpf": 321, "perf_event_open": 298}),
    "aarch64": (0xC00000B7, {"add_key": 217, "request_key": 218, "keyctl": 219, "io_uring_setup": 425,
                             "io_uring_enter": 426, "io_uring_register": 427, "memfd_create": 279,
                             "memfd_secret": 447, "userfaultfd": 282, "bpf": 280, "perf_event_open": 241}),
}
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: the same calls under other numbers
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
EPERM, ENOSYS = 1, 38

# Fallback network guard, run before the program when there is no network namespace.
NETWORK_GUARD = """
import _socket, runpy, socket, sys
def refuse(*args, **kwargs):
    raise PermissionError("network access is disabled in this sandbox")
socket.socket = socket.create_connection = socket.create_server = _socket.socket = refuse
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, options: str | None) -> None:
    encode = lambda s: None if s is None else s.encode()
    _check(_libc().mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags),
                         encode(options)), f"mount {target}")


def _make_read_only(path: str, binds: list[str]) -> None:
    """Every mount under `path`, recursively (mount_setattr, Linux >= 5.12); on older kernels each
    bind mount in `binds` is remounted read-only, without its submounts."""
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    try:
        _check(_libc().syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                               ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr),
                               ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr {path}")
    except OSError:
        for target in binds:
            _mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, None)


def seccomp_filter(machine: str) -> bytes | None:
    """The classic-BPF program (struct sock_filter[]) that makes each of DENIED_SYSCALLS fail with
    EPERM, and every call of another ABI (32-bit int 0x80, x32) fail with ENOSYS, since a deny list
    by number would miss the same call under that ABI's numbers. None for an unknown architecture."""
    if machine not in SYSCALL_NUMBERS:
        return None
    arch, numbers = SYSCALL_NUMBERS[machine]
    op = lambda code, k, jump_true=0, jump_false=0: struct.pack("=HBBI", code, jump_true, jump_false, k)
    program = [op(BPF_LD_W_ABS, 4),                        # seccomp_data.arch
               op(BPF_JEQ_K, arch, 1, 0),
               op(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS),
               op(BPF_LD_W_ABS, 0)]                        # seccomp_data.nr
    if machine == "x86_64":
        program += [op(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1), op(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS)]
    for name in DENIED_SYSCALLS:
        program += [op(BPF_JEQ_K, numbers[name], 0, 1), op(BPF_RET_K, SECCOMP_RET_ERRNO | EPERM)]
    program.append(op(BPF_RET_K, SECCOMP_RET_ALLOW))
    return b"".join(program)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp() -> None:
    """Install seccomp_filter for this process and everything it execs or forks (no_new_privs must
    be set already, as it is for any unprivileged caller of seccomp)."""
    program = seccomp_filter(os.uname().machine)
    if program is None:
        raise OSError(f"no seccomp filter is defined for {os.uname().machine}; add its system call "
                      "numbers to sandbox.SYSCALL_NUMBERS")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(_libc().prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0),
           "prctl(SET_SECCOMP)")


def _build_root(root: str, owner: int, settings: dict) -> None:
    """The program's whole filesystem, at `root` (see the module docstring, layer 6)."""
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    binds = []

    def bind(source: str, is_file: bool = False) -> None:
        target = root + source
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if is_file:
            open(target, "w").close()
        else:
            os.makedirs(target, exist_ok=True)
        _mount(source, target, None, MS_BIND | MS_REC, None)
        binds.append(target)

    for path in SYSTEM_PATHS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            bind(path)
    installation = os.path.dirname(os.path.dirname(PROGRAM_PYTHON))  # <prefix>/bin/python3.x
    for prefix in {sys.base_prefix, installation}:
        if not any(prefix == p or prefix.startswith(p + "/") for p in SYSTEM_PATHS):
            bind(prefix)
    os.makedirs(root + "/dev")
    for device in DEVICES:
        bind(f"/dev/{device}", is_file=True)
    os.symlink("/proc/self/fd", root + "/dev/fd")
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{number}", f"{root}/dev/{name}")
    bind("/proc")  # the PID namespace's own, mounted by unshare --mount-proc
    os.makedirs(root + "/tmp")
    os.makedirs(root + "/dev/shm")
    _make_read_only(root, binds)
    # Both bounded in bytes and in files: an empty file costs no bytes, but its inode costs kernel
    # memory. /dev/shm is where POSIX semaphores and shared memory live (multiprocessing needs it).
    inodes = settings["scratch_inodes"]
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={settings['scratch_size']},nr_inodes={inodes},mode=0700,uid={owner},gid={owner}")
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={settings['shm_size']},nr_inodes={inodes},mode=1777,uid={owner},gid={owner}")


def _launch(settings: dict) -> None:
    """Everything between unshare and the program: `settings` is what _run_in decided (limits,
    uid, cgroup, the command)."""
    import resource

    parent = os.getppid()
    uid, command = settings["uid"], settings["command"]
    # First, while we are still privileged and see the host's /sys: join the run's memory cgroup,
    # so that everything from here on (the root's tmpfs included) is counted in it.
    if settings["cgroup"] is not None:
        with open(os.path.join(settings["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    # While /proc is still writable: the OOM killer takes sandbox processes first. Written by real
    # root (CAP_SYS_RESOURCE) this is also a floor the program cannot lower again.
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    files_dir = settings["files_dir"]
    if settings["namespaces"]:
        files = {}
        for name in os.listdir(files_dir):
            with open(os.path.join(files_dir, name), "rb") as f:
                files[name] = f.read()
        owner = 0 if uid is None else uid
        root = os.path.dirname(files_dir)  # the caller's workdir, covered by the new root
        _build_root(root, owner, settings)
        os.chroot(root)
        workdir = "/tmp"
        for name, data in files.items():
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(data)
            os.chown(os.path.join(workdir, name), owner, owner)
    else:
        workdir = files_dir

    for limit, value in [(resource.RLIMIT_CPU, settings["cpu_seconds"]),
                         (resource.RLIMIT_AS, settings["memory_limit"]),
                         (resource.RLIMIT_FSIZE, settings["file_size_limit"]),
                         (resource.RLIMIT_NOFILE, settings["open_files_limit"]),
                         (resource.RLIMIT_NPROC, settings["max_processes"]), (resource.RLIMIT_CORE, 0)]:
        resource.setrlimit(limit, (value, value))
    # No way back to privileges: setuid binaries do not elevate, and an exec as (namespace) root
    # gets no capabilities, since the bounding set is empty.
    _check(_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    if os.geteuid() == 0:  # (namespace) root; anyone else has no capabilities to lose
        with open("/proc/sys/kernel/cap_last_cap") as f:
            for capability in range(int(f.read()) + 1):
                _check(_libc().prctl(PR_CAPBSET_DROP, capability, 0, 0, 0),
                       "prctl(CAPBSET_DROP)")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # Changing uid cleared the parent-death signal (unshare --kill-child's, or, without namespaces,
    # the one that ends us with the caller): set it again, then make sure the parent did not die
    # in between.
    _check(_libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(LAUNCH_FAILED)
    os.chdir(workdir)
    os.environ["HOME"] = workdir
    _install_seccomp()
    # The launch pipe closes on exec: the caller reads "exec" and nothing after it iff exec worked.
    launch_fd = settings["launch_fd"]
    os.set_inheritable(launch_fd, False)
    os.write(launch_fd, b"exec\n")
    try:
        os.execv(command[0], command)
    except PermissionError as error:
        raise PermissionError(f"{error}; uid {os.getuid()} cannot reach {command[0]}: "
                              "without a mount namespace the Python installation must be "
                              "readable by every user") from None


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    launch_settings = json.loads(sys.argv[2])
    try:
        _launch(launch_settings)
    except Exception as error:  # any failure before the exec is the sandbox's, not the program's
        print(f"sandbox: could not start the program: {error}", file=sys.stderr)
        try:
            os.write(launch_settings["launch_fd"], b"failed\n")
        except OSError:
            pass
        os._exit(LAUNCH_FAILED)
