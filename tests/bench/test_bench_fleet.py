"""``kvtier bench --engines N``: a workload split across engines that share a storage directory."""

from __future__ import annotations

import json

from kvtier.bench.engine import EngineOptions
from kvtier.bench.fleet import split
from kvtier.bench.runner import BenchRunner, Plan
from kvtier.bench.workload import SyntheticParams, synthetic_workload
from kvtier.cli import main

BB = 4096


def test_split_deals_requests_round_robin_in_arrival_order() -> None:
    wl = synthetic_workload(SyntheticParams(seed=1, sessions=20))
    parts = split(wl, 3)
    assert [len(p.requests) for p in parts] == [len(wl.requests[i::3]) for i in range(3)]
    for p in parts:
        times = [r.arrival_s for r in p.requests]
        assert times == sorted(times)
    ids = sorted(r.req_id for p in parts for r in p.requests)
    assert ids == sorted(r.req_id for r in wl.requests)


def test_engines_sharing_storage_find_each_others_blocks(tmp_path) -> None:
    wl = synthetic_workload(SyntheticParams(seed=5, sessions=24))
    biggest = max(len(r.hash_ids) for r in wl.requests)
    plan = Plan(
        engine=EngineOptions(bytes_per_block=BB, gpu_blocks=biggest + 4),
        config={"secondary_tiers": [{"type": "storage", "path": str(tmp_path / "kv")}]},
        cpu_blocks=max(8, wl.distinct_blocks // 10), tier_blocks=wl.distinct_blocks,
        baselines=False, reference=False, engines=3, sync_seconds=0.5,
    )
    report = BenchRunner(wl, plan).run()
    runs = {r["name"]: r for r in report["runs"]}
    one, shared, private = (runs["cpu+storage"], runs["cpu+storage x3 shared"],
                            runs["cpu+storage x3 private"])
    for r in (one, shared, private):
        assert r["wrong_blocks"] == 0
        assert r["requests"] == len(wl.requests)
    assert shared["engines"] == 3 and shared["storage_shared"] and not private["storage_shared"]
    assert len(shared["per_engine_block_hit_rate"]) == 3
    assert shared["cpu_blocks"] <= one["cpu_blocks"]  # the same CPU memory in all
    # the engines loaded blocks other engines stored, so sharing beats a directory each
    engines = shared["manager_stats"]["engines"]
    assert sum(e["tiers"]["storage0"]["remote_hits"] for e in engines) > 0
    assert shared["tiers"]["STORAGE"]["hit_blocks"] > private["tiers"]["STORAGE"]["hit_blocks"]
    assert shared["block_hit_rate"] > private["block_hit_rate"]


def test_cli_engines_flag(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "--limit", "150", "--engines", "2", "--no-reference", "--quiet",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["runs"]]
    assert "cpu+storage x2 shared" in names and "cpu+storage x2 private" in names
    assert "one engine with the same total CPU memory" in capsys.readouterr().out
    assert main(["bench", "--limit", "20", "--engines", "2", "--config",
                 '{"secondary_tiers": []}', "--quiet"]) == 2
    assert "--engines needs a storage tier" in capsys.readouterr().err
