"""Bad input stops with a clear error that names what is wrong, never a silent wrong run: command-line
values out of range, adapter files holding NaN or inf, and damaged model and data files."""

import sys

import pytest

import adapt
import evaluate
import model as m


# ----------------------------------------------------------------------------------------------
# Command lines: argparse refuses a value out of range (exit status 2, the flag named) before any model loads


class ModelLoaded(Exception):
    pass


def run_main(monkeypatch, script, argv):
    """Run script.main() with these arguments; a model load stops it with ModelLoaded."""
    def no_load(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(m, "load", no_load)
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    script.main()


EVALUATE = ["--task", "gsm8k", "--threads", "1"]
ADAPT = ["--mode", "none", "--task", "gsm8k", "--threads", "1"]
MODEL = ["--threads", "1"]

BAD_COMMAND_LINES = [
    (evaluate, EVALUATE, "--limit", "-1"),
    (evaluate, EVALUATE, "--limit", "0"),
    (evaluate, EVALUATE, "--batch-size", "0"),
    (evaluate, EVALUATE, "--max-new-tokens", "0"),
    (evaluate, EVALUATE, "--max-new-tokens", "-5"),
    (evaluate, EVALUATE, "--threads", "0"),
    (adapt, ADAPT, "--limit", "-1"),
    (adapt, ADAPT, "--shots", "-3"),
    (adapt, ADAPT, "--shots", "0"),
    (adapt, ADAPT, "--batch-size", "0"),
    (adapt, ADAPT, "--threads", "0"),
    (m, MODEL, "--max-new-tokens", "0"),
    (m, MODEL, "--temperature", "-0.5"),
    (m, MODEL, "--temperature", "nan"),
    (m, MODEL, "--temperature", "inf"),
    (m, MODEL, "--top-p", "0"),
    (m, MODEL, "--top-p", "1.5"),
    (m, MODEL, "--top-p", "nan"),
    (m, MODEL, "--threads", "0"),
    (m, MODEL, "--threads", "-2"),
]


@pytest.mark.parametrize("script, base, flag, value", BAD_COMMAND_LINES,
                         ids=[f"{s.__name__}{flag}={v}" for s, _, flag, v in BAD_COMMAND_LINES])
def test_out_of_range_flag_is_an_argparse_error(monkeypatch, capsys, script, base, flag, value):
    with pytest.raises(SystemExit) as stopped:
        run_main(monkeypatch, script, [*base, flag, value])
    assert stopped.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    (evaluate, [*EVALUATE, "--limit", "1", "--batch-size", "1", "--max-new-tokens", "1"]),
    (adapt, [*ADAPT, "--limit", "1", "--shots", "1", "--batch-size", "1"]),
    (m, [*MODEL, "--max-new-tokens", "1", "--temperature", "0", "--top-p", "1"]),
    (m, [*MODEL, "--temperature", "0.7", "--top-p", "0.01"]),
], ids=["evaluate", "adapt", "model-greedy", "model-sampling"])
def test_smallest_allowed_values_reach_the_model(monkeypatch, script, argv):
    with pytest.raises(ModelLoaded):
        run_main(monkeypatch, script, argv)
