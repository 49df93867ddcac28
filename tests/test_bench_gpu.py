"""bench/gpu.py, the script a lent GPU runs, kept working on the CPU: every part but the compiled SVF
step on tiny shapes, and its correctness checks (static decode and overlap against eager) must pass."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_runs_on_tiny_shapes_on_the_cpu():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--shapes", "tiny",
                          "--quick", "--parts", "check", "attention", "decode", "rl"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    checks = [line for line in lines if line.startswith("check: ") and "==" in line]
    assert len(checks) == 4, out.stdout  # batched; eager with overlap; static without and with overlap
    assert all(": True" in line for line in checks), out.stdout
    parity = next(line for line in lines if "logits vs transformers" in line)
    assert float(parity.rsplit(" ", 1)[1]) < 1e-5, parity
    for expected in ("decode, model.decode_attention, batch 32", "ours           eager", "ours          static", "transformers eager sdpa", "| ours static |",
                     "rollouts:", "update:", "one RL step:"):
        assert any(expected in line for line in lines), (expected, out.stdout)
