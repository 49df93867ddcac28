"""Decide whether a model-written solution passes its tests, in a way the solution cannot forge.

    outcome = sandbox.run_tests(solution, tests, prelude=..., solution_names=("add",))

Threat model. The solutions come from a model that is being optimised for this verdict. It does not
know how the judge works, but RL will find any cheap reply that scores: exiting before the tests
run (sys.exit, os._exit, exec of another program, a signal, an atexit hook, a thread that exits the
process), hooking exceptions or signals so a failed assert looks like success, tracing the test
code to jump over asserts, replacing builtins or modules the tests use, returning objects that are
equal to everything, or reading the expected answers (its own asserts, the dataset). When the tests
run in the solution's own interpreter, every one of these can turn a failure into "exit status 0",
because the solution shares the interpreter, the memory and the exit path with the tests.

So the tests do not run there. Two processes, inside one sandbox (sandbox.py):

  judge (this file, `judge.py VERDICT_FD ...`): trusted. It first makes itself non-dumpable, so
    no process of its uid can ptrace it or open its /proc/<pid>/{mem,fd,environ}; it reads the test
    code and unlinks the files it came in, then starts the worker, runs the prelude and the tests
    in its own interpreter, and writes the verdict to VERDICT_FD, a pipe to the caller that only the
    judge holds. "passed" means: every statement of the tests ran here, no assert failed, and
    nothing raised.
  worker (`judge.py --worker`): untrusted. It runs the solution, then answers the judge's requests
    over two pipes: a name's value, a call, an attribute, the next item of an iterator.

What crosses from the worker is data, rebuilt by the judge from a tagged JSON encoding into plain
builtins (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, Fraction,
Decimal): a subclass loses its methods on the way, so no __eq__ of the solution's ever runs in the
judge. Everything else (functions, classes, instances, generators) comes back as a `Remote` handle
that can be called, iterated, asked for an attribute or its truth value, and passed back; `==` on
a handle is identity, because forwarding it would let the solution see the expected value and
answer "equal". A name the tests use resolves, in order, to: what the prelude or the tests define
themselves, the solution's own name when it is one the task asks for (`solution_names`: MBPP's
function may be called `sum`), the judge's builtins, and the solution's globals (a module there is
imported again by the judge, so a patched `math` stays in the worker). Exits, hooks, tracers,
threads, patched builtins and modules all stay in the worker; the worst they do there is make a
call fail or hang, which fails the test.

The worker cannot tell whether its answers were right. If the judge stopped at the first failed
assert, a solution would learn from being asked the next question that its last answer passed, and
one that could leave a note anywhere a later run reads it back (the kernel's page cache of the
read-only system files is one such place that no sandbox layer closes) would learn the answers in a
few tries without solving anything. So every `assert` of the tests is rewritten (ast) to record a
failure and go on: the worker sees the same requests, in the same order, whatever it answers; the
worker is killed before the verdict is written, so not even the time of its end depends on it.

Not defended, and why:
 - A test whose own control flow depends on the solution's answers still shows the worker part of
   its verdict: `assert all(f(x) == y for ...)` and `assert f(a) == b and f(c) == d` stop asking
   at the first wrong answer, as Python's all() and `and` do.
 - A process started by the worker runs under the same uid; it can kill the worker, spin, or fill
   the scratch space, which only fails the run. It cannot signal the judge: the judge is PID 1 of
   its PID namespace, which ignores signals it has no handler for, even SIGKILL, from inside.
   Without a PID namespace (sandbox.py's fallback) it can kill the judge, which also only fails.
 - A solution that computes the right answers by other means than solving the task, for example
   a lookup table of the test inputs it has seen as call arguments, or a copy of the dataset it
   was trained on, passes. That is memorisation, not a harness bug.
 - Arguments are copies: a test that checks how the solution mutated an argument in place sees the
   unmutated copy and fails (no MBPP or HumanEval test does this; the slow suite checks).
 - sandbox.py's fallback without namespaces (see its docstring) leaves the filesystem readable,
   dataset files included, and without a uid of its own the worker can read the judge's memory.
"""

import ast
import builtins
import ctypes
import decimal
import fractions
import importlib
import json
import linecache
import os
import subprocess
import sys
import traceback

PR_SET_DUMPABLE = 4
MAX_MESSAGE = 64 * 1024**2  # bytes in one reply from the worker; a bigger one fails the call


# -----------------------------------------------------------------------------------------------
# The encoding, used in both directions. Only plain data is encoded by value; anything else
# becomes {"ref": ref_of(value)}, a handle on an object that stays in the worker.

COLLECTIONS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}  # {kind: [items]}

def encode(value, ref_of) -> object:
    if value is None or value is True or value is False:  # before int: bool cannot be subclassed
        return value
    if isinstance(value, int):
        return int.__int__(value)      # the int itself, not a subclass's idea of it
    if isinstance(value, float):
        return float.__float__(value)  # json writes NaN and Infinity; both sides are Python
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        kind = "bytearray" if isinstance(value, bytearray) else "bytes"
        return {kind: bytes(value).decode("latin-1")}
    if isinstance(value, dict):
        return {"dict": [[encode(k, ref_of), encode(v, ref_of)] for k, v in dict.items(value)]}
    for kind, collection in COLLECTIONS.items():
        if isinstance(value, collection):  # iterated as the builtin: a subclass's __iter__ does not run
            return {kind: [encode(v, ref_of) for v in collection.__iter__(value)]}
    if type(value) is fractions.Fraction:
        return {"fraction": [value.numerator, value.denominator]}
    if type(value) is decimal.Decimal:
        return {"decimal": str(value)}
    if type(value) is type(sys):
        return {"module": str(value.__name__)}
    numpy = sys.modules.get("numpy")  # a solution's numpy scalar is a number like any other
    if numpy is not None and isinstance(value, numpy.generic):
        return encode(value.item(), ref_of)
    return {"ref": ref_of(value)}


def decode(data, resolve_ref):
    """Plain builtins from `encode`'s output; `resolve_ref(n)` stands in for handle n."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        raise ValueError("a bare JSON list is not part of the encoding")
    if type(data) is not dict or len(data) != 1:
        raise ValueError(f"not an encoded value: {type(data).__name__}")
    (kind, body), = data.items()
    if kind in COLLECTIONS:
        return COLLECTIONS[kind](decode(v, resolve_ref) for v in _list(body))
    if kind == "dict":
        return {decode(k, resolve_ref): decode(v, resolve_ref) for k, v in map(_pair, _list(body))}
    if kind in ("bytes", "bytearray"):
        raw = _typed(body, str).encode("latin-1")
        return raw if kind == "bytes" else bytearray(raw)
    if kind == "complex":
        real, imag = _pair(body)
        return complex(_typed(real, int, float), _typed(imag, int, float))
    if kind == "fraction":
        numerator, denominator = _pair(body)
        return fractions.Fraction(_typed(numerator, int), _typed(denominator, int))
    if kind == "decimal":
        return decimal.Decimal(_typed(body, str))
    if kind == "module":
        name = _typed(body, str)
        if name.partition(".")[0] not in sys.stdlib_module_names:
            raise ValueError(f"module {name!r} is not in the standard library")
        return importlib.import_module(name)
    if kind == "ref":
        return resolve_ref(_typed(body, int))
    raise ValueError(f"unknown kind {kind!r}")


def _typed(value, *types):
    if type(value) not in types:
        raise ValueError(f"expected {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
    return value


def _list(value):
    return _typed(value, list)


def _pair(value):
    if type(value) is not list or len(value) != 2:
        raise ValueError("expected a pair")
    return value


# -----------------------------------------------------------------------------------------------
# Judge side

class SolutionError(Exception):
    """The solution raised an exception that is not a builtin one, or broke the protocol."""


class Remote:
    """A handle on an object in the worker. Calls, attributes, iteration, truth and length are
    forwarded; comparisons are not (identity only), nor is anything else."""
    __slots__ = ("_worker", "_ref")

    def __init__(self, worker, ref):
        object.__setattr__(self, "_worker", worker)
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        return self._worker.ask("call", self, list(args), kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._worker.ask("getattr", self, name)

    def __setattr__(self, name, value):
        self._worker.ask("setattr", self, name, value)

    def __iter__(self):
        return self._worker.ask("iter", self)

    def __next__(self):
        return self._worker.ask("next", self)

    def __bool__(self):
        return self._worker.ask("bool", self) is True

    def __len__(self):
        length = self._worker.ask("len", self)
        if type(length) is not int:
            raise SolutionError("len() of a solution object is not an int")
        return length

    def __repr__(self):
        return f"<solution object #{self._ref}>"


class Worker:
    """The judge's end of the pipes to the worker process."""

    def __init__(self, command: list[str], solution_path: str):
        request_read, requests = os.pipe()
        replies, reply_write = os.pipe()
        self.process = subprocess.Popen(
            [*command, __file__, "--worker", solution_path, str(request_read), str(reply_write)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(request_read, reply_write))
        os.close(request_read)
        os.close(reply_write)
        self.requests_file = os.fdopen(requests, "wb")
        self.replies_file = os.fdopen(replies, "rb")
        self.handles = {}
        loaded = self._read()
        if loaded != ["loaded"]:
            raise SolutionError(f"the solution did not load: {self._describe(loaded)}")

    def ask(self, *request):
        message = [request[0], *(encode(part, self._ref_of) for part in request[1:])]
        try:
            self.requests_file.write(json.dumps(message).encode() + b"\n")
            self.requests_file.flush()
        except OSError as error:
            raise SolutionError(f"the solution's process is gone ({error})") from None
        reply = self._read()
        if reply[:1] == ["value"] and len(reply) == 2:
            return decode(reply[1], self.handle)
        if reply[:1] == ["raise"] and len(reply) == 3:
            name, message = _typed(reply[1], str), _typed(reply[2], str)
            builtin = getattr(builtins, name, None)
            # StopIteration would silently end a loop of the tests' (map, filter) instead of failing
            if isinstance(builtin, type) and issubclass(builtin, Exception) and builtin is not StopIteration:
                raise builtin(message)
            raise SolutionError(f"{name}: {message}")
        # Each of these answers one kind of request only: a "stop" to a call would end a loop of the
        # tests' (all(map(candidate, xs)) would hold), a "missing" to a call would read as a NameError.
        if reply == ["missing"] and request[0] == "get":
            raise KeyError(request[-1])
        if reply == ["stop"] and request[0] == "next":
            raise StopIteration
        raise SolutionError(f"unexpected reply {self._describe(reply)}")

    def _ref_of(self, value) -> int:
        if type(value) is Remote and value._worker is self:
            return value._ref
        raise TypeError(f"the tests passed a {type(value).__name__} to the solution: only plain data "
                        "and the solution's own objects can cross")

    def handle(self, ref: int) -> Remote:
        if ref not in self.handles:
            self.handles[ref] = Remote(self, ref)
        return self.handles[ref]

    def _read(self) -> list:
        line = self.replies_file.readline(MAX_MESSAGE)
        if not line.endswith(b"\n"):
            status = self.process.poll()
            raise SolutionError("the solution's process ended" + (f" (exit status {status})" if status is not None else ""))
        reply = json.loads(line)
        if type(reply) is not list or not reply or type(reply[0]) is not str:
            raise SolutionError("malformed reply")
        return reply

    @staticmethod
    def _describe(reply) -> str:
        return repr(reply)[:500]


class TestNamespace(dict):
    """The tests' globals. A name they do not define is looked up as the module docstring says."""

    def __init__(self, worker: Worker, solution_names):
        super().__init__(__name__="__main__", __builtins__=builtins)
        self.worker, self.solution_names = worker, frozenset(solution_names)

    def __missing__(self, name):
        if name in vars(builtins) and name not in self.solution_names:
            raise KeyError(name)  # the lookup goes on to the judge's builtins
        return self.worker.ask("get", name)


ASSERT_HOOK = "__judge_assert__"  # what each `assert` of the tests becomes a call of


class RecordAsserts(ast.NodeTransformer):
    """`assert test, message` -> `__judge_assert__(lambda: test, line)`: the test is evaluated as
    before (in its own scope, through the lambda), but a false or raising one is recorded instead
    of stopping the tests. The message is dropped: it is for people, and it could call the solution."""

    def visit_Assert(self, node: ast.Assert) -> ast.stmt:
        check = ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                           body=node.test)
        call = ast.Call(func=ast.Name(ASSERT_HOOK, ast.Load()), args=[check, ast.Constant(node.lineno)], keywords=[])
        return ast.copy_location(ast.Expr(call), node)


class Asserts:
    """The failed asserts of a run of the tests, by line."""

    def __init__(self):
        self.failures: list[tuple[int, str]] = []

    def __call__(self, check, line: int) -> None:
        try:
            if bool(check()):
                return
            failure = "AssertionError"
        except BaseException as error:  # the solution's exceptions and the judge's own (KeyboardInterrupt)
            failure = f"{type(error).__name__}: {error}"[:500]
        self.failures.append((line, failure))

    def report(self, source: str) -> None:
        lines = source.splitlines()
        for line, failure in self.failures[:5]:
            print(f'  File "tests", line {line}\n    {lines[line - 1].strip()}\n{failure}', file=sys.stderr)
        if len(self.failures) > 5:
            print(f"... and {len(self.failures) - 5} more failed asserts", file=sys.stderr)


def judge(verdict_fd: int, solution_path: str, tests_path: str, prelude_path: str, solution_names: list[str],
          worker_command: list[str]) -> bool:
    worker, asserts, tests = None, Asserts(), ""
    try:
        tests, prelude = _take(tests_path), _take(prelude_path)
        worker = Worker(worker_command, solution_path)
        namespace = TestNamespace(worker, solution_names)
        namespace[ASSERT_HOOK] = asserts
        for name, source in [("prelude", prelude), ("tests", tests)]:
            linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # for tracebacks
            tree = ast.parse(source, name)
            if name == "tests":
                tree = ast.fix_missing_locations(RecordAsserts().visit(tree))
            exec(compile(tree, name, "exec"), namespace)
        passed = not asserts.failures
    except BaseException:  # any other failure of the tests, including SystemExit raised by test code
        traceback.print_exc(limit=-3)
        passed = False
    # The worker goes first: when it ends must not depend on the verdict.
    if worker is not None:
        worker.process.kill()
        worker.process.wait()
    asserts.report(tests)
    os.write(verdict_fd, b"passed\n" if passed else b"failed\n")
    os.close(verdict_fd)
    return passed


def _take(path: str) -> str:
    """Read a file the worker must never see, and remove it before the worker starts."""
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    return text


# -----------------------------------------------------------------------------------------------
# Worker side: runs the solution, then serves requests until the judge closes the pipe. All of it
# is untrusted once the solution has run; the judge checks every reply.

def serve(solution_path: str, requests_fd: int, replies_fd: int) -> None:
    requests = os.fdopen(requests_fd, "rb")
    replies = os.fdopen(replies_fd, "wb", buffering=0)
    send = lambda reply: replies.write(json.dumps(reply).encode() + b"\n")
    objects, handle_of = [], {}  # the objects the judge holds handles on, and id -> handle

    def ref_of(obj) -> int:
        if id(obj) not in handle_of:
            handle_of[id(obj)] = len(objects)
            objects.append(obj)  # kept alive, so the id stays this object's
        return handle_of[id(obj)]

    # A real __main__ module, as if the solution were run as a script: pickle finds its classes
    # there, and __file__ is its own.
    module = type(sys)("__main__")
    module.__file__ = os.path.abspath(solution_path)
    sys.modules["__main__"] = module
    namespace = module.__dict__
    sys.argv = [solution_path]
    with open(solution_path) as f:
        source = f.read()
    try:
        exec(compile(source, solution_path, "exec"), namespace)
    except BaseException as error:
        traceback.print_exc()
        send(["failed to load", type(error).__name__])
        return
    send(["loaded"])

    def value(data):
        return decode(data, objects.__getitem__)

    for line in requests:
        try:
            kind, *parts = json.loads(line)
            if kind == "get":
                name = parts[0]
                if name not in namespace:
                    send(["missing"])
                    continue
                result = namespace[name]
            elif kind == "call":
                function, args, kwargs = value(parts[0]), value(parts[1]), value(parts[2])
                result = function(*args, **kwargs)
            elif kind == "getattr":
                result = getattr(value(parts[0]), value(parts[1]))
            elif kind == "setattr":
                result = setattr(value(parts[0]), value(parts[1]), value(parts[2]))
            elif kind == "iter":
                result = iter(value(parts[0]))
            elif kind == "next":
                try:
                    result = next(value(parts[0]))
                except StopIteration:
                    send(["stop"])
                    continue
            elif kind == "bool":
                result = bool(value(parts[0]))
            elif kind == "len":
                result = len(value(parts[0]))
            else:
                raise ValueError(f"unknown request {kind!r}")
            send(["value", encode(result, ref_of)])
        except Exception as error:
            send(["raise", type(error).__name__, str(error)[:2000]])


def _set_non_dumpable() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        sys.stdout.flush()
        os._exit(0)
    # judge.py VERDICT_FD SOLUTION TESTS PRELUDE SOLUTION_NAMES_JSON -- WORKER_COMMAND...
    _set_non_dumpable()  # before anything of the solution's exists
    verdict_fd, solution_path, tests_path, prelude_path, names = sys.argv[1:6]
    assert sys.argv[6] == "--"
    judge(int(verdict_fd), solution_path, tests_path, prelude_path, json.loads(names), sys.argv[7:])
    sys.stderr.flush()
    os._exit(0)  # no atexit, no finalizers: nothing of the tests runs after the verdict
