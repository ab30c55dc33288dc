#!/usr/bin/env bash
# Cache efficiency on the shared Mooncake trace: write policies and admission (CPU 5% + storage
# 25%, full blocks only), and CPU-only eviction policies by capacity. Writes JSON reports and
# plots into ${OUT:-docs/results/efficiency}. Run from the repository root with the venv active.
set -euo pipefail
T=${TRACE:-../shared/traces/mooncake_synthetic_trace.jsonl}
OUT=${OUT:-docs/results/efficiency}
mkdir -p "$OUT"
common=(--trace "$T" --no-prefix-cache --full-blocks-only --quiet)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for adm in all reuse; do
  kvtier bench "${common[@]}" --cpu-fraction 0.05 --sweep 0.05 --tier-fraction 0.25 \
    --sweep-write-policy through,back --no-baselines --no-reference \
    --config "{\"secondary_tiers\": [{\"type\": \"storage\", \"path\": \"$tmp\", \"admission_policy\": \"$adm\"}]}" \
    --json "$OUT/tiers-$adm.json" --plot "$OUT/tiers-$adm.png"
done
for p in lru arc chain; do
  kvtier bench "${common[@]}" --cpu-fraction 0.1 --sweep 0.01,0.05,0.1,0.25 \
    --no-baselines --no-reference --config "{\"eviction_policy\": \"$p\", \"secondary_tiers\": []}" \
    --json "$OUT/cpu-$p.json" --plot "$OUT/cpu-$p.png"
done
