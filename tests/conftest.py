import os
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))
# model.load picks fp32 or bf16 on a CPU by timing both; the tests' expected values are fp32 on every CPU.
os.environ.setdefault("T2_DTYPE", "fp32")


def evaluate_main_inputs(monkeypatch, argv: list[str]) -> tuple:
    """Run evaluate.py's main with these arguments, stop it where it would evaluate, and return what it
    would evaluate with: (model, tokenizer, task), the model with its expert or LoRA applied."""
    import evaluate

    class Evaluated(Exception):
        pass

    def fake_evaluate(model, tokenizer, task, *args, **kwargs):
        raise Evaluated(model, tokenizer, task)

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv])
    with pytest.raises(Evaluated) as stopped:
        evaluate.main()
    return stopped.value.args


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_model("llama", folder)
    return folder


@pytest.fixture(scope="session")
def sharp_tiny_llama(tmp_path_factory):
    """A tiny Llama with larger weights. At transformers' init (std 0.02) a tiny network's output is
    nearly uniform whatever its adapters do; with these, training has outputs it can actually move."""
    folder = tmp_path_factory.mktemp("sharp_tiny_llama")
    model = tiny_hf_model("llama", folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(20 if name == "lm_head.weight" else 20 ** 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
