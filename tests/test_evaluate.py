import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import generate as gen
import model as m
from conftest import ROOT


def test_wilson_interval_hand_computed():
    low, high = evaluate.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = evaluate.wilson_interval(0, 60)
    assert low == 0.0 and high == pytest.approx(3.8416 / 63.8416, abs=1e-6)  # z^2 / (n + z^2)


class EchoTask:
    """A task whose correct answer is, by construction, what the model replies to that prompt alone."""
    name = "echo"
    max_new_tokens = 6

    def __init__(self, expected):
        self.expected = expected

    def messages(self, example):
        return [{"role": "user", "content": example["question"]}]

    def extract(self, example, completion):
        return completion

    def score_many(self, examples, completions):
        return [c == self.expected[e["id"]] for e, c in zip(examples, completions)]


def test_batched_evaluation_keeps_prompt_order(tiny_llama):
    """Rows are refilled as replies end; every reply must come back to its own example."""
    model, tokenizer = m.load(tiny_llama, device="cpu")
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    questions = ["w5 w6 w7 w8 w9 w10 w11", "w3", "w20 w21 w22", "w40 w41 w42 w43 w44", "w90 w91"]
    examples = [{"id": i, "question": q} for i, q in enumerate(questions)]
    expected = {i: gen.generate(model, tokenizer, [tokenizer.encode(q)], max_new_tokens=6).texts[0]
                for i, q in enumerate(questions)}
    expected[3] = "a reply the model does not give"
    result = evaluate.evaluate(model, tokenizer, EchoTask(expected), examples, batch_size=2, progress=False)
    assert [r["correct"] for r in result["records"]] == [True, True, True, False, True]
    assert result["correct"] == 4 and result["n"] == 5 and result["accuracy"] == 0.8
    assert [r["id"] for r in result["records"]] == [0, 1, 2, 3, 4]


def test_command_line_end_to_end(tmp_path):
    """The real default model on two GSM8K test questions: the records file is written and consistent."""
    out = tmp_path / "eval.jsonl"
    run = subprocess.run(
        [sys.executable, "evaluate.py", "--task", "gsm8k", "--limit", "2", "--max-new-tokens", "16",
         "--out", str(out), "--threads", str(min(2, os.cpu_count()))],  # --threads takes at most the CPUs
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(set(r) >= {"id", "prompt", "completion", "extracted", "correct"} for r in records)
    assert "accuracy" in run.stdout and "n=2" in run.stdout


def test_default_out_never_replaces_an_earlier_run(tmp_path, monkeypatch):
    import argparse
    monkeypatch.chdir(tmp_path)
    base = argparse.Namespace(task="gsm8k", split="test", expert=None, lora=None)
    with_expert = argparse.Namespace(task="gsm8k", split="test", expert="experts/math.safetensors", lora=None)
    assert evaluate.default_out(base) == Path("runs/eval-gsm8k-test.jsonl")
    # a base run, then the same task with an expert: two files
    assert evaluate.default_out(with_expert) == Path("runs/eval-gsm8k-test-experts-math.jsonl")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/eval-gsm8k-test.jsonl").write_text("earlier run\n")
    assert evaluate.default_out(base) == Path("runs/eval-gsm8k-test-2.jsonl")
    (tmp_path / "runs/eval-gsm8k-test-2.jsonl").write_text("earlier run\n")
    assert evaluate.default_out(base) == Path("runs/eval-gsm8k-test-3.jsonl")


def test_paired_difference_against_hand_counts_and_the_normal_approximation():
    """20 gained, 5 lost, 375 unchanged of 400: difference 15/400; the bootstrap interval agrees with the
    normal approximation mean ± 1.96·sd/√n of the per-example differences (a large-n reference)."""
    import math

    before = [False] * 20 + [True] * 5 + [True] * 100 + [False] * 275
    after = [True] * 20 + [False] * 5 + [True] * 100 + [False] * 275
    result = evaluate.paired_difference(before, after)
    assert (result["n"], result["gained"], result["lost"]) == (400, 20, 5)
    assert result["difference"] == pytest.approx(15 / 400)
    d = [a - b for a, b in zip(after, before)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    low, high = mean - 1.96 * sd / math.sqrt(len(d)), mean + 1.96 * sd / math.sqrt(len(d))
    assert result["interval"][0] == pytest.approx(low, abs=0.005) and result["interval"][1] == pytest.approx(high, abs=0.005)
    assert evaluate.paired_difference([True, False], [True, False])["interval"] == (0.0, 0.0)
    with pytest.raises(ValueError, match="same examples"):
        evaluate.paired_difference([True], [True, False])
