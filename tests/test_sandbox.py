"""The sandbox against the programs it exists for: loops, fork bombs, huge allocations, writes
outside its directory, network access, floods of output, daemons. Every case runs with a short
timeout; the file takes a few seconds."""

import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sandbox

REPO = Path(sandbox.__file__).parent


def processes_with(token: str) -> list[int]:
    """Pids whose command line contains `token` (sandboxed programs put it there by exec)."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    pids.append(int(name))
        except (OSError, ValueError):
            pass
    return pids


def tagged(code: str, token: str) -> str:
    """A program that re-executes itself as `python -c code token`, so that it and every process it
    forks can be found by `token` from outside."""
    return ("import os, sys\n"
            f"os.execv(sys.executable, [sys.executable, '-c', {code!r}, {token!r}])\n")


def test_pass_fail_and_syntax_error():
    passed = sandbox.run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", timeout=5)
    assert passed == sandbox.Outcome(True, "passed", "")
    failed = sandbox.run("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", timeout=5)
    assert (failed.passed, failed.status) == (False, "failed")
    assert "AssertionError" in failed.detail
    syntax = sandbox.run("def add(a, b:\n    return a + b\n", timeout=5)
    assert (syntax.passed, syntax.status) == (False, "failed")
    assert "SyntaxError" in syntax.detail


def test_crash_fails_and_names_the_signal():
    outcome = sandbox.run("import ctypes\nctypes.string_at(0)\n", timeout=5)
    assert (outcome.passed, outcome.status) == (False, "failed")
    assert "killed by signal 11" in outcome.detail


def test_exit_status_is_all_that_counts():
    # Documented choice: the sandbox sees only the exit status, so sys.exit(0) before the asserts
    # passes, and any non-zero exit fails.
    assert sandbox.run("import sys\nsys.exit(0)\nassert False\n", timeout=5).passed
    assert not sandbox.run("import sys\nsys.exit(3)\n", timeout=5).passed


def test_clean_interpreter_and_environment():
    program = """
import os, sys
assert sys.flags.hash_randomization == 0          # PYTHONHASHSEED=0 took effect
assert sys.flags.no_user_site and sys.flags.safe_path
assert sorted(os.environ) == ["HOME", "LANG", "PATH", "PYTHONHASHSEED"], os.environ
assert os.environ["HOME"] == os.getcwd()
assert sys.stdin.read() == ""                     # stdin is /dev/null
"""
    outcome = sandbox.run(program, timeout=5)
    assert outcome.passed, outcome.detail


def test_infinite_loop_times_out_on_time():
    start = time.monotonic()
    outcome = sandbox.run("while True:\n    pass\n", timeout=2)
    elapsed = time.monotonic() - start
    assert (outcome.passed, outcome.status) == (False, "timeout")
    assert 2 <= elapsed < 3, elapsed


def test_fork_bomb_is_bounded_and_leaves_nothing():
    token = f"forkbomb-{uuid.uuid4().hex}"
    bomb = ("import os\nwhile True:\n"
            "    try:\n        os.fork()\n    except OSError:\n        pass\n")
    result, peak = {}, 0
    worker = threading.Thread(
        target=lambda: result.update(outcome=sandbox.run(tagged(bomb, token), timeout=2)))
    start = time.monotonic()
    worker.start()
    while worker.is_alive():
        peak = max(peak, len(processes_with(token)))
        time.sleep(0.02)
    assert not result["outcome"].passed
    assert time.monotonic() - start < 4
    # It did fork, but no further than the limit (plus the caller's processes, when not root).
    allowance = sandbox.MAX_PROCESSES + (0 if os.geteuid() == 0 else
                                         len(sandbox._pids_owned_by(os.getuid())) + 1)
    assert 1 < peak <= allowance
    assert processes_with(token) == []
    assert subprocess.run(["true"]).returncode == 0  # and the caller can still start processes


def test_huge_allocation_fails_fast():
    start = time.monotonic()
    outcome = sandbox.run("memory = bytearray(20 * 1024**3)\n", timeout=5)
    assert not outcome.passed and "MemoryError" in outcome.detail
    assert time.monotonic() - start < 2


def test_writes_outside_its_directory_have_no_effect(tmp_path):
    repo_file = REPO / f"SANDBOX_ESCAPE_{uuid.uuid4().hex}"
    outside_file = tmp_path / "escape.txt"
    try:
        for target in [repo_file, outside_file]:
            outcome = sandbox.run(f"open({str(target)!r}, 'w').write('escaped')\n", timeout=5)
            assert not outcome.passed
            assert not target.exists()
    finally:
        repo_file.unlink(missing_ok=True)  # should it have escaped, do not leave it in the repo
    # Even creating the missing directories first: in a private /tmp they are not the host's.
    sandbox.run(f"import os\nos.makedirs({str(tmp_path)!r}, exist_ok=True)\n"
                f"open({str(outside_file)!r}, 'w').write('escaped')\n", timeout=5)
    assert not outside_file.exists()


def test_files_in_its_own_directory_do_not_persist(monkeypatch):
    workdirs = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp",
                        lambda **kwargs: workdirs.append(mkdtemp(**kwargs)) or workdirs[-1])
    name = f"scratch-{uuid.uuid4().hex}.txt"
    outcome = sandbox.run(f"import os, sys\nopen({name!r}, 'w').write('data')\n"
                          f"print(os.path.abspath({name!r}), file=sys.stderr)\n", timeout=5)
    assert outcome.passed, outcome.detail
    written = Path(outcome.detail.strip())
    assert written.name == name and not written.exists()
    assert workdirs and not Path(workdirs[0]).exists()


def test_no_network_even_to_localhost():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        outcome = sandbox.run(program, timeout=5)
        assert not outcome.passed
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # no connection ever arrived


def test_fallback_network_guard_refuses_sockets():
    # The guard used where there is no network namespace, run here without the sandbox around it.
    with socket.socket() as listener, tempfile.TemporaryDirectory() as directory:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        program = Path(directory) / "program.py"
        port = listener.getsockname()[1]
        program.write_text(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n")
        result = subprocess.run([sys.executable, "-c", sandbox.NETWORK_GUARD, str(program)],
                                capture_output=True, text=True, timeout=10)
        assert result.returncode != 0 and "network access is disabled" in result.stderr
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_fallback_without_namespaces(monkeypatch):
    # As root without a mount namespace, the sandbox uid must be able to reach the interpreter;
    # where it cannot (Python under /root here), every run is an "error" that says so.
    monkeypatch.setattr(sandbox, "_unshare_command", lambda: None)
    parts = Path(sys.base_prefix).parents
    reachable = os.geteuid() != 0 or all(os.stat(p).st_mode & 0o001 for p in parts)
    outcome = sandbox.run("print('hello')\n", timeout=5)
    if reachable:
        assert outcome.status == "passed", outcome.detail
        assert not sandbox.run("assert False\n", timeout=5).passed
    else:
        assert outcome.status == "error" and "cannot reach" in outcome.detail


def test_flood_of_output_costs_the_caller_nothing():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    flood_stdout = sandbox.run(
        "import sys\nfor _ in range(20_000):\n    sys.stdout.write('x' * 10_000)\n", timeout=10)
    flood_stderr = sandbox.run(
        "import sys\nwhile True:\n    sys.stderr.write('y' * 10_000)\n", timeout=5)
    assert flood_stdout.passed  # 200 MB to stdout: discarded
    assert not flood_stderr.passed and "file-size limit" in flood_stderr.detail
    assert len(flood_stderr.detail) <= sandbox.DETAIL_CHARS
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024


def test_daemonized_child_does_not_survive():
    token = f"daemon-{uuid.uuid4().hex}"
    child = "import time\ntime.sleep(60)\n"
    program = f"""
import os, sys
if os.fork() == 0:              # double fork + setsid: a classic daemon, out of our process group
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', {child!r}, {token!r}])
    os._exit(0)
os.wait()
import time                     # exit only once the daemon runs, or the test would prove nothing
deadline = time.monotonic() + 2
while not any({token!r}.encode() in open(f'/proc/{{p}}/cmdline', 'rb').read()
              for p in os.listdir('/proc') if p.isdigit()):
    assert time.monotonic() < deadline, 'the daemon did not start'
"""
    outcome = sandbox.run(program, timeout=5)
    assert outcome.passed, outcome.detail  # the daemon was running when the program exited
    assert processes_with(token) == []


def test_run_many_keeps_order_and_runs_in_parallel():
    # Later programs finish first, and odd ones fail: the result order must be the input order.
    programs = [f"import sys, time\ntime.sleep({1 - 0.2 * i:.1f})\n"
                f"print({i}, file=sys.stderr)\nsys.exit({i % 2})\n" for i in range(4)]
    start = time.monotonic()
    outcomes = sandbox.run_many(programs, timeout=5, workers=4)
    assert time.monotonic() - start < 3
    assert [o.detail.strip() for o in outcomes] == ["0", "1", "2", "3"]
    assert [o.passed for o in outcomes] == [True, False, True, False]
    assert sandbox.run_many([], timeout=5) == []


# -----------------------------------------------------------------------------------------------
# Nothing outlives the caller, and Ctrl-C stops everything at once

CALLER = """
import sys, time
sys.path.insert(0, {repo!r})
import sandbox
{body}
"""


def hidden(text: str) -> str:
    """An expression for `text` that does not contain it, so a token in the program appears in the
    program's command line and not in its caller's."""
    return f"bytes.fromhex({text.encode().hex()!r}).decode()"


def start_caller(body: str, **popen) -> subprocess.Popen:
    """A Python process that uses the sandbox the way train.py or evaluate.py would."""
    return subprocess.Popen([sys.executable, "-c", CALLER.format(repo=str(REPO), body=body)], **popen)


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return result


def children_of(pid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(name))
        except (OSError, ValueError, IndexError):
            pass
    return pids


@pytest.mark.parametrize("victim", ["caller", "unshare"])
def test_program_dies_with_its_caller(victim):
    # A sleeping program never reaches its CPU limit: only the parent-death signal can end it.
    token = f"orphan-{uuid.uuid4().hex}"
    caller = start_caller(f"sandbox.run({hidden(tagged('import time; time.sleep(300)', token))}, timeout=60)")
    try:
        wait_for(lambda: processes_with(token), 10, "the program did not start")
        if victim == "caller":
            os.kill(caller.pid, 9)
        else:  # the first child of the caller is setpriv, which became unshare by exec
            wrapper = wait_for(lambda: children_of(caller.pid), 5, "no sandbox process")
            os.kill(wrapper[0], 9)
        wait_for(lambda: not processes_with(token), 5, f"the program outlived kill -9 of the {victim}")
    finally:
        caller.kill()
        caller.wait()
        for pid in processes_with(token):
            os.kill(pid, 9)


def test_ctrl_c_in_run_many_stops_at_once_and_leaves_nothing(tmp_path):
    token = f"interrupted-{uuid.uuid4().hex}"
    body = (f"programs = [{hidden(tagged('import time; time.sleep(8)', token))}] * 8\n"
            "try:\n    sandbox.run_many(programs, timeout=30, workers=2)\n"
            "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n")
    caller = start_caller(body, env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE,
                          text=True)
    try:
        wait_for(lambda: len(processes_with(token)) >= 2, 10, "the programs did not start")
        start = time.monotonic()
        for _ in range(3):  # impatient: three Ctrl-C in a row
            os.kill(caller.pid, signal.SIGINT)
            time.sleep(0.05)
        out, _ = caller.communicate(timeout=10)
        assert time.monotonic() - start < 3, "Ctrl-C waited for the queued programs"
        assert out.strip() == "interrupted"
        assert processes_with(token) == []
        assert list(tmp_path.iterdir()) == []  # no sandbox-* folders left
    finally:
        caller.kill()
        for pid in processes_with(token):
            os.kill(pid, 9)


# -----------------------------------------------------------------------------------------------
# What the program can see of the host

def sysv_ipc_program(key: int) -> str:
    return f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT = 0o1000
assert libc.shmget({key}, 1 << 20, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()
assert libc.msgget({key}, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()
assert libc.semget({key}, 1, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()
"""


def test_system_v_ipc_objects_do_not_survive_the_run():
    key = random.Random().randrange(1 << 20, 1 << 30)
    outcome = sandbox.run(sysv_ipc_program(key), timeout=5)
    assert outcome.passed, outcome.detail  # it could make them, in a namespace of its own
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            keys = {int(line.split()[0]) for line in f.readlines()[1:]}
        assert key not in keys, f"a System V {kind} object made inside is still on the host"


def test_no_unix_socket_on_the_host_filesystem_is_reachable():
    directory = Path(tempfile.mkdtemp(dir="/var/tmp"))  # outside the private /tmp
    path = directory / "host.sock"
    try:
        os.chmod(directory, 0o755)
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            os.chmod(path, 0o777)  # anyone may connect: only the sandbox can stop it
            listener.listen()
            program = (f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\n")
            outcome = sandbox.run(program, timeout=5)
            assert not outcome.passed
            listener.settimeout(0.2)
            with pytest.raises(TimeoutError):
                listener.accept()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_the_project_and_its_data_are_invisible():
    # A solution that found the dataset could read the expected answers.
    data_file = REPO / "data" / "mbpp" / "test.jsonl.gz"
    assert data_file.exists()
    program = (f"import os\nassert not os.path.exists({str(data_file)!r})\n"
               f"assert not os.path.exists({str(REPO)!r})\n"
               "assert sorted(os.listdir('/dev')) == ['fd', 'null', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']\n"
               # the system directories, /dev, /proc, /tmp and the way to the Python installation
               f"allowed = {{'usr', 'etc', 'bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32', 'dev', 'proc', 'tmp', {sandbox.PROGRAM_PYTHON.split('/')[1]!r}}}\n"
               "assert set(os.listdir('/')) <= allowed, os.listdir('/')\n"
               "assert not os.path.exists('/run') and not os.path.exists('/home') and not os.path.exists('/var')\n")
    outcome = sandbox.run(program, timeout=5)
    assert outcome.passed, outcome.detail


# -----------------------------------------------------------------------------------------------
# Solutions with tests: the judge's verdict, not the exit status

def test_tests_pass_and_fail_by_the_judge():
    honest = sandbox.Tests("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n")
    wrong = sandbox.Tests("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5\n")
    exits = sandbox.Tests("import os\nos._exit(0)\n", "assert add(2, 3) == 5\n")
    outcomes = sandbox.run_many([honest, wrong, exits], timeout=5)
    assert [o.passed for o in outcomes] == [True, False, False], [o.detail for o in outcomes]
    assert "AssertionError" in outcomes[1].detail and "assert add(2, 3) == 5" in outcomes[1].detail


def test_solution_cannot_reach_the_judge():
    # The judge is PID 1 of the sandbox and non-dumpable: its fds (the verdict pipe), memory and
    # environment are closed to the solution, which runs under the same uid.
    probe = """
import os
for path in ['/proc/1/fd', '/proc/1/mem', '/proc/1/environ', '/proc/1/fd/3']:
    try:
        (os.listdir if path.endswith('fd') else open)(path)
    except OSError:
        continue
    raise SystemExit(f'{path} is open to the solution')
"""
    outcome = sandbox.run(sandbox.Tests(probe, "pass\n"), timeout=5)
    assert outcome.passed, outcome.detail
    # and writing "passed" to every fd it has does not make failing tests pass
    forger = "import os\nfor fd in range(256):\n    try:\n        os.write(fd, b'passed\\n')\n    except OSError:\n        pass\n"
    assert not sandbox.run(sandbox.Tests(forger, "assert False\n"), timeout=5).passed


# -----------------------------------------------------------------------------------------------
# No state crosses runs, and a run's memory is bounded in total

KEYCTL = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NUMBERS = {numbers!r}[os.uname().machine]
def call(name, *args):
    result = libc.syscall(ctypes.c_long(NUMBERS[name]), *args)
    return result, ctypes.get_errno()
"""


def keyring_program(token: str, body: str) -> str:
    numbers = {machine: names for machine, (_, names) in sandbox.SYSCALL_NUMBERS.items()}
    return KEYCTL.format(numbers=numbers) + f"TOKEN = {token!r}\n" + body


def test_no_note_left_in_the_kernel_keyring_reaches_a_later_run():
    # Keyrings are not namespaced and a uid's keys outlive its processes: a run that could store a
    # key (world-readable) would leave a note for the next run, which reads /proc/keys. Here the
    # second run "passes" only if it finds the first run's note.
    token = f"t2-note-{uuid.uuid4().hex[:12]}"
    leave_note = keyring_program(token, """
print(os.getuid(), file=sys.stderr)
data = b"guess:True"
key, error = call("add_key", b"user", TOKEN.encode(), data, len(data), ctypes.c_long(-4))
if key > 0:
    call("keyctl", 5, ctypes.c_long(key), ctypes.c_ulong(0x3f3f3f3f))  # KEYCTL_SETPERM: all may read
assert key == -1 and error == 1, f"add_key gave {key} (errno {error})"
""")
    read_note = keyring_program(token, """
with open("/proc/keys") as f:
    assert TOKEN in f.read()
""")
    first = sandbox.run(leave_note, timeout=5)
    assert first.passed, first.detail
    assert not sandbox.run(read_note, timeout=5).passed
    uid = first.detail.split()[0]
    with open("/proc/key-users") as f:  # nothing of the sandbox's uid is left on the host
        assert not [line for line in f if line.split(":")[0].strip() == uid]


def test_calls_that_escape_the_limits_or_the_namespaces_are_denied():
    program = keyring_program("unused", f"""
for name in {sandbox.DENIED_SYSCALLS!r}:
    result, error = call(name, 0, 0, 0, 0, 0)
    assert result == -1 and error == 1, f"{{name}} gave {{result}} (errno {{error}}), not EPERM"
if os.uname().machine == "x86_64":  # keyctl under the x32 ABI's number
    result, error = libc.syscall(ctypes.c_long({sandbox.X32_SYSCALL_BIT} | 250), 0, 0, 0, 0), ctypes.get_errno()
    assert result == -1 and error == 38, (result, error)
""")
    outcome = sandbox.run(program, timeout=5)
    assert outcome.passed, outcome.detail


def test_memfd_cannot_hold_memory_outside_the_address_space_limit():
    # memfd pages belong to no process's mappings, so RLIMIT_AS does not count them.
    program = ("import os, sys\ntry:\n    os.memfd_create('pages')\nexcept PermissionError:\n    sys.exit(0)\n"
               "sys.exit(1)\n")
    outcome = sandbox.run(program, timeout=5)
    assert outcome.passed, outcome.detail


def test_the_run_holds_at_most_one_memory_limit_in_all(monkeypatch):
    # Each process stays well under its own address-space limit; together they exceed the run's.
    if sandbox._cgroup_parent() is None:
        pytest.skip("no memory cgroup on this machine (the sandbox warned): only per-process limits")
    monkeypatch.setattr(sandbox, "MEMORY_LIMIT", 256 * 1024**2)
    program = """
import os, sys, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(100 * 1024**2)  # touched: zero-filled
        time.sleep(3)
        os._exit(0)
    children.append(pid)
sys.exit(max(os.waitpid(pid, 0)[1] for pid in children) != 0)
"""
    outcome = sandbox.run(program, timeout=10)
    assert not outcome.passed
    assert "memory limit" in outcome.detail, outcome.detail
    # the same program within the limit passes: it is the total that was refused
    monkeypatch.setattr(sandbox, "MEMORY_LIMIT", 1024**3)
    outcome = sandbox.run(program, timeout=10)
    assert outcome.passed, outcome.detail


def test_empty_files_cannot_fill_kernel_memory():
    # An empty file costs no bytes of the tmpfs, but its inode costs kernel memory.
    program = f"""
import os, sys
for folder in ("/tmp", "/dev/shm"):
    made = 0
    try:
        while made < 100_000:
            open(f"{{folder}}/f{{made}}", "w").close()
            made += 1
    except OSError:
        pass
    assert made <= {sandbox.SCRATCH_INODES}, (folder, made)
"""
    outcome = sandbox.run(program, timeout=20)
    assert outcome.passed, outcome.detail


def test_a_private_bounded_dev_shm_for_multiprocessing():
    token = f"t2-shm-{uuid.uuid4().hex[:12]}"
    program = f"""
import multiprocessing, os
from concurrent.futures import ProcessPoolExecutor
def square(x):
    return x * x
if __name__ == "__main__":
    with multiprocessing.Pool(2) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
    with ProcessPoolExecutor(2) as pool:
        assert list(pool.map(square, range(3))) == [0, 1, 4]
    with open("/dev/shm/{token}", "wb") as f:
        try:
            f.write(bytes({sandbox.SHM_SIZE} + 1))
            f.flush()
            raise SystemExit("/dev/shm took more than its size")
        except OSError:
            pass
"""
    outcome = sandbox.run(program, timeout=20)
    assert outcome.passed, outcome.detail
    assert not os.path.exists(f"/dev/shm/{token}")


def test_open_files_are_limited():
    program = (f"import os\nfds = []\ntry:\n    while len(fds) < 5000:\n        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
               f"except OSError:\n    pass\nassert len(fds) < {sandbox.OPEN_FILES_LIMIT}, len(fds)\n")
    outcome = sandbox.run(program, timeout=5)
    assert outcome.passed, outcome.detail


def test_folders_of_a_killed_caller_are_removed_by_the_next_run():
    token = f"litter-{uuid.uuid4().hex}"
    caller = start_caller(f"sandbox.run({hidden(tagged('import time; time.sleep(300)', token))}, timeout=60)")
    try:
        wait_for(lambda: processes_with(token), 10, "the program did not start")
        os.kill(caller.pid, 9)
        caller.wait()
        wait_for(lambda: not processes_with(token), 5, "the program outlived its caller")
    finally:
        caller.kill()
        caller.wait()
    left = lambda: [p for p in Path(tempfile.gettempdir()).glob(f"sandbox-{caller.pid}-*")]
    assert left(), "the killed caller's folder was expected to be there until the next run"
    assert sandbox.run("pass\n", timeout=5).passed
    assert not left()
    if sandbox._cgroup_parent() is not None:
        assert not list(Path(sandbox._cgroup_parent()[0]).glob(f"sandbox-{caller.pid}-*"))


# -----------------------------------------------------------------------------------------------
# A reply cannot break the batch, and a broken sandbox is an error, not a wrong answer

def test_text_no_file_can_hold_fails_that_program_only():
    outcomes = sandbox.run_many(["# \ud800\n", "pass\n"], timeout=5)
    assert [(o.passed, o.status) for o in outcomes] == [(False, "failed"), (True, "passed")]


def test_a_sandbox_that_cannot_start_is_an_error(monkeypatch):
    monkeypatch.setattr(sandbox, "PROGRAM_PYTHON", "/nonexistent/python3")
    outcome = sandbox.run("pass\n", timeout=5)
    assert outcome.status == "error", outcome


def test_a_program_cannot_pretend_the_sandbox_failed():
    # 125 is the launcher's own exit status for "could not start"; from the program it is a failure.
    outcome = sandbox.run("import sys\nprint('sandbox: could not start the program', file=sys.stderr)\nsys.exit(125)\n", timeout=5)
    assert (outcome.passed, outcome.status) == (False, "failed")


def test_the_first_runs_of_many_threads_agree_on_the_memory_cgroup(monkeypatch):
    # run_many's threads all look for the cgroup hierarchy at their first run; probes made at once
    # shared one probe cgroup and failed each other, and the sandbox then fell back with a warning.
    expected = sandbox._cgroup_parent()
    monkeypatch.setattr(sandbox, "_find_cgroup_parent", functools.cache(sandbox._find_cgroup_parent.__wrapped__))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning fails the test
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda _: sandbox._cgroup_parent(), range(8)))
    assert found == [expected] * 8
