#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: `kvtier bench` on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec kvtier bench "$@"
