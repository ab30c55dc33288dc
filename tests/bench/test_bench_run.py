"""End-to-end replays through the real manager, worker and tiers."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from kvtier.bench.engine import EngineOptions, EngineSim
from kvtier.bench.offload import KVTierOffload
from kvtier.bench.runner import SCHEMA, BenchRunner, Plan, default_secondary_tier
from kvtier.bench.workload import SyntheticParams, synthetic_workload
from kvtier.cli import main
from kvtier.types import LoadStoreSpec, ReqContext

BB = 4096


def _tier_config(tmp_path) -> dict:
    ttype = default_secondary_tier()
    tier = {"type": ttype}
    if ttype == "storage":
        tier["path"] = str(tmp_path / "tier")
    return {"secondary_tiers": [tier]}


def test_short_run_reports_every_configuration(tmp_path) -> None:
    wl = synthetic_workload(SyntheticParams(seed=3, sessions=30))
    cpu_blocks = max(8, wl.distinct_blocks // 10)
    biggest = max(len(r.hash_ids) for r in wl.requests)
    plan = Plan(
        engine=EngineOptions(bytes_per_block=BB, gpu_blocks=biggest + 4),
        config=_tier_config(tmp_path),
        cpu_blocks=cpu_blocks, tier_blocks=wl.distinct_blocks,
    )
    report = BenchRunner(wl, plan).run()
    assert report["schema"] == SCHEMA
    for key in ("kvtier_version", "machine", "workload", "engine", "runs", "sweep", "wall_s"):
        assert key in report
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"no-offload", "cpu", f"cpu+{default_secondary_tier()}", "reference-lru"}
    for r in report["runs"]:
        for key in ("block_hit_rate", "token_hit_rate", "prefill_tokens_saved", "tiers",
                    "wrong_blocks", "wall_s", "requests", "block_refs"):
            assert key in r, (r["name"], key)
        assert r["wrong_blocks"] == 0
        assert r["requests"] == len(wl.requests)
    assert runs["no-offload"]["tiers"]["engine"]["hit_blocks"] > 0  # the engine's own cache
    cpu = runs["cpu"]
    assert cpu["tiers"]["CPU"]["hit_blocks"] > 0
    assert cpu["loaded_blocks"] == cpu["tiers"]["CPU"]["hit_blocks"] > 0
    assert cpu["block_hit_rate"] > runs["no-offload"]["block_hit_rate"]
    assert cpu["tiers"]["CPU"]["bytes_written"] > 0
    for key in ("scheduler_us_per_block", "promotion_latency_steps", "vs_no_offload"):
        assert key in cpu
    tiered = runs[f"cpu+{default_secondary_tier()}"]
    # A tier that holds everything beats the CPU tier alone; its blocks came through promotion.
    assert tiered["block_hit_rate"] > cpu["block_hit_rate"]
    assert tiered["lookup_none"] > 0
    secondary = [m for m in tiered["tiers"] if m not in ("engine", "CPU")]
    assert secondary and tiered["tiers"][secondary[0]]["hit_blocks"] > 0
    assert tiered["tiers"][secondary[0]]["bytes_written"] > 0
    json.dumps(report)  # serializable as is


class _CorruptingOffload(KVTierOffload):
    """Flips a byte of every 5th distinct block in its primary slot before it is first loaded
    (the CPU tier is big enough that nothing is evicted and stored afresh)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.bad: set[bytes] = set()
        self.bad_loads = 0
        self._n = 0

    def prepare_load(self, keys: Sequence[bytes], ctx: ReqContext) -> LoadStoreSpec:
        spec = super().prepare_load(keys, ctx)
        region = self.manager.primary_blocks()
        for key, slot in zip(keys, spec.block_ids):
            if key not in self.bad:
                self._n += 1
                if self._n % 5:
                    continue
                region[int(slot), 100] ^= 0xFF
                self.bad.add(key)
            self.bad_loads += 1
        return spec


def test_wrong_bytes_are_counted() -> None:
    wl = synthetic_workload(SyntheticParams(seed=4, sessions=20))
    off = _CorruptingOffload({"cpu_bytes_to_use": wl.distinct_blocks * BB})
    counters = EngineSim(wl, off, EngineOptions(bytes_per_block=BB, prefix_cache=False)).run()
    assert off.bad_loads > 0
    assert counters.wrong_blocks == off.bad_loads


def test_cli_writes_json_and_plot(tmp_path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--quiet", "--sessions", "20", "--sweep", "0.05,0.2",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA
    assert {p["config"] for p in report["sweep"]} >= {"cpu", "reference-lru"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_cli_errors_are_clear(tmp_path, capsys) -> None:
    assert main(["bench", "--quiet", "--config", "{oops"]) == 2
    assert "--config: not valid JSON" in capsys.readouterr().err
    assert main(["bench", "--quiet", "--config", "@" + str(tmp_path / "missing.json")]) == 2
    assert "cannot read the file" in capsys.readouterr().err
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n'
                   "garbage\n")
    assert main(["bench", "--quiet", "--trace", str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert main(["bench", "--quiet", "--sessions", "5", "--config",
                 '{"secondary_tiers": [{"type": "nope"}]}']) == 2
    assert "secondary_tiers[0]" in capsys.readouterr().err
    assert main(["bench", "--quiet", "--bytes-per-block", "1000"]) == 2
    assert "--bytes-per-block" in capsys.readouterr().err


def test_version(capsys) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("kvtier ")


def test_sweep_varies_the_write_policy(tmp_path) -> None:
    out = tmp_path / "w.json"
    # backpressure off: its latency signal would drop stores when the machine is busy
    tier = {"type": "storage", "path": str(tmp_path / "st"), "max_pinned_share": 1.0,
            "slow_store_factor": 1e9}
    # A CPU tier of a quarter of the blocks keeps many of them until the end: write-back never
    # writes those (at 5%, 10 slots, nearly every block is evicted and written either way, and
    # the counts differ by the odd block with the machine's timing).
    rc = main(["bench", "--quiet", "--sessions", "20", "--no-prefix-cache", "--sweep", "0.25",
               "--tier-fraction", "0.3", "--sweep-write-policy", "through,back",
               "--config", json.dumps({"secondary_tiers": [tier]}), "--json", str(out)])
    assert rc == 0
    pts = {p["config"]: p for p in json.loads(out.read_text())["sweep"]}
    through, back = pts["cpu+storage[through]"], pts["cpu+storage[back]"]
    assert through["wrong_blocks"] == 0 and back["wrong_blocks"] == 0
    # Write-back writes only what the CPU tier evicts: never more than write-through.
    assert 0 < back["secondary_bytes_written"] < through["secondary_bytes_written"]
    st = back["tiers"]["STORAGE"]
    assert st["hit_blocks"] > 0
    assert st["written_per_hit_byte"] == pytest.approx(
        st["bytes_written"] / (st["hit_blocks"] * 4096))
    with pytest.raises(SystemExit):
        main(["bench", "--quiet", "--sweep-write-policy", "sideways"])


@pytest.mark.parametrize("policy", ["lru", "arc", "chain"])
def test_policies_replay_cleanly(policy: str) -> None:
    wl = synthetic_workload(SyntheticParams(seed=5, sessions=15))
    off = KVTierOffload({"cpu_bytes_to_use": 16 * BB, "eviction_policy": policy})
    counters = EngineSim(wl, off, EngineOptions(bytes_per_block=BB, prefix_cache=False)).run()
    assert counters.wrong_blocks == 0 and counters.loaded_blocks > 0


def test_vllm_flag_says_why_it_cannot_run(monkeypatch, capsys) -> None:
    import kvtier.bench.vllm_backend as vb

    monkeypatch.setattr(vb, "vllm_unavailable", lambda: "ModuleNotFoundError: No module named 'x'")
    assert main(["bench", "--quiet", "--sessions", "5", "--vllm"]) == 2
    err = capsys.readouterr().err
    assert "--vllm" in err and "No module named 'x'" in err


@pytest.mark.vllm
def test_vllm_manager_replays_beside_kvtier(tmp_path) -> None:
    from kvtier.bench.vllm_backend import vllm_unavailable

    why = vllm_unavailable()
    if why:
        pytest.skip(f"vLLM's tiering manager is not importable: {why}")
    out = tmp_path / "r.json"
    assert main(["bench", "--quiet", "--sessions", "25", "--no-prefix-cache", "--vllm",
                 "--json", str(out)]) == 0
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    v = runs["vllm-cpu+fs"]
    assert v["wrong_blocks"] == 0
    assert v["loaded_blocks"] == v["hit_blocks"] > 0
    assert v["tiers"]["STORAGE"]["hit_blocks"] > 0
    # Same workload, same CPU size, a second tier that holds every block: vLLM's manager and
    # kvtier's serve the same number of blocks.
    tiered = next(r for n, r in runs.items() if n.startswith("cpu+"))
    assert v["hit_blocks"] == tiered["hit_blocks"]


def test_overlapping_requests_keep_order_and_bytes(tmp_path) -> None:
    wl = synthetic_workload(SyntheticParams(seed=6, sessions=30))
    plan = Plan(
        engine=EngineOptions(bytes_per_block=BB, prefix_cache=False, concurrency=3,
                             gpu_blocks=3 * max(len(r.hash_ids) for r in wl.requests)),
        config=_tier_config(tmp_path), cpu_blocks=max(8, wl.distinct_blocks // 10),
        tier_blocks=wl.distinct_blocks, reference=False,
    )
    report = BenchRunner(wl, plan).run()
    for r in report["runs"]:
        assert r["requests"] == len(wl.requests)
        assert r["wrong_blocks"] == 0
    tiered = next(r for r in report["runs"] if r["name"].startswith("cpu+"))
    assert tiered["loaded_blocks"] == tiered["hit_blocks"] > 0
