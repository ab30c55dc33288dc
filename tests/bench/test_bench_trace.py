"""The reference check on the shared Mooncake trace (the issue's acceptance numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.bench.engine import EngineOptions, EngineSim, KVTierOffload
from kvtier.bench.reference import reference_lru
from kvtier.bench.workload import load_trace
from kvtier.cli import main

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
CPU_BLOCKS = 4392  # 10% of the trace's 43,924 distinct blocks
BB = 4096


@pytest.fixture(scope="module")
def trace_path() -> Path:
    if not TRACE.is_file():
        pytest.fail(
            f"the Mooncake trace is missing: expected {TRACE} "
            "(../shared/traces/ beside the repository root)"
        )
    return TRACE


def test_trace_shape(trace_path: Path) -> None:
    wl = load_trace(trace_path, block_tokens=512)
    assert len(wl.requests) == 3993
    assert wl.block_refs == 121_877
    assert wl.distinct_blocks == 43_924


def test_reference_replay_in_one_run(trace_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    rc = main(["bench", "--quiet", "--trace", str(trace_path), "--no-prefix-cache",
               "--cpu-blocks", str(CPU_BLOCKS), "--bytes-per-block", str(BB), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    runs = {r["name"]: r for r in report["runs"]}
    tiered = [n for n in runs if n.startswith("cpu+")]
    assert {"no-offload", "cpu", "reference-lru"} <= set(runs) and tiered
    for r in report["runs"]:
        assert r["wrong_blocks"] == 0, r["name"]
        assert r["requests"] == 3993
    assert runs["no-offload"]["block_hit_rate"] == 0.0
    cpu = runs["cpu"]
    assert abs(cpu["block_hit_rate"] - 0.260) <= 0.01
    # The engine replay reproduces the model exactly: same hits, block for block.
    assert cpu["hit_blocks"] == runs["reference-lru"]["hit_blocks"]
    assert cpu["loaded_blocks"] == cpu["hit_blocks"]
    # A second tier that holds the whole trace approaches the infinite-cache bound (0.640).
    t = runs[tiered[0]]
    assert cpu["block_hit_rate"] < t["block_hit_rate"] <= 0.640 + 1e-9
    assert t["loaded_blocks"] == t["hit_blocks"]


def test_full_blocks_only(trace_path: Path) -> None:
    wl = load_trace(trace_path, block_tokens=512)
    off = KVTierOffload({"cpu_bytes_to_use": CPU_BLOCKS * BB})
    opts = EngineOptions(bytes_per_block=BB, prefix_cache=False, full_blocks_only=True)
    c = EngineSim(wl, off, opts).run()
    rate = (c.engine_hit_blocks + sum(c.tier_hit_blocks.values())) / c.block_refs
    assert abs(rate - 0.27) <= 0.01
    ref = reference_lru(wl, CPU_BLOCKS, full_blocks_only=True)
    assert sum(c.tier_hit_blocks.values()) == ref["block_hits"]
    assert c.wrong_blocks == 0
