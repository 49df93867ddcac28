"""train.py on the synthetic task of test_reinforce.py, for the data-parallel test: run directly
(one process) or under torchrun.   python tests/train_worker.py MODEL_DIR [train.py flags]"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import model as m  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from test_reinforce import EvenFirstToken  # noqa: E402

if __name__ == "__main__":
    model_dir, *argv = sys.argv[1:]
    _, tokenizer = m.load(model_dir, device="cpu")
    tasks.get = lambda name, **kw: EvenFirstToken(tokenizer)
    train.main(["--task", "cls", "--model", model_dir, *argv])
