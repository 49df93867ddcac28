"""The default model's greedy replies (fp32, 48 tokens) to the first two test prompts of every task,
recorded before the code was reorganised into its present files (tests/data/golden_replies.json).
They check that reorganising changed nothing a user sees: the prompts (task formatting and the chat
template) and the replies (the network, loading and generation).

A different CPU can add up fp32 sums in another order; where a reply departs from the recorded one,
the test accepts it only if the two tokens were a near-tie (logits within 1e-3) at that position.

    python tests/test_golden_replies.py      # rewrite the file from the current code
"""

import json
import sys
from pathlib import Path

import pytest
import torch

import generate as gen
import model as m
import tasks

GOLDEN = Path(__file__).parent / "data" / "golden_replies.json"
SPLITS = {"gsm8k": "test", "math": "test500", "mbpp": "test", "humaneval": "test", "arc_easy": "test",
          "arc_challenge": "test", "cls": "test"}


def prompts(tokenizer):
    rows = []
    for name, split in SPLITS.items():
        task = tasks.get(name)
        for index, example in enumerate(task.load(split)[:2]):
            rows.append(dict(task=name, split=split, index=index,
                             prompt_tokens=tokenizer.encode_chat(task.messages(example))))
    return rows


def replies(model, tokenizer, rows):
    return gen.generate(model, tokenizer, [r["prompt_tokens"] for r in rows], max_new_tokens=48, batch_size=16)


@pytest.fixture(scope="module")
def fp32_default_model():
    return m.load(dtype=torch.float32, device="cpu")


def test_prompts_and_greedy_replies_are_the_recorded_ones(fp32_default_model):
    model, tokenizer = fp32_default_model
    golden = json.loads(GOLDEN.read_text())
    rows = prompts(tokenizer)
    assert [(r["task"], r["index"]) for r in rows] == [(g["task"], g["index"]) for g in golden]
    for row, recorded in zip(rows, golden):
        assert row["prompt_tokens"] == recorded["prompt_tokens"], f"{row['task']} {row['index']}: prompt changed"
    out = replies(model, tokenizer, rows)
    for recorded, tokens in zip(golden, out.tokens):
        expected = recorded["reply_tokens"]
        if tokens == expected:
            continue
        at = next(i for i, (a, b) in enumerate(zip(tokens + [None], expected + [None])) if a != b)
        assert at < min(len(tokens), len(expected)), f"{recorded['task']}: reply length changed"
        with torch.no_grad():
            logits = model(torch.tensor([recorded["prompt_tokens"] + expected[:at]]), last_only=True)[0, -1]
        gap = (logits[tokens[at]] - logits[expected[at]]).abs().item()
        assert gap < 1e-3, f"{recorded['task']} {recorded['index']}: token {at} changed, logit gap {gap:.2e}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    model, tokenizer = m.load(dtype=torch.float32, device="cpu")
    rows = prompts(tokenizer)
    for row, tokens, text in zip(rows, (out := replies(model, tokenizer, rows)).tokens, out.texts):
        row.update(reply_tokens=tokens, reply=text)
    GOLDEN.write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} replies to {GOLDEN}", file=sys.stderr)
