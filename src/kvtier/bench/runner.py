"""Running the bench: the configurations of one run, their replays, and the results.

One run replays the same workload through several configurations, each in a fresh engine:

- ``no-offload``: the engine's own prefix cache only;
- ``cpu``: kvtier with its CPU primary tier only;
- the configured tiers (default: CPU + a storage tier in a temporary directory);
- optionally vLLM's own ``TieringOffloadingManager`` (CPU + its ``fs`` tier);
- with ``engines`` > 1, the configured tiers in N engines that split the requests, each with
  1/N of the CPU tier, their storage tiers sharing one directory, and again with a directory
  each (1/N of the capacity), to compare with the one engine that has all the CPU memory;

plus the reference LRU model (no engine) at the CPU tier's capacity. ``--sweep`` repeats the
offloading configurations over CPU (and tier) capacities.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvtier.bench.engine import EngineOptions, EngineSim, RunCounters
from kvtier.bench.fleet import FleetSim, split
from kvtier.bench.offload import KVTierOffload, Offload
from kvtier.bench.reference import reference_lru
from kvtier.bench.workload import Workload

SCHEMA = "kvtier.bench/1"
# Room per block a tier needs beyond its payload (record header, index) when a capacity is given
# in blocks (a storage tier is given exactly the capacity that holds them); the tier reports its
# real capacity and usage in its stats.
TIER_BLOCK_OVERHEAD = 4096


def default_secondary_tier() -> str:
    """The tier type of the embedded default: ``storage`` when available, else ``example``."""
    try:
        import kvtier.tiers.storage  # noqa: F401
    except ImportError:
        return "example"
    return "storage"


@dataclass
class Plan:
    """What a run replays: options shared by every configuration."""

    engine: EngineOptions
    config: dict[str, Any]  # the configured tiers (extra_config), CPU size included
    cpu_blocks: int
    tier_blocks: int | None = None  # None: the tiers' capacities are as configured
    baselines: bool = True
    vllm: bool = False
    reference: bool = True
    sweep_cpu: list[float] = field(default_factory=list)  # fractions of the distinct blocks
    sweep_tier: list[float] = field(default_factory=list)
    sweep_write: list[str] = field(default_factory=list)  # write policies for every tier
    tmpdirs: list[str] = field(default_factory=list)
    engines: int = 1  # > 1: also split the workload across this many engines
    sync_seconds: float = 1.0  # their storage tiers' sync period, in simulated seconds


def parse_config_arg(text: str) -> dict[str, Any]:
    """``--config``: inline JSON or ``@file``; raises ValueError with what is wrong."""
    src = "--config"
    if text.startswith("@"):
        path = text[1:]
        src = path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read the file ({e.strerror or e})") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{src}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{src}: expected a JSON object (kvtier's extra_config)")
    return cfg


def with_capacities(
    config: dict[str, Any], block_bytes: int, cpu_blocks: int, tier_blocks: int | None,
    fresh_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """A copy of ``config`` with the CPU tier sized to ``cpu_blocks`` and, when given, every
    bounded secondary tier to ``tier_blocks``. With ``fresh_dirs``, each storage-like tier gets
    a fresh subdirectory of its ``path`` (listed there, for removal), so replays never share
    data."""
    cfg = copy.deepcopy(config)
    cfg["cpu_bytes_to_use"] = cpu_blocks * block_bytes
    for t in cfg.get("secondary_tiers") or []:
        if tier_blocks is not None and t.get("type") in ("storage", "fs"):
            from kvtier.tiers.storage import StorageTier

            slab = t.get("slab_bytes", StorageTier.DEFAULTS["slab_bytes"])
            t["capacity_bytes"] = StorageTier.capacity_for(tier_blocks, block_bytes, int(slab))
        elif tier_blocks is not None and t.get("type") != "network":
            t["capacity_bytes"] = tier_blocks * (block_bytes + TIER_BLOCK_OVERHEAD) + (1 << 20)
        if fresh_dirs is not None and t.get("type") in ("storage", "fs") and t.get("path"):
            base = str(t["path"])
            os.makedirs(base, exist_ok=True)
            t["path"] = tempfile.mkdtemp(prefix="kvtier-bench-", dir=base)
            fresh_dirs.append(t["path"])
    return cfg


def with_write_policy(config: dict[str, Any], write_policy: str | None) -> dict[str, Any]:
    """A copy of ``config`` whose every secondary tier has ``write_policy`` (None: as given)."""
    cfg = copy.deepcopy(config)
    if write_policy is not None:
        for t in cfg.get("secondary_tiers") or []:
            t["write_policy"] = write_policy
    return cfg


def _has_storage(config: dict[str, Any]) -> bool:
    return any(t.get("type") in ("storage", "fs") for t in config.get("secondary_tiers") or [])


def _manual_sync(config: dict[str, Any]) -> dict[str, Any]:
    """Storage tiers whose sync passes the fleet replay runs, in simulated time."""
    for t in config.get("secondary_tiers") or []:
        if t.get("type") in ("storage", "fs"):
            t["sync_seconds"] = 3600
    return config


def cpu_only(config: dict[str, Any]) -> dict[str, Any]:
    """The same configuration without secondary tiers."""
    cfg = copy.deepcopy(config)
    cfg["secondary_tiers"] = []
    return cfg


def tier_label(config: dict[str, Any]) -> str:
    """A short name: ``cpu+storage``, ``cpu+storage+network``, ..."""
    names = [str(t.get("type", "?")) for t in config.get("secondary_tiers") or []]
    return "+".join(["cpu", *names])


def summarize(
    name: str, kind: str, counters: RunCounters, stats: dict[str, Any], plan: Plan,
    config: dict[str, Any] | None, cpu_blocks: int | None, tier_blocks: int | None,
) -> dict[str, Any]:
    """One configuration's results, as they appear in the JSON report."""
    c = counters
    refs = c.block_refs or 1
    toks = c.input_tokens or 1
    tiers: dict[str, dict[str, Any]] = {}
    if plan.engine.prefix_cache:
        tiers["engine"] = {"hit_blocks": c.engine_hit_blocks, "hit_tokens": c.engine_hit_tokens}
    for medium, n in c.tier_hit_blocks.items():
        tiers[medium] = {"hit_blocks": n, "hit_tokens": c.tier_hit_tokens.get(medium, 0)}
    tier_stats = stats.get("tiers", {}) if isinstance(stats, dict) else {}
    for tname, st in tier_stats.items():
        medium = st.get("medium", tname)
        d = tiers.setdefault(medium, {"hit_blocks": 0, "hit_tokens": 0})
        d["name"] = tname
        d["bytes_read"] = int(st.get("bytes_read", 0) or 0)
        d["bytes_written"] = int(st.get("bytes_written", 0) or 0)
        if st.get("capacity_bytes") is not None:
            d["capacity_bytes"] = int(st["capacity_bytes"])
        if st.get("usage_bytes") is not None:
            d["usage_bytes"] = int(st["usage_bytes"])
    bpb = plan.engine.bytes_per_block
    for d in tiers.values():
        d.setdefault("bytes_read", 0)
        d.setdefault("bytes_written", 0)
        d["block_hit_rate"] = d["hit_blocks"] / refs
        d["token_hit_rate"] = d["hit_tokens"] / toks
        hit_bytes = d["hit_blocks"] * bpb
        d["written_per_hit_byte"] = d["bytes_written"] / hit_bytes if hit_bytes else None
    hit_blocks = c.engine_hit_blocks + sum(c.tier_hit_blocks.values())
    hit_tokens = c.engine_hit_tokens + sum(c.tier_hit_tokens.values())
    mgr = stats.get("manager", {}) if isinstance(stats, dict) else {}
    secondary_written = sum(d["bytes_written"] for m, d in tiers.items()
                            if m not in ("engine", "CPU"))
    return {
        "name": name,
        "kind": kind,
        "config": config,
        "cpu_blocks": cpu_blocks,
        "tier_blocks": tier_blocks,
        "requests": c.requests,
        "block_refs": c.block_refs,
        "input_tokens": c.input_tokens,
        "hit_blocks": hit_blocks,
        "hit_tokens": hit_tokens,
        "block_hit_rate": hit_blocks / refs,
        "token_hit_rate": hit_tokens / toks,
        "prefill_tokens": c.prefill_tokens,
        "prefill_tokens_saved": c.input_tokens - c.prefill_tokens,
        "tiers": tiers,
        "secondary_bytes_written": secondary_written,
        "written_per_hit_byte": (secondary_written / (hit_blocks * bpb)) if hit_blocks else None,
        "loaded_blocks": c.loaded_blocks,
        "wrong_blocks": c.wrong_blocks,
        "stored_blocks": c.stored_blocks,
        "store_retries": c.store_retries,
        "transfer_failures": c.transfer_failures,
        "lookup_none": c.lookup_none,
        "promotion_latency_steps": {
            "manager_avg": float(mgr.get("promotion_latency_steps_avg", 0.0) or 0.0),
            "request_avg": c.wait_steps_total / c.waited_requests if c.waited_requests else 0.0,
            "requests_waited": c.waited_requests,
        },
        "promotion_latency_s": {
            "manager_avg": float(mgr.get("promotion_latency_s_avg", 0.0) or 0.0),
            "request_avg": c.wait_seconds_total / c.waited_requests if c.waited_requests else 0.0,
        },
        "scheduler_us_per_block": 1e6 * c.manager_seconds / refs,
        "lookup_blocks": c.lookup_blocks,
        "scheduler_s": c.manager_seconds,
        "manager_calls": c.manager_calls,
        "steps": c.steps,
        "wall_s": c.wall_s,
        "simulated_s": c.sim_s,
        "manager_stats": _jsonable(stats),
    }


def reference_summary(wl: Workload, plan: Plan, cpu_blocks: int) -> dict[str, Any]:
    """The reference LRU model at ``cpu_blocks``, in the report's shape."""
    t0 = time.perf_counter()
    ref = reference_lru(wl, cpu_blocks, full_blocks_only=plan.engine.full_blocks_only)
    wall = time.perf_counter() - t0
    return {
        "name": "reference-lru",
        "kind": "reference",
        "config": None,
        "cpu_blocks": cpu_blocks,
        "tier_blocks": None,
        "requests": len(wl.requests),
        "block_refs": ref["block_refs"],
        "input_tokens": ref["input_tokens"],
        "hit_blocks": ref["block_hits"],
        "hit_tokens": ref["token_hits"],
        "block_hit_rate": ref["block_hit_rate"],
        "token_hit_rate": ref["token_hit_rate"],
        "prefill_tokens": ref["input_tokens"] - ref["token_hits"],
        "prefill_tokens_saved": ref["token_hits"],
        "tiers": {},
        "wrong_blocks": 0,
        "wall_s": wall,
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


ProgressFactory = Callable[[str, int], Callable[[int], None]]


class BenchRunner:
    """Runs a plan over a workload and collects the report."""

    def __init__(
        self, workload: Workload, plan: Plan, progress: ProgressFactory | None = None
    ) -> None:
        self.wl = workload
        self.plan = plan
        self.progress = progress
        self.tmp_root = tempfile.mkdtemp(prefix="kvtier-bench-")

    def _replay(
        self, name: str, kind: str, offload: Offload, config: dict[str, Any] | None,
        cpu_blocks: int | None, tier_blocks: int | None,
    ) -> dict[str, Any]:
        cb = self.progress(name, len(self.wl.requests)) if self.progress else None
        sim = EngineSim(self.wl, offload, copy.copy(self.plan.engine), progress=cb)
        counters = sim.run()
        return summarize(
            name, kind, counters, getattr(sim, "stats", {}), self.plan, config, cpu_blocks,
            tier_blocks,
        )

    def _kvtier(
        self, name: str, config: dict[str, Any], cpu_blocks: int, tier_blocks: int | None
    ) -> dict[str, Any]:
        dirs: list[str] = []
        cfg = with_capacities(
            config, self.plan.engine.bytes_per_block, cpu_blocks, tier_blocks, dirs
        )
        try:
            namespace = f"bench/{uuid.uuid4().hex[:12]}"
            off = KVTierOffload(cfg, namespace=namespace)
            return self._replay(name, "kvtier", off, cfg, cpu_blocks, tier_blocks)
        finally:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)

    def _fleet(self, shared: bool) -> dict[str, Any]:
        """The configured tiers in ``plan.engines`` engines, each with 1/N of the CPU tier;
        their storage tiers share one directory (``shared``) or each has its own with 1/N of
        the capacity (as the single-engine layout left a second engine)."""
        plan = self.plan
        n = plan.engines
        cpu_each = max(1, plan.cpu_blocks // n)
        bpb = plan.engine.bytes_per_block
        dirs: list[str] = []
        name = f"{tier_label(plan.config)} x{n} {'shared' if shared else 'private'}"
        try:
            if shared:
                cfg = _manual_sync(with_capacities(plan.config, bpb, cpu_each, plan.tier_blocks,
                                                   dirs))
                namespace = f"bench/{uuid.uuid4().hex[:12]}"
                offs: list[Offload] = [KVTierOffload(cfg, namespace=namespace) for _ in range(n)]
                configs = [cfg]
            else:
                tb = None if plan.tier_blocks is None else max(1, plan.tier_blocks // n)
                configs = [_manual_sync(with_capacities(plan.config, bpb, cpu_each, tb, dirs))
                           for _ in range(n)]
                offs = [KVTierOffload(c, namespace=f"bench/{uuid.uuid4().hex[:12]}")
                        for c in configs]
            cb = self.progress(name, len(self.wl.requests)) if self.progress else None
            fleet = FleetSim(split(self.wl, n), offs, copy.copy(plan.engine),
                             sync_s=plan.sync_seconds, progress=cb)
            counters = fleet.run(shared=shared)
            out = summarize(name, "kvtier", counters, fleet.stats, plan, configs[0],
                            cpu_each * n, plan.tier_blocks)
            out["engines"] = n
            out["storage_shared"] = shared
            out["per_engine_block_hit_rate"] = [
                (c.engine_hit_blocks + sum(c.tier_hit_blocks.values())) / (c.block_refs or 1)
                for c in fleet.per_engine
            ]
            return out
        finally:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)

    def run(self) -> dict[str, Any]:
        """Every configuration of the plan; returns the report (see the README's schema)."""
        plan = self.plan
        t0 = time.perf_counter()
        runs: list[dict[str, Any]] = []
        try:
            if plan.baselines:
                runs.append(self._replay("no-offload", "none", Offload(), None, None, None))
                runs.append(
                    self._kvtier("cpu", cpu_only(plan.config), plan.cpu_blocks, None)
                )
            if plan.config.get("secondary_tiers") or not plan.baselines:
                runs.append(
                    self._kvtier(
                        tier_label(plan.config), plan.config, plan.cpu_blocks, plan.tier_blocks
                    )
                )
            if plan.engines > 1 and _has_storage(plan.config):
                for shared in (True, False):
                    runs.append(self._fleet(shared))
            if plan.vllm:
                from kvtier.bench.vllm_backend import VLLMOffload

                fs_dir = tempfile.mkdtemp(prefix="vllm-fs-", dir=self.tmp_root)
                off = VLLMOffload(plan.cpu_blocks, fs_dir, plan.tier_blocks)
                runs.append(
                    self._replay("vllm-cpu+fs", "vllm", off, off.describe(), plan.cpu_blocks,
                                 plan.tier_blocks)
                )
            if plan.reference:
                runs.append(reference_summary(self.wl, plan, plan.cpu_blocks))
            sweep = self._sweep() if plan.sweep_cpu else []
        finally:
            shutil.rmtree(self.tmp_root, ignore_errors=True)
        baseline = next((r for r in runs if r["kind"] == "none"), None)
        if baseline is not None:
            base_saved = baseline["prefill_tokens_saved"]
            base_prefill = baseline["prefill_tokens"] or 1
            for r in runs:
                r["vs_no_offload"] = {
                    "prefill_tokens_ratio": r["prefill_tokens"] / base_prefill,
                    "extra_tokens_saved": r["prefill_tokens_saved"] - base_saved,
                }
        return {
            "schema": SCHEMA,
            "kvtier_version": _version(),
            "created_unix": time.time(),
            "machine": machine_info(),
            "workload": {
                "name": self.wl.name,
                "requests": len(self.wl.requests),
                "block_tokens": self.wl.block_tokens,
                "block_refs": self.wl.block_refs,
                "distinct_blocks": self.wl.distinct_blocks,
                "input_tokens": self.wl.input_tokens,
                "params": _jsonable(self.wl.params),
            },
            "engine": asdict(plan.engine),
            "runs": runs,
            "sweep": sweep,
            "wall_s": time.perf_counter() - t0,
        }

    def _sweep(self) -> list[dict[str, Any]]:
        plan = self.plan
        distinct = self.wl.distinct_blocks
        points: list[dict[str, Any]] = []
        tier_fracs: list[float | None] = list(plan.sweep_tier) or [None]
        writes: list[str | None] = list(plan.sweep_write) or [None]
        for frac in plan.sweep_cpu:
            cpu_blocks = max(1, int(round(frac * distinct)))
            entries: list[dict[str, Any]] = []
            entries.append(self._kvtier(f"cpu@{frac:g}", cpu_only(plan.config), cpu_blocks, None))
            if plan.config.get("secondary_tiers"):
                for tf in tier_fracs:
                    tb = plan.tier_blocks if tf is None else max(1, int(round(tf * distinct)))
                    for wp in writes:
                        cfg = with_write_policy(plan.config, wp)
                        label = tier_label(plan.config) + (f"[{wp}]" if wp else "")
                        entries.append(self._kvtier(f"{label}@{frac:g}", cfg, cpu_blocks, tb))
            if plan.reference:
                entries.append(reference_summary(self.wl, plan, cpu_blocks))
            for e in entries:
                base = e["name"].split("@")[0]
                points.append(
                    {
                        "config": base if e["kind"] != "reference" else "reference-lru",
                        "cpu_fraction": frac,
                        "cpu_blocks": cpu_blocks,
                        "tier_blocks": e.get("tier_blocks"),
                        "block_hit_rate": e["block_hit_rate"],
                        "token_hit_rate": e["token_hit_rate"],
                        "wrong_blocks": e.get("wrong_blocks", 0),
                        "secondary_bytes_written": e.get("secondary_bytes_written", 0),
                        "written_per_hit_byte": e.get("written_per_hit_byte"),
                        "tiers": {
                            m: {"bytes_read": d.get("bytes_read", 0),
                                "bytes_written": d.get("bytes_written", 0),
                                "hit_blocks": d.get("hit_blocks", 0),
                                "written_per_hit_byte": d.get("written_per_hit_byte")}
                            for m, d in e.get("tiers", {}).items()
                        },
                    }
                )
        return points


def _version() -> str:
    from kvtier import __version__

    return __version__


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch is optional for the report itself
        info["torch"] = None
    return info
