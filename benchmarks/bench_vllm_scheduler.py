"""Scheduler-side cost: vLLM 0.33's TieringOffloadingManager vs kvtier behind vLLM's connector.

Both managers are built through vLLM's own ``OffloadingSpecFactory`` from the same
``kv_connector_extra_config`` keys and driven through the same adapter-level call sequence the
``OffloadingConnectorScheduler`` issues: per-key ``lookup`` in prefix order until the first
MISS (HIT and HIT_PENDING count, RETRY defers but keeps scanning), ``prepare_store`` /
``complete_store`` batches, and ``on_schedule_end`` once per step, each step under
``manager.lock`` as the connector holds it. Reported per block:

* lookup of an N-block resident prefix (default 8192), a fresh verdict every step; reported as
  the whole scan and as the manager's share (the scan minus the connector's own loop, measured
  in the same run with a manager that answers HIT at once);
* stores (prepare + complete) in batches of 64 blocks;
* promotion set-up: the step's lookups plus ``on_schedule_end`` for a prefix held only by the
  secondary tier (the work the scheduler thread does before the tier copies anything);
* steps until such a prefix is a HIT (a model step of ``--step-ms`` between steps), with the
  ``example`` tier and with the file-system tier (vLLM ``fs``, kvtier ``storage``).

Usage: python benchmarks/bench_vllm_scheduler.py [--blocks 8192] [--promote 1024] [--json out]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

from vllm.v1.kv_offload.base import (  # noqa: E402
    LookupResult,
    ReqContext,
    ScheduleEndContext,
    make_offload_key,
)
from vllm.v1.kv_offload.config import (  # noqa: E402
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.factory import OffloadingSpecFactory  # noqa: E402

TOKENS = 16
BLOCK_BYTES = 4096  # scheduler cost does not depend on it; keeps the regions small
END = ScheduleEndContext((), ())
HIT_LIKE = (LookupResult.HIT, LookupResult.HIT_PENDING)
KINDS = ("vllm", "kvtier")


def make_config(extra: dict[str, Any]) -> OffloadingConfig:
    """vLLM's OffloadingConfig for one worker, one full-attention group."""
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=TOKENS, layer_names=("l0",), group_id=0),),
        worker_kv_bytes_per_block=BLOCK_BYTES,
        enable_kv_cache_events=False,
        extra_config=extra,
        engine_id=f"bench-{uuid.uuid4().hex[:8]}",
        model=OffloadingModelConfig(name="bench/model", dtype="float16", max_model_len=1 << 20),
        cache=OffloadingCacheConfig(tokens_per_hash=TOKENS, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
            is_parallelism_agnostic=True,
        ),
    )


def make_manager(kind: str, slots: int, tiers: list[dict[str, Any]]) -> Any:
    """A manager built by vLLM's factory: ``kind`` is "vllm" or "kvtier"."""
    extra: dict[str, Any] = {"cpu_bytes_to_use": slots * BLOCK_BYTES,
                             "secondary_tiers": [dict(t) for t in tiers]}
    if kind == "kvtier":
        extra.update(spec_name="KVTierOffloadingSpec", spec_module_path="kvtier.vllm")
    else:
        extra.update(spec_name="TieringOffloadingSpec")
    return OffloadingSpecFactory.create_spec(make_config(extra)).get_manager()


def make_keys(n: int, salt: str) -> list[Any]:
    """n prefix-chained offload keys (32-byte hash + group 0)."""
    keys, h = [], salt.encode()
    for i in range(n):
        h = hashlib.sha256(h + i.to_bytes(4, "little")).digest()
        keys.append(make_offload_key(h, 0))
    return keys


def new_ctx(keys: list[Any], name: str) -> ReqContext:
    """A request context with the key positions the connector records."""
    ctx = ReqContext(req_id=name)
    for i, k in enumerate(keys):
        ctx.set_offload_key_position(k, (i + 1) * TOKENS)
    return ctx


def scan(m: Any, keys: list[Any], ctx: ReqContext) -> tuple[int, bool]:
    """The connector's prefix scan: (hits, deferred)."""
    hits, defer = 0, False
    lookup = m.lookup
    for key in keys:
        r = lookup(key, ctx)
        if r is LookupResult.MISS:
            break
        if r in HIT_LIKE:
            hits += 1
        defer |= r is not LookupResult.HIT
    return hits, defer


class NullManager:
    """Answers HIT at once: measures the connector's own per-key loop, not a manager."""

    lock = contextlib.nullcontext()

    def lookup(self, key: Any, req_context: ReqContext) -> LookupResult:
        """Always HIT."""
        return LookupResult.HIT


def end_step(m: Any) -> None:
    """on_schedule_end under the manager lock."""
    with m.lock:
        m.on_schedule_end(END)


def store(m: Any, keys: list[Any], ctx: ReqContext, batch: int = 64) -> float:
    """Store keys (prepare + complete per batch, one step per batch); seconds spent."""
    t = 0.0
    for i in range(0, len(keys), batch):
        part = keys[i : i + batch]
        t0 = time.perf_counter()
        with m.lock:
            out = m.prepare_store(part, ctx)
            if out is None:
                raise RuntimeError("prepare_store refused")
            m.complete_store(out.keys_to_store, ctx)
        t += time.perf_counter() - t0
        end_step(m)
    return t


def settle(m: Any, timeout: float = 60.0) -> None:
    """Step until tier jobs (cascades) are done."""
    deadline = time.monotonic() + timeout
    end_step(m)
    while m.has_pending_work():
        if time.monotonic() > deadline:
            raise TimeoutError("tier jobs did not finish")
        time.sleep(0.002)
        end_step(m)
    end_step(m)


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall times of ``repeat`` calls."""
    out = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_lookup(n: int, repeat: int) -> dict[str, dict[str, float]]:
    """Per-block cost of looking up an n-block resident prefix, both managers interleaved."""
    managers, out = {}, {}
    try:
        keys = make_keys(n, "lookup")
        ctxs = {}
        for kind in KINDS:
            m = managers[kind] = make_manager(kind, n + 64, [])
            ctx = ctxs[kind] = new_ctx(keys, "r")
            m.on_new_request(ctx)
            out[kind] = {"store_us_per_block": store(m, keys, ctx) / n * 1e6}
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        loop: list[float] = []
        null, null_ctx = NullManager(), new_ctx(keys, "null")
        for rep in range(repeat):
            for kind in KINDS if rep % 2 else KINDS[::-1]:
                m, ctx = managers[kind], ctxs[kind]
                gc.collect()
                t0 = time.perf_counter()
                with m.lock:
                    hits, defer = scan(m, keys, ctx)
                times[kind].append(time.perf_counter() - t0)
                assert hits == n and not defer, (kind, hits, defer)
                end_step(m)  # a new step: kvtier's verdict is recomputed each time
            gc.collect()
            t0 = time.perf_counter()
            scan(null, keys, null_ctx)
            loop.append(time.perf_counter() - t0)
        base = min(loop) / n * 1e6
        for kind in KINDS:
            total = min(times[kind]) / n * 1e6
            out[kind]["lookup_us_per_block"] = total
            out[kind]["lookup_us_per_block_median"] = statistics.median(times[kind]) / n * 1e6
            out[kind]["lookup_manager_us_per_block"] = total - base
            out[kind]["connector_loop_us_per_block"] = base
        return out
    finally:
        for m in managers.values():
            m.shutdown()


def evicted_prefix(kind: str, p: int, tiers: list[dict[str, Any]]) -> tuple[Any, list[Any]]:
    """A manager whose secondary tier holds a p-block prefix that the CPU tier has evicted."""
    m = make_manager(kind, p + 64, tiers)
    keys = make_keys(p, f"promote-{uuid.uuid4().hex}")
    ctx = new_ctx(keys, "writer")
    m.on_new_request(ctx)
    store(m, keys, ctx)
    settle(m)
    filler = make_keys(p + 64, f"filler-{uuid.uuid4().hex}")
    fctx = new_ctx(filler, "filler")
    m.on_new_request(fctx)
    store(m, filler, fctx)
    settle(m)
    with m.lock:
        hits, _ = scan(m, keys[:1], new_ctx(keys, "probe-primary"))
    return m, keys


def bench_promotion(p: int, repeat: int) -> dict[str, dict[str, float]]:
    """Per-block cost of setting up the promotion of a p-block prefix (lookups + step end)."""
    setup: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for rep in range(repeat):
        for kind in KINDS if rep % 2 else KINDS[::-1]:
            m, keys = evicted_prefix(kind, p, [{"type": "example"}])
            try:
                ctx = new_ctx(keys, "reader")
                m.on_new_request(ctx)
                gc.collect()
                t0 = time.perf_counter()
                with m.lock:
                    hits, defer = scan(m, keys, ctx)
                end_step(m)
                setup[kind].append(time.perf_counter() - t0)
                assert defer, (kind, "first lookup of an evicted prefix must defer")
                steps_until_hit(m, keys, ctx, 0.001)
            finally:
                m.shutdown()
    return {kind: {"promotion_setup_us_per_block": min(t) / p * 1e6,
                   "promotion_setup_us_per_block_median": statistics.median(t) / p * 1e6}
            for kind, t in setup.items()}


def steps_until_hit(m: Any, keys: list[Any], ctx: ReqContext, step_s: float,
                    limit: int = 2000) -> int:
    """Further steps until the whole prefix is a HIT."""
    for i in range(limit):
        if step_s:
            time.sleep(step_s)
        with m.lock:
            hits, defer = scan(m, keys, ctx)
        if hits == len(keys) and not defer:
            return i
        end_step(m)
    raise TimeoutError("prefix never became a hit")


def bench_steps(kind: str, tier: str, p: int, step_s: float, root: str) -> dict[str, Any]:
    """Steps (scheduler calls of one request) until a secondary-only prefix is a HIT."""
    if tier == "example":
        tiers: list[dict[str, Any]] = [{"type": "example"}]
    elif kind == "vllm":
        tiers = [{"type": "fs", "root_dir": os.path.join(root, f"vllm-{uuid.uuid4().hex[:6]}")}]
    else:
        tiers = [{"type": "storage", "path": os.path.join(root, f"kv-{uuid.uuid4().hex[:6]}"),
                  "capacity_bytes": 64 << 20}]
    m, keys = evicted_prefix(kind, p, tiers)
    try:
        ctx = new_ctx(keys, "reader")
        m.on_new_request(ctx)
        answers = []
        for _ in range(2000):
            with m.lock:
                first = m.lookup(keys[0], ctx)
                hits, defer = scan(m, keys, ctx)
            answers.append(first.name)
            if hits == len(keys) and not defer:
                break
            end_step(m)
            time.sleep(step_s)
        return {"steps": len(answers), "first_key_answers": answers[:6]}
    finally:
        m.shutdown()


def main() -> None:
    """Run every measurement for both managers and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8192, help="prefix length for lookups")
    ap.add_argument("--promote", type=int, default=1024, help="blocks promoted per run")
    ap.add_argument("--repeat", type=int, default=9, help="runs per measure (best is kept)")
    ap.add_argument("--step-ms", type=float, default=5.0, help="model step between steps")
    ap.add_argument("--step-runs", type=int, default=5, help="runs of the steps count")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    import vllm

    res: dict[str, Any] = {"vllm": {}, "kvtier": {}}
    print(f"lookups of a {args.blocks}-block prefix and stores, both managers ...", flush=True)
    for kind, r in bench_lookup(args.blocks, args.repeat).items():
        res[kind].update(r)
    print(f"promotion set-up of {args.promote} blocks, both managers ...", flush=True)
    for kind, r in bench_promotion(args.promote, args.repeat).items():
        res[kind].update(r)
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as root:
        for tier in ("example", "storage"):
            for kind in KINDS:
                print(f"[{kind}] steps to a secondary hit ({tier}) ...", flush=True)
                runs = [bench_steps(kind, tier, 64, args.step_ms / 1e3, root)
                        for _ in range(args.step_runs)]
                res[kind][f"steps_{tier}"] = {
                    "steps": statistics.median(r["steps"] for r in runs),
                    "all": [r["steps"] for r in runs],
                    "first_key_answers": runs[0]["first_key_answers"],
                }
    v, k = res["vllm"], res["kvtier"]
    rows = [
        (f"lookup, {args.blocks}-block prefix (us/block)", "lookup_us_per_block", 0.2),
        ("  of which the manager (connector loop out)", "lookup_manager_us_per_block", 0.2),
        ("store, prepare+complete (us/block)", "store_us_per_block", None),
        (f"promotion set-up, {args.promote} blocks (us/block)",
         "promotion_setup_us_per_block", 0.3),
    ]
    print()
    print(f"vLLM {vllm.__version__} TieringOffloadingManager vs kvtier.vllm "
          f"(python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus)")
    print(f"{'measure':48} {'vLLM':>10} {'kvtier':>10} {'ratio':>8} {'target':>8}")
    ratios = {}
    for label, key, target in rows:
        ratio = k[key] / v[key]
        ratios[key] = ratio
        tgt = f"<= {target}" if target else ""
        ok = "" if target is None else ("  ok" if ratio <= target else "  MISSED")
        print(f"{label:48} {v[key]:10.3f} {k[key]:10.3f} {ratio:8.3f} {tgt:>8}{ok}")
    print(f"  (the connector's own per-key loop, measured with a manager that answers HIT at "
          f"once: {v['connector_loop_us_per_block']:.3f} us/block)")
    for tier in ("example", "storage"):
        vs, ks = v[f"steps_{tier}"], k[f"steps_{tier}"]
        label = f"steps to a secondary hit ({'fs' if tier == 'storage' else tier} / {tier})"
        print(f"{label:48} {vs['steps']:10.1f} {ks['steps']:10.1f}   runs: vLLM {vs['all']}, "
              f"kvtier {ks['all']}")
        print(f"{'':4}vLLM first-key answers: {' '.join(vs['first_key_answers'])}")
        print(f"{'':4}kvtier first-key answers: {' '.join(ks['first_key_answers'])}")
    res["ratios"] = ratios
    res["args"] = vars(args)
    res["vllm_version"] = vllm.__version__
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
