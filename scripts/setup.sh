#!/usr/bin/env bash
# Create .venv and install kvtier with everything its tests and benchmarks use.
# torch: the CPU build 2.13.0 is installed first, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[test,dev,plot]"
# vLLM for the integration tests: the package alone, plus the light modules it imports.
python -m pip install -q --no-deps "vllm==0.33.0"
if grep -qv '^\s*#' requirements/vllm-test.txt 2>/dev/null; then
  python -m pip install -q --no-deps -r requirements/vllm-test.txt
fi
echo "kvtier: environment ready in .venv"
