"""Showing bench results: a rich table, the JSON file, and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _bytes(n: int | float | None) -> str:
    if not n:
        return "0"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(n)


def _tokens(n: int | float) -> str:
    v = float(n)
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def render(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the summary table and the per-tier table."""
    console = console or Console()
    wl = report["workload"]
    eng = report["engine"]
    console.print(
        f"[bold]kvtier bench[/bold]  workload [cyan]{wl['name']}[/cyan]: {wl['requests']} requests, "
        f"{wl['block_refs']} block refs, {wl['distinct_blocks']} distinct blocks of "
        f"{wl['block_tokens']} tokens, {_tokens(wl['input_tokens'])} prompt tokens; "
        f"{eng['bytes_per_block']} B/block, engine prefix cache "
        f"{'on' if eng['prefix_cache'] else 'off'}"
        + (", full blocks only" if eng["full_blocks_only"] else "")
    )
    t = Table(title="Results per configuration", show_lines=False)
    for col, just in (
        ("config", "left"), ("CPU blocks", "right"), ("block hit", "right"),
        ("token hit", "right"), ("prefill saved", "right"), ("vs no-offload", "right"),
        ("wrong", "right"), ("promo steps/ms", "right"), ("sched µs/blk", "right"),
        ("wall s", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in report["runs"]:
        vs = r.get("vs_no_offload")
        promo = r.get("promotion_latency_steps") or {}
        wrong = r.get("wrong_blocks", 0)
        t.add_row(
            r["name"],
            "-" if r.get("cpu_blocks") is None else str(r["cpu_blocks"]),
            _pct(r["block_hit_rate"]),
            _pct(r["token_hit_rate"]),
            _tokens(r["prefill_tokens_saved"]),
            "-" if not vs else f"{vs['prefill_tokens_ratio']:.3f}x prefill",
            f"[red]{wrong}[/red]" if wrong else "0",
            (
                f"{promo['request_avg']:.1f} / "
                f"{1000 * (r.get('promotion_latency_s') or {}).get('request_avg', 0.0):.1f}"
                if promo.get("requests_waited") else "-"
            ),
            f"{r['scheduler_us_per_block']:.2f}" if "scheduler_us_per_block" in r else "-",
            f"{r['wall_s']:.1f}",
        )
    console.print(t)
    fleet = [r for r in report["runs"] if r.get("engines", 1) > 1]
    one = next((r for r in report["runs"] if r["kind"] == "kvtier" and r.get("engines", 1) == 1
                and r["name"] == (fleet[0]["name"].rsplit(" x", 1)[0] if fleet else None)), None)
    for r in fleet:
        console.print(
            f"{r['engines']} engines, storage {'shared' if r.get('storage_shared') else 'private'}: "
            f"block hit {_pct(r['block_hit_rate'])} (per engine "
            + ", ".join(_pct(x) for x in r.get("per_engine_block_hit_rate", []))
            + ")"
            + (f"; one engine with the same total CPU memory: {_pct(one['block_hit_rate'])}"
               if one else "")
        )
    tt = Table(title="Per tier (hits in the order the engine asks: engine, CPU, secondary)")
    for col in ("config", "tier", "hit blocks", "block hit", "token hit", "read", "written",
                "written / hit byte", "usage / capacity"):
        tt.add_column(col, justify="left" if col in ("config", "tier") else "right")
    for r in report["runs"]:
        for medium, d in (r.get("tiers") or {}).items():
            cap = d.get("capacity_bytes")
            use = d.get("usage_bytes")
            tt.add_row(
                r["name"], medium, str(d["hit_blocks"]), _pct(d["block_hit_rate"]),
                _pct(d["token_hit_rate"]), _bytes(d.get("bytes_read")),
                _bytes(d.get("bytes_written")),
                "-" if d.get("written_per_hit_byte") is None else f"{d['written_per_hit_byte']:.2f}",
                "-" if use is None else f"{_bytes(use)} / {_bytes(cap) if cap else 'unbounded'}",
            )
    console.print(tt)
    if report.get("sweep"):
        st = Table(title="Sweep: block hit rate by CPU capacity")
        configs = sorted({p["config"] for p in report["sweep"]}, key=_config_order)
        st.add_column("CPU capacity", justify="right")
        for c in configs:
            st.add_column(escape(c), justify="right")
        for frac in sorted({p["cpu_fraction"] for p in report["sweep"]}):
            blocks = next(p["cpu_blocks"] for p in report["sweep"] if p["cpu_fraction"] == frac)
            row = [f"{frac:g} ({blocks} blk)"]
            for c in configs:
                pts = [p for p in report["sweep"] if p["config"] == c and p["cpu_fraction"] == frac]
                row.append(" / ".join(
                    _pct(p["block_hit_rate"]) + (f" ({_bytes(p['secondary_bytes_written'])} w)"
                                                 if p.get("secondary_bytes_written") else "")
                    for p in pts) or "-")
            st.add_row(*row)
        console.print(st)


def _config_order(name: str) -> tuple[int, str]:
    order = {"no-offload": 0, "cpu": 1, "reference-lru": 9}
    return order.get(name, 5), name


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as JSON (schema in the README)."""
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Hit rate vs CPU capacity per configuration, and bytes read/written per tier, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    sweep = report.get("sweep") or []
    if sweep:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        series: dict[str, list[tuple[int, float]]] = {}
        for p in sweep:
            label = p["config"]
            if p.get("tier_blocks") is not None and p["config"] not in ("cpu", "reference-lru"):
                label = f"{p['config']} (tier {p['tier_blocks']} blk)"
            series.setdefault(label, []).append((p["cpu_blocks"], p["block_hit_rate"]))
        for label, pts in sorted(series.items(), key=lambda kv: _config_order(kv[0])):
            pts.sort()
            ref = label == "reference-lru"
            ax1.plot([x for x, _ in pts], [y for _, y in pts], "--" if ref else "-",
                     marker="x" if ref else "o", markersize=9 if ref else 6,
                     zorder=3 if ref else 2, label=label)
        for r in report["runs"]:
            if r["kind"] == "none":
                ax1.axhline(r["block_hit_rate"], color="grey", linestyle=":",
                            label=f"no-offload ({_pct(r['block_hit_rate'])})")
        ax1.set_xscale("log")
        ax1.xaxis.set_major_formatter(ScalarFormatter())
        ax1.xaxis.set_minor_formatter(NullFormatter())
        xs = sorted({p["cpu_blocks"] for p in sweep})
        ax1.set_xticks(xs)
        ax1.set_xticklabels([str(x) for x in xs], fontsize=8)
        ax1.set_xlabel("CPU tier capacity (blocks, log scale)")
        ax1.set_ylabel("block hit rate")
        ax1.set_title(f"Hit rate vs CPU capacity — {report['workload']['name']}")
        ax1.legend(fontsize=8, loc="best")
    else:
        runs = report["runs"]
        xs = list(range(len(runs)))
        w = 0.4
        ax1.bar([x - w / 2 for x in xs], [r["block_hit_rate"] for r in runs], w, label="block hit")
        ax1.bar([x + w / 2 for x in xs], [r["token_hit_rate"] for r in runs], w, label="token hit")
        for x, r in zip(xs, runs):
            ax1.text(x - w / 2, r["block_hit_rate"] + 0.01, _pct(r["block_hit_rate"]),
                     ha="center", fontsize=8)
        ax1.set_xticks(xs)
        ax1.set_xticklabels(
            [r["name"] + ("" if r.get("cpu_blocks") is None else f"\nCPU {r['cpu_blocks']} blk")
             for r in runs], fontsize=8,
        )
        ax1.set_ylabel("hit rate")
        ax1.set_title(f"Hit rate per configuration — {report['workload']['name']} "
                      "(--sweep: vs capacity)")
        ax1.legend(fontsize=8, loc="upper left")
    ax1.set_ylim(0, max(0.05, min(1.0, 1.15 * _max_rate(report))))
    ax1.grid(True, alpha=0.3)

    bars: list[tuple[str, float, float]] = []
    for r in report["runs"]:
        for medium, d in (r.get("tiers") or {}).items():
            if medium == "engine":
                continue
            bars.append((f"{r['name']}\n{medium}", d.get("bytes_read", 0) / 2**20,
                         d.get("bytes_written", 0) / 2**20))
    if bars:
        xs = list(range(len(bars)))
        w = 0.4
        ax2.bar([x - w / 2 for x in xs], [b[1] for b in bars], w, label="read")
        ax2.bar([x + w / 2 for x in xs], [b[2] for b in bars], w, label="written")
        ax2.set_xticks(list(xs))
        ax2.set_xticklabels([b[0] for b in bars], fontsize=8)
        ax2.legend(fontsize=8)
    ax2.set_ylabel("MiB")
    ax2.set_title("Bytes read / written per tier")
    ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _max_rate(report: dict[str, Any]) -> float:
    rates = [r["block_hit_rate"] for r in report["runs"]]
    rates += [p["block_hit_rate"] for p in report.get("sweep") or []]
    return max(rates) if rates else 1.0
