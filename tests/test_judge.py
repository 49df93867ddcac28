"""judge.py: what crosses between the solution's process and the judge's, and how a name in the
tests resolves. The encoding is checked in this process against hand-written values; the rest runs
real solutions in the sandbox (a few seconds)."""
import decimal
import fractions
import json
import math
from collections import Counter, OrderedDict, namedtuple

import pytest

import judge
import sandbox


def no_refs(value):
    raise AssertionError(f"{value!r} should have been encoded by value")


def round_trip(value):
    return judge.decode(json.loads(json.dumps(judge.encode(value, no_refs))), no_refs)


Point = namedtuple("Point", "x y")


class AlwaysEqualInt(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__


class AlwaysEqualStr(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__


@pytest.mark.parametrize("value, expected", [
    (None, None), (True, True), (False, False), (0, 0), (-7, -7), (10**40, 10**40),
    (1.5, 1.5), (-0.0, -0.0), (float("inf"), float("inf")), ("", ""), ("é\n\"x", "é\n\"x"),
    (b"\x00\xff", b"\x00\xff"), (bytearray(b"ab"), bytearray(b"ab")), (2 - 3j, 2 - 3j),
    ([1, [2, (3,)]], [1, [2, (3,)]]), ((), ()), ({1: "a", (2, 3): [4]}, {1: "a", (2, 3): [4]}),
    ({1, 2}, {1, 2}), (frozenset({"a"}), frozenset({"a"})),
    (fractions.Fraction(1, 3), fractions.Fraction(1, 3)), (decimal.Decimal("1.10"), decimal.Decimal("1.10")),
    # subclasses of builtins arrive as the builtin: their methods stay behind
    (Counter("aab"), {"a": 2, "b": 1}), (OrderedDict(x=1), {"x": 1}), (Point(1, 2), (1, 2)),
    (AlwaysEqualInt(3), 3), (AlwaysEqualStr("s"), "s"), (True + 0, 1),
])
def test_plain_data_round_trip(value, expected):
    decoded = round_trip(value)
    assert type(decoded) is type(expected) and decoded == expected
    if isinstance(expected, float) and expected == 0:
        assert math.copysign(1, decoded) == math.copysign(1, expected)


def test_subclass_equality_does_not_survive():
    assert round_trip(AlwaysEqualInt(3)) != 4
    assert round_trip([AlwaysEqualStr("a")]) != ["b"]
    assert math.isnan(round_trip(float("nan")))


def test_everything_else_is_a_handle():
    handles = []
    for value in [len, object(), iter([1]), range(3), AlwaysEqualInt]:
        assert judge.encode(value, lambda v: handles.append(v) or len(handles) - 1) == {"ref": len(handles) - 1}
    assert judge.encode(math, no_refs) == {"module": "math"}


@pytest.mark.parametrize("data", [
    [1, 2],                                  # a bare list is not part of the encoding
    {"list": [1], "tuple": [2]},             # one tag per value
    {"eval": "__import__('os')"},            # unknown tag
    {"bytes": 5}, {"complex": [1]}, {"fraction": ["1", 2]}, {"ref": "0"},
    {"module": "evil_module_on_the_path"},   # only the standard library is imported
])
def test_malformed_encodings_are_refused(data):
    with pytest.raises((ValueError, TypeError)):
        judge.decode(data, lambda n: object())


def run(solution, tests, **kwargs):
    return sandbox.run(sandbox.Tests(solution, tests, **kwargs), timeout=10)


SOLUTION = """
import math
math.isclose = lambda *a, **k: True     # patched in the solution's process only
class Node:
    def __init__(self, value):
        self.value, self.left = value, None
def depth(node):
    return 1 + (depth(node.left) if node.left else 0)
def squares(n):
    yield from (i * i for i in range(n))
def fail(kind):
    raise {"value": ValueError, "key": KeyError}[kind]("no")
def sum(a, b):                          # MBPP 126 names its function like the builtin
    return a * b
def sort_in_place(items):
    items.sort()
root = Node(1)
root.left = Node(2)
"""


def test_handles_calls_attributes_iteration_and_exceptions():
    tests = """
assert depth(root) == 2 and root.value == 1 and root.left.value == 2
node = Node(5)
node.left = Node(6)
node.left.left = Node(7)
assert depth(node) == 3
assert list(squares(4)) == [0, 1, 4, 9]
try:
    fail("value")
    raise AssertionError("no exception")
except ValueError as error:
    assert str(error) == "no"
assert math.isclose(1.0, 1.0) and not math.isclose(1.0, 2.0)   # the judge's own math
assert sum(2, 3) == 6                                           # a solution name, by request
assert root == root and root != Node(1)                         # handles: identity only
"""
    outcome = run(SOLUTION, tests, solution_names=("sum",))
    assert outcome.passed, outcome.detail


def test_builtins_the_tests_use_are_the_judges():
    # Without being one of the task's names, a solution's `sum` does not replace the tests' builtin.
    outcome = run(SOLUTION, "assert sum([1, 2, 3]) == 6\n")
    assert outcome.passed, outcome.detail


def test_arguments_are_copies():
    # Documented limit: a test that looks at an argument mutated in place sees the judge's copy.
    outcome = run(SOLUTION, "items = [3, 1, 2]\nsort_in_place(items)\nassert items == [1, 2, 3]\n")
    assert not outcome.passed


def test_the_prelude_is_the_judges():
    # HumanEval/32 checks poly(xs, candidate(xs)) ~ 0 with the prompt's poly; a solution that
    # redefines poly changes only its own.
    prelude = "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n"
    cheat = prelude.replace("return sum(", "return 0 * sum(") + "def find_zero(xs):\n    return 123.0\n"
    honest = prelude + "def find_zero(xs):\n    return -xs[0] / xs[1]\n"
    tests = "def check(candidate):\n    assert abs(poly([1, 2], candidate([1, 2]))) < 1e-6\ncheck(find_zero)\n"
    assert not run(cheat, tests, prelude=prelude, solution_names=("find_zero",)).passed
    outcome = run(honest, tests, prelude=prelude, solution_names=("find_zero",))
    assert outcome.passed, outcome.detail


def test_solution_that_does_not_load_fails_with_its_error():
    outcome = run("def f(:\n", "assert f() == 1\n")
    assert not outcome.passed and "SyntaxError" in outcome.detail


FORGED_REPLY = """
import os
def f(x):
    for fd in range(3, 64):     # the pipe to the judge is one of these
        try:
            os.write(fd, b'{reply}\\n')
        except OSError:
            pass
    os._exit(0)
"""


def test_a_stop_forged_as_the_reply_to_a_call_fails():
    # A StopIteration out of the call would end map, and all([]) holds.
    assert not run(FORGED_REPLY.format(reply='["stop"]'), "assert all(map(f, [1, 2, 3]))\n").passed


def test_the_solution_cannot_tell_whether_its_answers_were_right():
    # A solution that learnt from being asked the next question that its last answer passed could
    # leave that note where a later run reads it (the page cache of the read-only system files is
    # such a place). It must see the same calls whether its answers are right or wrong.
    tests = "assert double(1) == 2\nassert double(2) == 4\ndef check(f):\n    assert f(3) == 6\n    assert f(4) == 8\ncheck(double)\n"
    logging = "import sys\ndef double(x):\n    print('called', x, file=sys.stderr)\n    return {answer}\n"
    right = sandbox.run(sandbox.Tests(logging.format(answer="2 * x"), tests, solution_names=("double",)), timeout=5)
    wrong = sandbox.run(sandbox.Tests(logging.format(answer="-1"), tests, solution_names=("double",)), timeout=5)
    calls = lambda outcome: [line for line in outcome.detail.splitlines() if line.startswith("called")]
    assert right.passed and not wrong.passed
    assert calls(wrong) == calls(right) == ["called 1", "called 2", "called 3", "called 4"]
    # the failures are still reported, each with its line
    assert wrong.detail.count("AssertionError") == 4 and "assert f(3) == 6" in wrong.detail


def test_a_raising_answer_fails_and_the_tests_go_on():
    tests = "assert half(2) == 1\nassert half(0) == 0\nassert half(4) == 2\n"
    solution = "import sys\ndef half(x):\n    print('called', x, file=sys.stderr)\n    if x == 0:\n        raise ZeroDivisionError('no')\n    return x // 2\n"
    outcome = sandbox.run(sandbox.Tests(solution, tests, solution_names=("half",)), timeout=5)
    assert not outcome.passed
    assert [l for l in outcome.detail.splitlines() if l.startswith("called")] == ["called 2", "called 0", "called 4"]
    assert "ZeroDivisionError" in outcome.detail
