"""The benchmark tasks of Transformer² / SVF: data splits, chat prompts and exact answer scoring.

    task = tasks.get("gsm8k")
    examples = task.load("valid")                         # list of dicts, each with an "id"
    messages = task.messages(examples[0])                 # [{"role": "user", "content": ...}]
    correct = task.score_many(examples, completions)      # list of bool
    reward = task.reward(correct[0])                      # +1.0 / -1.0, the paper's unit reward

Training tasks (one SVF expert each): gsm8k (math), mbpp (code), arc_easy (reasoning).
Held-out tasks: math, humaneval, arc_challenge. cls is the task-label classification that trains the
classification expert z^c (the paper's §3.2 B). Generated code is run by sandbox.py, not here.

Splits. Deterministic and leak-free; rows keep their source order inside a split. The paper splits each
training task into equal train and valid halves; we shuffle the source indices once with
random.Random(0) and cut.
    gsm8k          train 3737 / valid 3736 (halves of GSM8K train, 7473), test 1319 (GSM8K test)
    mbpp           train 150 / valid 150 / test 199 (the MBPP test problems, task_ids 11..510, less task
                   347, a word-for-word repeat of task 76; the classic train ids 601..974 are not in our
                   data, so we cut our own split)
    arc_easy       train 285 / valid 285 (halves of ARC-Easy validation, 570), test 2376
    math           test 5000 (MATH test), test500 500 (MATH-500, a subset of test),
                   shots 4500 (test minus MATH-500: a leak-free few-shot pool when reporting test500);
                   every row carries "answer" (for test and shots: the solution's last \\boxed{})
    humaneval      test 164
    arc_challenge  validation 299 (few-shot pool), test 1172
    cls            train 450 / valid 450 / test 597: gsm8k -> "math", mbpp -> "code",
                   arc_easy -> "reasoning", 150 / 150 / 199 of each drawn from the same split of
                   the source task (balanced; mbpp is the smallest), then shuffled together.
Held-out tasks without validation data (math, humaneval) take few-shot prompts from their test split;
the adaptation code must then leave those prompts out of the reported score.

Scoring: answers.py reads the answer out of a reply (exact; a reply it cannot read is wrong). ARC is
not shipped (AI2's terms are unclear about redistribution): build_arc.py builds it from AI2's wheel.
"""

import gzip
import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import answers
import classify
import sandbox

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 0  # the one seed behind every split


def read_jsonl_gz(path):
    """The rows of a gzipped JSON Lines file. A damaged file is an error that names it (and the line)
    and says how to get a good copy: ARC is built here, the other data ships with the repository."""
    import zlib

    path = Path(path)
    if path.parent.name.startswith("arc_"):
        advice = "rebuild it with:  python build_arc.py"
    elif path.resolve().is_relative_to(DATA_DIR):
        advice = f"restore the shipped copy with:  git checkout -- {path.resolve().relative_to(DATA_DIR.parent)}"
    else:
        advice = "replace it with a good copy"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read to its end ({error}): the file is truncated or damaged; {advice}") from error
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # "\n" only, as iterating over the file splits
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}, column {error.colno}: not valid JSON ({error.msg}): the file is "
                             f"damaged; {advice}") from error
    return rows


def seeded_split(rows, sizes, seed=SEED):
    """Cut rows into consecutive parts of the given sizes after one seeded shuffle of their indices.
    Each part keeps the source order, so a split reads like the source file."""
    assert sum(sizes) == len(rows), (sizes, len(rows))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append([rows[i] for i in sorted(order[start:start + size])])
        start += size
    return parts


def prompt_tokens(tokenizer, task, examples) -> list[list[int]]:
    """Each example's prompt, in the model's own chat template, as token ids."""
    return [tokenizer.encode_chat(task.messages(e)) for e in examples]


def reference_tokens(tokenizer, task, examples) -> list[list[int]]:
    """Each example's reference reply, then EOS, as token ids (the supervised target; CEM's signal)."""
    return [tokenizer.encode(task.reference(e)) + tokenizer.eos_ids[:1] for e in examples]


# ------------------------------------------------------------------------------------------ the base task

class Task:
    """What every task has. Subclasses set name, category and splits and write _load, prompt and the
    scoring. The category is the skill an expert trained on the task has (saved in the expert file):
    pass 1 of adapt.py routes a prompt to the expert of the category it names."""
    name = ""
    category = ""
    splits = ()
    max_new_tokens = 256  # default reply budget: room for the expected answer, a cap on repetition loops

    def load(self, split):
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; valid splits: {', '.join(self.splits)}")
        return self._load(split)

    def question(self, example) -> str:
        """The problem as the user states it, without our answer-format instruction (what the
        classification prompt classifies)."""
        return example["question"]

    def prompt(self, example) -> str:
        raise NotImplementedError

    def messages(self, example):
        # one user turn; the model's chat template adds its own default system prompt, if it has one
        return [{"role": "user", "content": self.prompt(example)}]

    def extract(self, example, completion):
        raise NotImplementedError

    def reference(self, example) -> str:
        """A correct reply in the form the prompt asks for: the target of supervised (next-token) training."""
        raise NotImplementedError(f"{self.name} has no reference replies")

    def shuffle_options(self, example, rng: random.Random):
        """The example with its answer options in another order (multiple-choice tasks; others return it
        unchanged): training on shuffled options stops a position bias ("answer A") from being rewarded."""
        return example

    def score(self, example, completion) -> bool:
        return self.score_many([example], [completion])[0]

    def score_many(self, examples, completions):
        assert len(examples) == len(completions), (len(examples), len(completions))
        return [self._score(e, c) for e, c in zip(examples, completions)]

    def reward(self, correct: bool) -> float:
        return 1.0 if correct else -1.0  # the paper's unit reward


# ------------------------------------------------------------------------------------------ GSM8K

class GSM8K(Task):
    name = "gsm8k"
    category = "math"
    splits = ("train", "valid", "test")

    def _load(self, split):
        source = "test" if split == "test" else "train"
        rows = read_jsonl_gz(DATA_DIR / "gsm8k" / f"{source}.jsonl.gz")
        rows = [{"id": f"gsm8k/{source}/{i}", **row} for i, row in enumerate(rows)]
        if split == "test":
            return rows
        train, valid = seeded_split(rows, [3737, 3736])
        return train if split == "train" else valid

    def prompt(self, example):
        return (f"{example['question']}\n\nSolve the problem step by step. "
                f"End your reply with \"The answer is N.\" where N is the final number.")

    def gold(self, example):
        return answers.parse_number(example["answer"].split("#### ")[-1])

    def reference(self, example):
        # The worked solution without its calculator annotations, ending in the phrase the prompt asks for.
        work, final = example["answer"].split("#### ")
        return re.sub(r"<<[^>]*>>", "", work).strip() + f"\nThe answer is {final.strip()}."

    def extract(self, example, completion):
        value = answers.gsm8k_answer(completion)
        return None if value is None else answers.format_number(value)

    def _score(self, example, completion):
        value = answers.gsm8k_answer(completion)
        return value is not None and abs(value - self.gold(example)) <= Decimal("1e-6")


# ------------------------------------------------------------------------------------------ MATH

class MATH(Task):
    name = "math"
    category = "math"
    max_new_tokens = 512
    splits = ("test", "test500", "shots")

    def _load(self, split):
        full = read_jsonl_gz(DATA_DIR / "math" / "test.jsonl.gz")
        full = [{"id": f"math/test/{i}", **row, "answer": answers.last_boxed(row["solution"])} for i, row in enumerate(full)]
        if split == "test":
            return full
        subset = read_jsonl_gz(DATA_DIR / "math" / "test500.jsonl.gz")
        if split == "test500":  # same id as the row in test, so results can be joined
            return [{"id": f"math/test/{row['math_test_index']}", **row} for row in subset]
        in_subset = {row["math_test_index"] for row in subset}
        return [row for i, row in enumerate(full) if i not in in_subset]

    def question(self, example):
        return example["problem"]

    def prompt(self, example):
        return f"{example['problem']}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."

    def extract(self, example, completion):
        return answers.last_boxed(completion)

    def _score(self, example, completion):
        return answers.math_equal(answers.last_boxed(completion), example["answer"])

    def reference(self, example):
        return example["solution"]  # the worked solution, ending in its \boxed{} answer


# ------------------------------------------------------------------------------------------ ARC

class ARC(Task):
    """ARC-Easy and ARC-Challenge share everything but their name and splits."""
    category = "reasoning"
    max_new_tokens = 64  # the prompt asks for the letter

    def _load(self, split):
        source = "validation" if split in ("train", "valid") else split
        path = DATA_DIR / self.name / f"{source}.jsonl.gz"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing. ARC is not shipped with the repository (AI2's terms are unclear about "
                f"redistribution); build it once from AI2's PyPI wheel with:  python build_arc.py")
        rows = read_jsonl_gz(path)
        if split in ("train", "valid"):
            train, valid = seeded_split(rows, [285, 285])
            return train if split == "train" else valid
        return rows

    def question(self, example):
        choices = example["choices"]
        lines = [f"{label}. {text}" for label, text in zip(choices["label"], choices["text"])]
        return example["question"] + "\n" + "\n".join(lines)

    def prompt(self, example):
        return f"{self.question(example)}\n\nAnswer with the letter of the correct choice."

    def extract(self, example, completion):
        return answers.arc_letter(completion, example["choices"]["label"])

    def reference(self, example):
        choices = example["choices"]
        return f"{example['answerKey']}. {choices['text'][choices['label'].index(example['answerKey'])]}"

    def _score(self, example, completion):
        return answers.arc_letter(completion, example["choices"]["label"]) == example["answerKey"]

    def shuffle_options(self, example, rng):
        """The option texts in a random order under the same letters; the answer key follows its text."""
        labels, texts = example["choices"]["label"], example["choices"]["text"]
        order = list(range(len(texts)))
        rng.shuffle(order)
        answer = labels.index(example["answerKey"])
        return {**example, "choices": {"text": [texts[i] for i in order], "label": list(labels)},
                "answerKey": labels[order.index(answer)]}


class ARCEasy(ARC):
    name = "arc_easy"
    splits = ("train", "valid", "test")


class ARCChallenge(ARC):
    name = "arc_challenge"
    splits = ("validation", "test")


# ------------------------------------------------------------------------------------------ code: MBPP, HumanEval

class CodeTask(Task):
    """Scored by running the tests against the solution with judge.py (through sandbox.py): the tests
    run in a process of their own, so a solution that exits early, hooks exceptions, traces the
    test code or returns an object equal to everything does not pass (judge.py's docstring)."""
    category = "code"
    timeout = 10.0  # seconds per generated program
    max_new_tokens = 384

    def extract(self, example, completion):
        return answers.solution_code(completion)

    def tests(self, example, completion):
        """The sandbox.Tests that decide this reply."""
        raise NotImplementedError

    @staticmethod
    def future_first(source: str) -> str:
        """`source` with its `from __future__` imports moved to the top, where Python requires them
        (the solution is put together from several pieces)."""
        future = re.compile(r"^from __future__ import .*\n", re.MULTILINE)
        return "".join(future.findall(source)) + future.sub("", source)

    def execute(self, examples, completions, progress=False):
        """Run every reply's tests in the sandbox; returns sandbox.Outcome (passed, status, detail) per
        example. Raises sandbox.SandboxError where the sandbox could not run a reply at all: that is
        no verdict on the reply, and scoring it as wrong would give training a reward of -1 for
        every reply, right or wrong."""
        assert len(examples) == len(completions), (len(examples), len(completions))
        jobs = [self.tests(e, c) for e, c in zip(examples, completions)]
        outcomes = sandbox.run_many(jobs, timeout=self.timeout, progress=progress)
        broken = [outcome for outcome in outcomes if outcome.status == "error"]
        if broken:
            raise sandbox.SandboxError(
                f"the sandbox could not run {len(broken)} of {len(outcomes)} replies, so they were not "
                f"scored; the first said: {broken[0].detail.strip()[-500:]}")
        return outcomes

    def score_many(self, examples, completions, progress=False):
        return [outcome.passed for outcome in self.execute(examples, completions, progress)]


class MBPP(CodeTask):
    name = "mbpp"
    splits = ("train", "valid", "test")

    def _load(self, split):
        rows, seen = [], set()
        for row in read_jsonl_gz(DATA_DIR / "mbpp" / "test.jsonl.gz"):
            if row["text"] not in seen:  # task 347 repeats task 76 word for word: one split must not hold the other's twin
                seen.add(row["text"])
                rows.append({"id": f"mbpp/{row['task_id']}", **row})
        train, valid, test = seeded_split(rows, [150, 150, 199])
        return {"train": train, "valid": valid, "test": test}[split]

    def question(self, example):
        # the first assert shows the function's name and signature (standard MBPP prompting)
        return f"{example['text']}\nYour code should pass this test:\n{example['test_list'][0]}"

    def prompt(self, example):
        return f"{self.question(example)}\n\nWrite the Python function in a ```python code block."

    def tests(self, example, completion):
        # The setup code builds the tests' inputs, with a class the solution defines (task 367), so it
        # runs after the solution, in its process. The function the tests call may have a builtin's
        # name (task 126 is `sum`): the reference code's top-level names are the solution's.
        code = answers.solution_code(completion) or ""
        names = re.findall(r"^(?:def|class)\s+(\w+)", example["code"], re.MULTILINE)
        return sandbox.Tests(solution=self.future_first(f"{code}\n{example['test_setup_code']}\n"),
                             tests="\n".join(example["test_list"]) + "\n", solution_names=tuple(names))

    def reference(self, example):
        return "```python\n" + example["code"].replace("\r\n", "\n").strip() + "\n```"


class HumanEval(CodeTask):
    name = "humaneval"
    splits = ("test",)

    def _load(self, split):
        return [{"id": row["task_id"], **row} for row in read_jsonl_gz(DATA_DIR / "humaneval" / "test.jsonl.gz")]

    def question(self, example):
        return example["prompt"]

    def prompt(self, example):
        return ("Complete the following Python function.\n\n"
                f"```python\n{example['prompt'].rstrip()}\n```\n\n"
                "Write the complete function in a ```python code block.")

    def reference(self, example):
        # The prompt's signature and docstring with the canonical body: the complete function it asks for.
        return "```python\n" + (example["prompt"] + example["canonical_solution"]).strip() + "\n```"

    def tests(self, example, completion):
        code = answers.solution_code(completion) or ""
        entry_point = example["entry_point"]
        # What the prompt defines before the entry point (imports, helper functions such as
        # HumanEval/32's `poly`, which its test calls) is trusted: the judge runs its own copy, so a
        # solution that redefines a helper changes only its own.
        head = example["prompt"][:example["prompt"].index(f"def {entry_point}")]
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
            solution = head + code  # a whole function
        else:
            solution = example["prompt"] + code  # a body continuing the prompt
        return sandbox.Tests(solution=self.future_first(solution + "\n"), prelude=head,
                             tests=f"{example['test']}\n\ncheck({entry_point})\n", solution_names=(entry_point,))


# ------------------------------------------------------------------------------------------ classification (z^c)

@dataclass
class Classification(Task):
    """Task-label classification, the classification expert's training task: which of the training
    tasks a question comes from, named by the task's category. Examples: {"id", "question", "label", "source"}."""
    max_new_tokens = 32  # a label, boxed
    strict: bool = False  # True: the paper's rule, the label must be boxed
    name = "cls"
    category = "classifier"  # the expert of pass 1's cls mode, never a category pass 1 routes to
    splits = ("train", "valid", "test")
    sources = ("gsm8k", "mbpp", "arc_easy")  # one training task per category
    per_source = {"train": 150, "valid": 150, "test": 199}

    @property
    def categories(self):
        return tuple(sorted(TASKS[source].category for source in self.sources))  # class attributes: no task built

    def _load(self, split):
        rows = []
        for source in self.sources:
            task = get(source)
            examples = task.load(split)
            n = self.per_source[split]
            for example in seeded_split(examples, [n, len(examples) - n])[0]:
                rows.append({"id": example["id"], "question": task.question(example), "label": task.category,
                             "source": source})
        random.Random(SEED).shuffle(rows)  # mix the sources
        return rows

    def messages(self, example):
        return classify.classification_messages(example["question"], self.categories)

    def extract(self, example, completion):
        return classify.parse_category(completion, self.strict, self.categories)

    def reference(self, example):
        return f"Classification: `\\boxed{{{example['label']}}}`"  # the format the paper's prompt asks for

    def _score(self, example, completion):
        return classify.parse_category(completion, self.strict, self.categories) == example["label"]


# ------------------------------------------------------------------------------------------ lookup

TASKS = {
    "gsm8k": GSM8K,
    "math": MATH,
    "mbpp": MBPP,
    "humaneval": HumanEval,
    "arc_easy": ARCEasy,
    "arc_challenge": ARCChallenge,
    "cls": Classification,
}


def get(name, **options):
    """The task called name; options go to its constructor (e.g. get("cls", strict=True))."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name](**options)
