#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Needs redis-server and redis-cli on PATH
# for the network tier's tests (they start their own servers on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
for tool in redis-server redis-cli; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "kvtier tests: $tool not found; trying to install it (apt-get install redis-server)" >&2
    if command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 || true
    fi
    command -v "$tool" >/dev/null 2>&1 || { echo "kvtier tests: $tool is required" >&2; exit 1; }
  fi
done
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "kvtier tests: no tests were collected" >&2
  exit 1
fi
exit "$rc"
