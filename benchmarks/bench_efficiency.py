"""Cache efficiency: write policies, admission and eviction policies, through the whole stack.

    python benchmarks/bench_efficiency.py [--trace ../shared/traces/mooncake_synthetic_trace.jsonl]
                                          [--quick] [--no-update]

Replays (engine simulator -> manager -> worker -> tiers, bytes checked on every load; engine
prefix cache off; full blocks only, as an engine stores them):

1. the Mooncake trace, CPU 5% + storage 25% of its distinct blocks, storage tier written
   through, back, and back with the ``reuse`` admission policy (and through with it), and back
   with the storage tier evicting by ``adaptive`` (with and without admission);
2. the same storage tier at CPU 1/5/10/25%, written through and back;
3. the CPU tier alone at 1/5/10/25% under each eviction policy;
4. the CPU tier alone on four generated workloads (the bench's synthetic chat generator with
   different session shapes), same capacities and policies.

Writes ``docs/results/efficiency.json`` and ``docs/results/efficiency.png`` and replaces the
block between the ``efficiency:begin`` / ``efficiency:end`` markers of docs/BENCHMARKS.md with
the tables (``--no-update``: print them only). ``--quick`` replays the first 1,000 requests of
the trace and fewer generated sessions (a smoke run; not for the record).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.bench import BenchRunner, EngineOptions, Plan, load_trace
from kvtier.bench.runner import machine_info
from kvtier.bench.workload import SyntheticParams, Workload, synthetic_workload

ROOT = Path(__file__).resolve().parent.parent
FRACS = (0.01, 0.05, 0.1, 0.25)
POLICIES = ("lru", "arc", "chain", "adaptive")
BELADY = {0.01: 0.185, 0.05: 0.396, 0.1: 0.506, 0.25: 0.626}  # traces/README (all blocks)
GENERATED = {
    "chat (default)": SyntheticParams(seed=1),
    "long pauses": SyntheticParams(seed=2, think_s=60.0, session_rate=8.0),
    "many system prompts": SyntheticParams(seed=3, system_prompts=40, zipf_s=0.8),
    "long one-turn prompts": SyntheticParams(seed=4, turns_mean=1.5, user_tokens=(512, 4096)),
}
BEGIN, END = "<!-- efficiency:begin -->", "<!-- efficiency:end -->"


def replay(wl: Workload, config: dict[str, Any], cpu_blocks: int,
           tier_blocks: int | None) -> dict[str, Any]:
    """One configuration, one replay; the run's summary (see the bench's JSON schema)."""
    opts = EngineOptions(block_tokens=wl.block_tokens, prefix_cache=False, full_blocks_only=True)
    plan = Plan(engine=opts, config=config, cpu_blocks=cpu_blocks, tier_blocks=tier_blocks,
                baselines=False, reference=False)
    run = BenchRunner(wl, plan).run()["runs"][0]
    if run["wrong_blocks"]:
        raise SystemExit(f"{run['wrong_blocks']} wrong blocks in {config}")
    return run


def storage_point(run: dict[str, Any]) -> dict[str, Any]:
    """What the tables show of a CPU + storage replay."""
    st = run["tiers"].get("STORAGE", {})
    cpu = run["tiers"].get("CPU", {})
    return {
        "block_hit_rate": run["block_hit_rate"],
        "cpu_hits": cpu.get("hit_blocks", 0),
        "storage_hits": st.get("hit_blocks", 0),
        "storage_written_blocks": st.get("bytes_written", 0) // 4096,
        "written_per_hit_byte": st.get("written_per_hit_byte"),
        "scheduler_us_per_block": run["scheduler_us_per_block"],
    }


# Backpressure off: on a shared machine its latency signal reacts to other jobs' load and drops
# stores, which would mix the machine's load into a comparison of policies.
NO_BACKPRESSURE = {"max_pinned_share": 1.0, "slow_store_factor": 1e9}


def storage_config(path: str, write_policy: str, admission: str,
                   eviction: str = "lru") -> dict[str, Any]:
    """CPU + one storage tier in ``path`` (backpressure off)."""
    return {"secondary_tiers": [{"type": "storage", "path": path, "write_policy": write_policy,
                                 "admission_policy": admission, "eviction_policy": eviction,
                                 **NO_BACKPRESSURE}]}


def run_all(trace: str, quick: bool, progress: Any) -> dict[str, Any]:
    """Every replay of the module docstring; the raw results."""
    wl = load_trace(trace)
    if quick:
        wl = wl.head(1000)
    distinct = wl.distinct_blocks
    tmp = tempfile.mkdtemp(prefix="kvtier-eff-")
    out: dict[str, Any] = {"workload": wl.name, "requests": len(wl.requests),
                           "distinct_blocks": distinct, "machine": machine_info()}
    try:
        cpu5, st25 = round(0.05 * distinct), round(0.25 * distinct)
        combos = [("through", "all", "lru"), ("back", "all", "lru"), ("back", "reuse", "lru"),
                  ("through", "reuse", "lru"), ("back", "all", "adaptive"),
                  ("back", "reuse", "adaptive")]
        out["tiers"] = {}
        for wp, adm, ev in combos:
            progress(f"CPU 5% + storage 25%: {wp}, admission {adm}, storage eviction {ev}")
            run = replay(wl, storage_config(tmp, wp, adm, ev), cpu5, st25)
            out["tiers"][f"{wp}/{adm}/{ev}"] = storage_point(run)
        out["write_sweep"] = {}
        for frac in FRACS:
            for wp in ("through", "back"):
                progress(f"CPU {frac:g} + storage 25%: {wp}")
                run = replay(wl, storage_config(tmp, wp, "all"), max(1, round(frac * distinct)),
                             st25)
                out["write_sweep"][f"{frac}/{wp}"] = storage_point(run)
        out["cpu"] = {}
        for pol in POLICIES:
            for frac in FRACS:
                progress(f"CPU only {frac:g}: {pol}")
                run = replay(wl, {"eviction_policy": pol, "secondary_tiers": []},
                             max(1, round(frac * distinct)), None)
                out["cpu"][f"{pol}/{frac}"] = {
                    "block_hit_rate": run["block_hit_rate"],
                    "scheduler_us_per_block": run["scheduler_us_per_block"]}
        out["generated"] = {}
        for name, params in GENERATED.items():
            if quick:
                params = SyntheticParams(**{**params.__dict__, "sessions": 60})
            gw = synthetic_workload(params)
            gd = gw.distinct_blocks
            for pol in ("lru", "chain", "adaptive"):
                for frac in FRACS:
                    progress(f"{name} {frac:g}: {pol}")
                    run = replay(gw, {"eviction_policy": pol, "secondary_tiers": []},
                                 max(1, round(frac * gd)), None)
                    out["generated"][f"{name}/{pol}/{frac}"] = run["block_hit_rate"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tables(res: dict[str, Any]) -> str:
    """The markdown tables of a result."""
    lines: list[str] = []
    base = res["tiers"]["through/all/lru"]
    lines += ["CPU 5% + storage 25% of the distinct blocks:", "",
              "| storage tier | block hit | CPU hits | storage hits | storage writes (blocks) "
              "| writes vs through | written bytes per storage hit byte |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"through/all/lru": '`"through"`', "back/all/lru": '`"back"`',
             "back/reuse/lru": '`"back"`, admission `"reuse"`',
             "through/reuse/lru": '`"through"`, admission `"reuse"`',
             "back/all/adaptive": '`"back"`, eviction `"adaptive"`',
             "back/reuse/adaptive": '`"back"`, admission `"reuse"`, eviction `"adaptive"`'}
    for key, label in names.items():
        p = res["tiers"][key]
        ratio = p["storage_written_blocks"] / base["storage_written_blocks"] - 1
        lines.append(f"| {label} | {p['block_hit_rate']:.4f} | {p['cpu_hits']:,} | "
                     f"{p['storage_hits']:,} | {p['storage_written_blocks']:,} | {ratio:+.1%} | "
                     f"{p['written_per_hit_byte']:.2f} |")
    lines += ["", "Write policy by CPU capacity (storage 25%):", "",
              "| CPU | through: hit | back: hit | through: writes | back: writes |",
              "|---:|---:|---:|---:|---:|"]
    for frac in FRACS:
        t, b = res["write_sweep"][f"{frac}/through"], res["write_sweep"][f"{frac}/back"]
        lines.append(f"| {frac:.0%} | {t['block_hit_rate']:.4f} | {b['block_hit_rate']:.4f} | "
                     f"{t['storage_written_blocks']:,} | {b['storage_written_blocks']:,} |")
    lines += ["", "CPU tier alone, block hit rate by capacity (points against LRU in brackets):",
              "", "| policy | " + " | ".join(f"{f:.0%}" for f in FRACS) + " | µs per block |",
              "|---|" + "---:|" * (len(FRACS) + 1)]
    for pol in POLICIES:
        cells = []
        for f in FRACS:
            v = res["cpu"][f"{pol}/{f}"]["block_hit_rate"]
            d = 100 * (v - res["cpu"][f"lru/{f}"]["block_hit_rate"])
            cells.append(f"{v:.4f}" + ("" if pol == "lru" else f" ({d:+.1f})"))
        us = res["cpu"][f"{pol}/0.1"]["scheduler_us_per_block"]
        lines.append(f"| `{pol}` | " + " | ".join(cells) + f" | {us:.1f} |")
    lines.append("| offline optimum, all blocks (traces/README) | "
                 + " | ".join(f"{BELADY[f]:.3f}" for f in FRACS) + " | - |")
    lines += ["", "CPU tier alone on generated workloads (points against LRU in brackets):", "",
              "| workload | policy | " + " | ".join(f"{f:.0%}" for f in FRACS) + " |",
              "|---|---|" + "---:|" * len(FRACS)]
    for name in GENERATED:
        for pol in ("lru", "chain", "adaptive"):
            cells = []
            for f in FRACS:
                v = res["generated"][f"{name}/{pol}/{f}"]
                d = 100 * (v - res["generated"][f"{name}/lru/{f}"])
                cells.append(f"{v:.4f}" + ("" if pol == "lru" else f" ({d:+.1f})"))
            lines.append(f"| {name} | `{pol}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """Left: CPU-only hit rate by capacity per policy; right: hit rate against storage writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = [100 * f for f in FRACS]
    for pol in POLICIES:
        a1.plot(xs, [res["cpu"][f"{pol}/{f}"]["block_hit_rate"] for f in FRACS], marker="o",
                label=pol)
    a1.plot(xs, [BELADY[f] for f in FRACS], "k--", label="offline optimum")
    a1.set_xscale("log")
    a1.set_xticks(xs, [f"{x:g}%" for x in xs])
    a1.set_xlabel("CPU tier, share of distinct blocks")
    a1.set_ylabel("block hit rate")
    a1.set_title("CPU tier alone (Mooncake trace)")
    a1.legend()
    for key, p in res["tiers"].items():
        a2.scatter(p["storage_written_blocks"] / 1000, p["block_hit_rate"], s=50)
        a2.annotate(key.replace("/all", "").replace("/lru", "").replace("/", " + "),
                    (p["storage_written_blocks"] / 1000,
                                              p["block_hit_rate"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    a2.set_xlabel("storage writes (thousand blocks)")
    a2.set_ylabel("block hit rate")
    a2.set_title("CPU 5% + storage 25%: write policy / admission")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_benchmarks(text: str, command: str, wall: float) -> None:
    """Replace the marked block of docs/BENCHMARKS.md."""
    doc = ROOT / "docs" / "BENCHMARKS.md"
    body = doc.read_text(encoding="utf-8")
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{doc}: the {BEGIN} / {END} markers are missing")
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = (f"{BEGIN}\nGenerated by `{command}` ({wall:.0f} s wall); raw results in "
             f"`docs/results/efficiency.json`.\n\n{text}\n![efficiency](results/efficiency.png)\n"
             f"{END}")
    doc.write_text(head + block + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run, write the results, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces"
                                           / "mooncake_synthetic_trace.jsonl"))
    ap.add_argument("--quick", action="store_true", help="a short smoke run, not for the record")
    ap.add_argument("--no-update", action="store_true", help="do not touch docs/")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {what}", file=sys.stderr, flush=True)

    res = run_all(args.trace, args.quick, progress)
    wall = time.perf_counter() - t0
    res["wall_s"] = wall
    text = tables(res)
    print(text)
    if not args.no_update and not args.quick:
        results = ROOT / "docs" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / "efficiency.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
        plot(res, results / "efficiency.png")
        update_benchmarks(text, "python benchmarks/bench_efficiency.py", wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
