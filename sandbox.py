"""Run untrusted, model-written Python (MBPP/HumanEval solutions with their asserts) and report
whether it exits 0.

Threat model. The programs come from a small language model that is not trying to attack us but
will, sooner or later, write an infinite loop, allocate 20 GB, fork without end, print gigabytes,
overwrite or delete files, start a daemon, or open a connection. Such a bug must cost at most
`timeout` seconds and a bounded share of the machine, leave nothing running or written behind, and
never touch the caller's process or files. This is not a defence against a deliberate attacker
with a kernel exploit; for that, run the whole evaluation in a VM or gVisor.

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
 3. Resource limits (setrlimit, per process, inherited by children): CPU seconds (a backstop if
    the caller dies), address space MEMORY_LIMIT (a MemoryError instead of swapping the machine
    to death), file size FILE_SIZE_LIMIT, MAX_PROCESSES processes (fork bombs), no core dumps.
    These limits are per process, so a fork bomb of big processes can still ask for
    MAX_PROCESSES x MEMORY_LIMIT in total; oom_score_adj=1000 makes the kernel's OOM killer pick
    sandbox processes before anything else. Only a memory cgroup would cap the total; we do not
    create cgroups, because that needs a delegated hierarchy that differs between cgroup v1 and
    v2 and, on these machines, belongs to the VM's manager.
 4. A uid of its own (when the caller is root). Root ignores RLIMIT_NPROC and may write anywhere,
    so the program runs under a fresh, unused uid from SANDBOX_UIDS. Not 'nobody': a uid shared by
    parallel sandboxes (and by system daemons) would share one process count, so one fork bomb
    would make its neighbours fail, and "kill every process of this uid" would hit them too.
    no_new_privs and an empty capability bounding set mean no setuid binary can give privileges
    back.
 5. Namespaces, made by util-linux `unshare` (Python 3.11 has no os.unshare):
    - network: a new, empty network namespace (only a loopback that is down), so nothing can
      connect anywhere, not even to 127.0.0.1;
    - PID: the program is PID 1 of its own namespace, and when it exits the kernel kills
      everything it started, daemons included;
    - mount: every existing mount becomes read-only (mount_setattr, Linux >= 5.12) and a private,
      size-limited tmpfs on /tmp is the program's working directory and HOME; it vanishes with the
      namespace. If Python is installed under a directory the sandbox uid may not enter (e.g.
      /root/.pyenv under /root, mode 700), that directory is covered by an empty tmpfs and only the
      installation is bind-mounted back, which also hides the rest of it from the program.
    As root, unshare makes the namespaces directly; otherwise `unshare --map-root-user` makes them
    inside a user namespace (no uid of its own then: it runs as the caller, without capabilities).

Fallbacks, when `unshare` is missing or does not work here (probed once, with a warning):
 - no network namespace: a prelude replaces socket.socket and friends with functions that raise.
   This stops accidents, not a program that uses ctypes or runs curl;
 - no PID namespace: daemons are still killed by uid when the caller is root; for a non-root
   caller a setsid() daemon survives;
 - no mount namespace: the working directory is a host temporary directory (deleted afterwards),
   and the program can write wherever its uid can: as the sandbox uid, world-writable places such
   as /tmp; as a non-root caller, all of the caller's files. Root without namespaces also needs a
   Python installation the sandbox uid can reach; when it cannot, every run is an "error".

A program passes iff it exits 0 within the limits. The sandbox sees only the exit status, so a
program that calls sys.exit(0) or os._exit(0) before its asserts run passes; callers put the asserts
after the solution, so only a solution that exits while being defined gets through, and a caller
that must rule that out can have the program print a marker after the asserts and check for it.
Exit status 125 is reserved for "the sandbox could not start the program" (status "error").
Under a PID namespace the program is PID 1, so a signal it sends itself without installing a
handler is ignored (os.kill(os.getpid(), SIGTERM) does not stop it; its asserts still decide);
crashes and the limits' signals still end it.
"""

import ctypes
import functools
import math
import os
import random
import shutil
import signal
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

MEMORY_LIMIT = 2 * 1024**3        # bytes of address space
FILE_SIZE_LIMIT = 16 * 1024**2    # bytes per file written (stderr included)
MAX_PROCESSES = 32                # processes and threads of one sandbox
SCRATCH_SIZE = 64 * 1024**2       # bytes in the private /tmp (namespace mode)
# The interpreter that runs programs: the real one behind a virtual environment's symlink. Programs
# need only the standard library, and a venv kept under /tmp (a CI checkout, say) would be hidden by
# the private /tmp mounted over it.
PROGRAM_PYTHON = os.path.realpath(sys.executable)
DETAIL_CHARS = 2000               # tail of stderr kept in Outcome.detail
SANDBOX_UIDS = range(2_000_000_000, 2_100_000_000)  # no real user or subuid range lives up here
LAUNCH_FAILED = 125               # exit status of the launcher when it cannot start the program

ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
SANDBOX_FILE = os.path.abspath(__file__)


@dataclass(frozen=True)
class Outcome:
    passed: bool  # exit status 0 within the limits
    status: str   # "passed" | "failed" | "timeout" | "error" (the sandbox could not start it)
    detail: str   # tail of stderr (at most DETAIL_CHARS), for debugging


# -----------------------------------------------------------------------------
# Caller side


def run(program: str, timeout: float = 10.0) -> Outcome:
    """Run `program` in a fresh sandbox; it passes iff it exits 0 within `timeout` seconds."""
    unshare = _unshare_command()
    uid = _claim_uid() if os.geteuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    try:
        return _run_in(workdir, program, timeout, unshare, uid)
    finally:
        if uid is not None:
            _release_uid(uid)
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(programs: list[str], timeout: float = 10.0, workers: int | None = None,
             progress: bool = False) -> list[Outcome]:
    """run() each program, `workers` at a time (default: one per core); outcomes in input order."""
    outcomes: list[Outcome | None] = [None] * len(programs)
    # Threads are enough: each one only waits on its subprocess.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = {pool.submit(run, program, timeout): i for i, program in enumerate(programs)}
        finished = as_completed(futures)
        if progress:
            from tqdm import tqdm
            finished = tqdm(finished, total=len(futures), desc="sandbox")
        for future in finished:
            outcomes[futures[future]] = future.result()
    return outcomes


def _run_in(workdir: str, program: str, timeout: float, unshare: list[str] | None,
            uid: int | None) -> Outcome:
    program_path = os.path.join(workdir, "program.py")
    with open(program_path, "w") as f:
        f.write(program)
    if unshare is None:
        # No private /tmp: the program works in workdir/work, which the sandbox uid must reach.
        os.mkdir(os.path.join(workdir, "work"))
        if uid is not None:
            os.chmod(workdir, 0o711)
            os.chmod(program_path, 0o644)
            os.chown(os.path.join(workdir, "work"), uid, uid)
    if uid is not None:
        max_processes = MAX_PROCESSES
    else:
        # Without a uid of its own the count may include the caller's processes (always on Linux
        # < 5.14 or without a user namespace), so the allowance comes on top of those.
        max_processes = MAX_PROCESSES + len(_pids_owned_by(os.getuid()))
    launcher = [sys.executable, "-I", "-S", SANDBOX_FILE, "--launch", program_path,
                str(math.ceil(timeout) + 1), str(-1 if uid is None else uid), str(max_processes),
                "namespaces" if unshare else "plain"]
    command = [*unshare, *launcher] if unshare else launcher

    stderr_path = os.path.join(workdir, "stderr")
    with open(stderr_path, "wb") as stderr:
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=stderr, env=ENVIRONMENT, cwd=workdir,
                                       start_new_session=True)
        except OSError as error:
            return Outcome(False, "error", f"could not start the sandbox: {error}")
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        # Kill whatever is left: everything on a timeout (or Ctrl-C); after a normal exit, children
        # still in the process group (the group id is the pid: start_new_session) and, by uid, the
        # ones that left it with setsid(). Under a PID namespace nothing is left by then.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if uid is not None:
            _kill_all_owned_by(uid)
        process.wait()
    if returncode is None:
        return Outcome(False, "timeout", _detail(stderr_path, f"timed out after {timeout:g} s"))
    if returncode == 0:
        return Outcome(True, "passed", _detail(stderr_path))
    detail = _detail(stderr_path)
    if returncode == LAUNCH_FAILED or detail.startswith("unshare: "):
        return Outcome(False, "error", detail)
    if returncode < 0:
        signal_number = -returncode
        detail = _detail(stderr_path, f"killed by signal {signal_number} "
                                      f"({signal.strsignal(signal_number)})")
    return Outcome(False, "failed", detail)


def _detail(stderr_path: str, note: str = "") -> str:
    # Read only the end: the file can be up to FILE_SIZE_LIMIT long.
    with open(stderr_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - 4 * DETAIL_CHARS))
        text = f.read().decode("utf-8", errors="replace")
    if size >= FILE_SIZE_LIMIT:
        note = f"stderr reached the file-size limit ({FILE_SIZE_LIMIT} bytes). {note}".strip()
    if note:
        text = f"{text.rstrip()}\n[sandbox] {note}"
    return text[-DETAIL_CHARS:]


@functools.cache
def _unshare_command() -> list[str] | None:
    """The unshare command line that works on this machine, or None (then: fallbacks)."""
    command = [shutil.which("unshare") or "unshare", "--net", "--pid", "--fork", "--kill-child",
               "--mount-proc", "--propagation", "private"]
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
                  "guards without network/PID/mount namespaces (see sandbox.py's docstring)",
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


# -----------------------------------------------------------------------------
# Sandbox side: `python -I -S sandbox.py --launch ...`, run by unshare inside the new namespaces
# (or directly, in fallback mode). It still has the caller's privileges: it sets up the mounts and
# limits, drops privileges, and then exec()s the program's interpreter in its own place.

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 0x2, 0x4, 0x1000, 0x4000
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # 442 on every architecture
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38

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


def _make_mounts_read_only() -> None:
    # Every mount we can see, recursively; later mounts (the scratch /tmp) stay writable. This is
    # our own mount namespace with private propagation, so the host's mounts do not change.
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    _check(_libc().syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), b"/",
                           ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr),
                           ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr /")


def _expose_interpreter() -> None:
    """Let the sandbox uid reach the Python installation when it sits below a directory the uid may
    not enter (e.g. /root): cover that directory with an empty tmpfs and bind the installation
    back at its own path, so sys.executable, the venv and libpython's rpath keep working."""
    closed = {}  # installation -> topmost ancestor without search permission for others
    for prefix in {sys.base_prefix, sys.prefix}:
        parts = prefix.strip("/").split("/")
        ancestors = ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]
        closed_ancestor = next((a for a in ancestors if not os.stat(a).st_mode & 0o001), None)
        if closed_ancestor:
            closed[prefix] = closed_ancestor
    # Keep a handle on each installation before the tmpfs hides it, then bind it from that handle.
    handles = {prefix: os.open(prefix, os.O_PATH) for prefix in closed}
    for directory in set(closed.values()):
        _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for prefix, handle in handles.items():
        os.makedirs(prefix, exist_ok=True)
        _mount(f"/proc/self/fd/{handle}", prefix, None, MS_BIND | MS_REC, None)
        os.close(handle)


def _launch(program_path: str, cpu_seconds: int, uid: int | None, max_processes: int,
            in_namespaces: bool) -> None:
    import resource

    # First, while /proc is still writable: the OOM killer takes sandbox processes first. Written
    # by real root (CAP_SYS_RESOURCE) this is also a floor the program cannot lower again.
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    if in_namespaces:
        with open(program_path, "rb") as f:
            source = f.read()
        if uid is not None:
            _expose_interpreter()
        try:
            _make_mounts_read_only()
        except OSError:
            pass  # Linux < 5.12: only the uid (layer 4), if any, stops writes outside /tmp
        owner = 0 if uid is None else uid
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={SCRATCH_SIZE},mode=0700,uid={owner},gid={owner}")
        workdir, program_path = "/tmp", "/tmp/program.py"
        with open(program_path, "wb") as f:
            f.write(source)
        command = [PROGRAM_PYTHON, "-s", "-P", program_path]
    else:
        workdir = os.path.join(os.path.dirname(program_path), "work")
        command = [PROGRAM_PYTHON, "-s", "-P", "-c", NETWORK_GUARD, program_path]

    for limit, value in [(resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, MEMORY_LIMIT),
                         (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT),
                         (resource.RLIMIT_NPROC, max_processes), (resource.RLIMIT_CORE, 0)]:
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
    os.chdir(workdir)
    os.environ["HOME"] = workdir
    try:
        os.execv(command[0], command)
    except PermissionError as error:
        raise PermissionError(f"{error}; uid {os.getuid()} cannot reach {command[0]}: "
                              "without a mount namespace the Python installation must be "
                              "readable by every user") from None


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    program_path, cpu_seconds, uid, max_processes, mode = sys.argv[2:]
    try:
        _launch(program_path, int(cpu_seconds), None if uid == "-1" else int(uid),
                int(max_processes), mode == "namespaces")
    except Exception as error:  # any failure before the exec is the sandbox's, not the program's
        print(f"sandbox: could not start the program: {error}", file=sys.stderr)
        os._exit(LAUNCH_FAILED)
