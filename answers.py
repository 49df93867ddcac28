"""Reading the answer out of a model's reply, for every task's exact scoring.

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
               question's labels, no letter, or a hedge (the letter joined to another label: "B or C",
               "\\boxed{B,C}") -> None (wrong). Capital letters only. (A first line that is only the
               letter, "B\\n...", counts as opening with it.)
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
"""

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction


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


# ---- GSM8K

GSM8K_MARKER = re.compile(r"\banswer\s*(?:is\b|:|=)|####", re.IGNORECASE)


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


# ---- MATH

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


# ---- ARC

ARC_LETTER = r"\(?\s*([A-Z])\s*\)?(?![A-Za-z])"  # B, (B), ( B ); not the A of "Apple"
ARC_BOXED = re.compile(r"\s*(?:\\text\{\s*)?" + ARC_LETTER)
ARC_PHRASE = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*\**\s*(?:(?i:option|choice)\s*)?" + ARC_LETTER)
ARC_ONLY_LETTER = re.compile(r"[\W_]*([A-Z])[\W_]*")
ARC_OPENING_LETTER = re.compile(r"[\s*(]*([A-Z])(?:\s*[.):]|\**[ \t]*\n)")  # "B. tv", "B)", "B\n..."
# Right after the chosen letter, another letter joined to it: "A or B", "A, B, C or D", "(A) and (B)".
ARC_HEDGE = re.compile(r"\s*\)?\s*(?:,|/|&|\b(?i:or|and)\b)\s*\(?\s*([A-Z])\s*\)?(?![A-Za-z])")


def arc_letter(completion, labels):
    """The label the reply chooses, or None. The first of these that names a letter decides:
    the last \\boxed{X}; the last "answer is (X)" / "Answer: X"; a reply that is only the letter;
    a reply opening with "X." / "X)" / "X:" or with a line that is only X. A letter that is not one of
    the labels -> None, and so is a hedge, the letter joined to another label ("A or B", "\\boxed{A,B}"):
    naming two options is not choosing one."""
    text = completion.strip()
    boxed = last_boxed(text)
    phrases = list(ARC_PHRASE.finditer(text))
    for match in (ARC_BOXED.match(boxed) if boxed is not None else None,
                  phrases[-1] if phrases else None,
                  ARC_ONLY_LETTER.fullmatch(text),
                  ARC_OPENING_LETTER.match(text)):
        if match is not None:
            hedge = ARC_HEDGE.match(match.string, match.end(1))
            if match.group(1) not in labels or (hedge is not None and hedge.group(1) in labels):
                return None
            return match.group(1)
    return None
