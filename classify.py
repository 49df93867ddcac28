"""Pass 1's question to the model (paper §3.2 A, Figure 3): which category a prompt belongs to, asked
over the categories of the experts at hand, and the category read back out of the reply. The
classification expert is trained on the same prompt (tasks.Classification)."""

import re

from answers import last_boxed

CATEGORIES = ("code", "math", "reasoning")  # the paper's; pass 1 takes those of the experts it has

# Figure 3 of the paper (arXiv 2501.06252, §3.2 A); the guideline sentences that the figure cuts off with
# "..." are completed from the reference code (SakanaAI/self-adaptive-llms, the classification prompt in
# its cls task and prompt-based evaluation), which words the fourth class 'other'; we keep the paper's 'others'.
GUIDELINES = {
    "code": "Questions asking for programming solutions, functions, algorithms. Often includes specific "
            "programming terms, language syntax, or data structures.",
    "math": "Questions involving mathematical calculations, formulas, statistics. Often includes numbers, "
            "equations, or mathematical operations.",
    "reasoning": "Questions requiring logical thinking, application of scientific knowledge, or critical analysis "
                 "of information. Often presents statements that need evaluation based on general understanding.",
    "others": "Questions not clearly fit into above categories.",
}
COUNT = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def classification_prompt(categories=CATEGORIES) -> str:
    """Figure 3's prompt over the given categories and 'others' (with the paper's three it is the figure's
    text). A category the paper does not describe gets a plain sentence naming it."""
    labels = [*sorted(categories), "others"]
    listed = ", ".join(f"'{c}'" for c in labels[:-1]) + f", or '{labels[-1]}'"
    guidelines = "\n".join(f"{i}. {c.capitalize()}: {GUIDELINES.get(c, f'Questions about {c}.')}"
                           for i, c in enumerate(labels, 1))
    return f"""\
Analyze the given question and classify it into one of {COUNT.get(len(labels), len(labels))} categories: {listed}. Follow these guidelines:

{guidelines}

Instructions:

- Consider the primary focus, skills, and knowledge required to answer the question.
- If a question spans multiple categories, choose the most dominant one.
- Provide your final classification within `\\boxed{{}}` notation. Example: `\\boxed{{{labels[-2]}}}`

Format your response as follows:
Classification: `\\boxed{{category}}`"""


def classification_messages(question, categories=CATEGORIES):
    """The paper's classification prompt followed by the question, in one user turn. Used by the
    classification expert (task cls) and the prompt strategy. The reference code puts the prompt in
    the system turn instead; the default small model then answers the question rather than
    classifying it (first 30 cls valid questions, 24 new tokens: 1 of 30 replies names a label, 1
    correct) while in one user turn 17 of 30 name a label (4 correct)."""
    return [{"role": "user", "content": f"{classification_prompt(categories)}\n\nQuestion: {question}"}]


def parse_category(text, strict=True, categories=CATEGORIES):
    """The category a classification reply names: one of categories, 'others', or None. Read from the
    last \\boxed{...}, ignoring backticks, spaces, \\text{} and case ("other" counts as "others").
    strict=False falls back to the first label word in the reply when there is no boxed label."""
    labels = (*categories, "others")
    boxed = last_boxed(text)
    if boxed is not None:
        word = re.sub(r"[`\s*'\".{}]|\\text(?:bf|tt)?", "", boxed).lower()
        word = "others" if word == "other" else word
        if word in labels:
            return word
    if strict:
        return None
    words = "|".join(re.escape(c) for c in sorted(categories, key=len, reverse=True))
    m = re.search(rf"\b({words}|others?)\b", text, re.IGNORECASE)
    if m is None:
        return None
    word = m.group(1).lower()
    return "others" if word == "other" else word
