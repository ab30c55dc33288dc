"""The operator commands' output for people (``--json`` prints the same data as one object)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from kvtier.ops.units import fmt_bytes, fmt_seconds


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 110, highlight=False, markup=False,
                   soft_wrap=not sys.stdout.isatty())


def _target(t: dict[str, Any]) -> str:
    if t["kind"] == "redis":
        kind = "Redis Cluster" if t.get("cluster") else "Redis server"
        return f"{kind} {t['url']} ({len(t.get('nodes') or [])} primary node(s))"
    if t["kind"] == "shm":
        return f"shared memory {t['path']} (regions {t['prefix']}*)"
    lane = f", namespace directory {t['lane']}" if t.get("lane") else ""
    return f"storage tier {t['path']}{lane}"


def _short(fp: str) -> str:
    return fp[:12]


def _ages(age: dict[str, Any]) -> str:
    unit = age["unit"]
    parts = []
    lo = 0
    for b in age["buckets"]:
        if b["blocks"]:
            if b["below"] is None:
                label = f">={_edge(lo, unit)}"
            else:
                label = f"<{_edge(b['below'], unit)}"
            parts.append(f"{label}: {b['blocks']}")
        lo = b["below"] or lo
    if age.get("unknown"):
        parts.append(f"unknown: {age['unknown']}")
    return ", ".join(parts) or "-"


def _edge(v: int, unit: str) -> str:
    if unit == "seconds":
        return fmt_seconds(v)
    return f"{v // 1000}k" if v >= 1000 and v % 1000 == 0 else str(v)


def render(command: str, r: dict[str, Any]) -> None:
    """Print a command's result."""
    _RENDERERS[command](_console(), r)


def _render_inspect(c: Console, r: dict[str, Any]) -> None:
    t = r["target"]
    c.print(_target(t))
    m = r.get("medium") or {}
    if "fs_bytes" in m:
        c.print(f"file system: {fmt_bytes(m['fs_bytes'])}, {fmt_bytes(m['fs_free_bytes'])} free")
    for s in m.get("servers", []):
        limit = fmt_bytes(s["maxmemory"]) if s["maxmemory"] else "no limit"
        c.print(f"server {s['node']}: {s['version']}, memory {fmt_bytes(s['used_memory'])} "
                f"used of {limit}, maxmemory-policy {s['maxmemory_policy']}")
    if t["kind"] == "redis" and not m.get("no_touch", True):
        c.print("note: this server has no CLIENT NO-TOUCH (before 7.2): reading values counts as "
                "an access")
    if r.get("regions") is not None:
        tab = Table("region", "size", "in memory", "state", "users (pids)", "age")
        for g in r["regions"]:
            tab.add_row(g["name"], fmt_bytes(g["size_bytes"]), fmt_bytes(g["bytes"]), g["state"],
                        ", ".join(map(str, g["users"])) or "-", fmt_seconds(g["age_s"]))
        c.print(tab if r["regions"] else "no regions")
    if t["kind"] != "shm":
        if not r["namespaces"]:
            c.print("no namespaces")
        else:
            tab = Table("namespace", "lane" if t["kind"] == "storage" else "key prefix",
                        "blocks", "block size", "bytes", "engines", title="namespaces")
            for n in r["namespaces"]:
                where = str(n["lane"]) if n.get("lane") is not None else n["id"][:20] + "…"
                name = n.get("namespace") or _short(n["fingerprint"]) + "…"
                eng = ", ".join(f"{e['pid']} ({e['command'] or '?'})" for e in n["engines"])
                tab.add_row(name, where, _num(n["blocks"]), fmt_bytes(n.get("block_bytes")),
                            fmt_bytes(n["bytes"]), eng or "-")
            c.print(tab)
            for n in r["namespaces"]:
                label = n.get("namespace") or n["fingerprint"]
                unit = "writes ago" if n["age"]["unit"] == "writes" else "idle"
                c.print(f"{label} [{n['id']}]")
                c.print(f"  age ({unit}): {_ages(n['age'])}")
                if n.get("ttl", {}).get("with_ttl"):
                    c.print(f"  expires in: {_ages({'unit': 'seconds', **n['ttl']})}")
                extra = []
                if n.get("bad_headers"):
                    extra.append(f"{n['bad_headers']} bad headers")
                if n.get("older_copies"):
                    extra.append(f"{n['older_copies']} older copies")
                if n.get("unfinished_writes"):
                    extra.append(f"{n['unfinished_writes']} slots an engine was writing when it "
                                 "stopped (verified at its next start)")
                if extra:
                    c.print(f"  {', '.join(extra)}: run kvtier fsck")
    if r.get("engines") and t["kind"] == "redis":
        seen: dict[tuple[str, str], int] = {}
        for e in r["engines"]:
            host = str(e["addr"]).rsplit(":", 1)[0]
            seen[(e["name"], host)] = seen.get((e["name"], host), 0) + 1
        c.print("engines connected: " + ", ".join(
            f"{name} from {host} ({n} connections)" for (name, host), n in seen.items()))
    stale = r.get("stale") or []
    if stale:
        c.print(f"stale pieces ({len(stale)}), removed by kvtier gc --stale:")
        for s in stale:
            where = s.get("path") or s.get("key")
            c.print(f"  {s['kind']:<16} {where}  {fmt_bytes(s.get('bytes'))}  {s['reason']}")
    else:
        c.print("stale pieces: none")
    tot = r["totals"]
    if t["kind"] == "shm":
        c.print(f"total: {len(r['regions'])} regions, {fmt_bytes(tot['bytes'])} in memory")
    else:
        c.print(f"total: {tot['namespaces']} namespaces, {_num(tot['blocks'])} blocks, "
                f"{fmt_bytes(tot['bytes'])}")


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _render_du(c: Console, r: dict[str, Any]) -> None:
    for n in r["namespaces"]:
        name = n.get("namespace") or ""
        c.print(f"{fmt_bytes(n['bytes']):>10}  {_num(n['blocks']):>10} blocks  {n['id']}"
                + (f"  {name}" if name else ""))
    for g in r.get("regions") or []:
        c.print(f"{fmt_bytes(g['bytes']):>10}  {g['state']:>17}  {g['name']}")
    c.print(f"{fmt_bytes(r['total_bytes']):>10}  {_num(r['total_blocks']):>10} blocks  total")


def _render_fsck(c: Console, r: dict[str, Any]) -> None:
    c.print(_target(r["target"]))
    rate = fmt_bytes(int(r["read_bytes_per_s"])) + "/s"
    c.print(f"checked {_num(r['records_checked'])} records, {fmt_bytes(r['bytes_read'])} read "
            f"in {r['seconds']:.1f} s ({rate}): {r['records_bad']} bad")
    for b in r["bad"]:
        w = b["where"]
        where = (f"{w['file']} @ {w['offset']}" if "file" in w
                 else f"{w['redis_key']} on {w['node']}")
        key = b["key"][:16] + "…" if b["key"] else "(no key)"
        fix = ""
        if r["repair"]:
            fix = "  [repaired]" if b["repaired"] else f"  [not repaired: {b.get('note', '')}]"
        c.print(f"  bad  key {key}  {b['reason']}  {where}{fix}")
    for s in r["stray"]:
        fix = "  [removed]" if s.get("removed") else (f"  [{s['note']}]" if s.get("note") else "")
        c.print(f"  stray  {s['path']}  {s['reason']}{fix}")
    for s in r["skipped"]:
        c.print(f"  skipped  {s.get('namespace') or ''}  {s['reason']}")
    if r["repair"]:
        c.print(f"repaired {r['repaired']} of {r['records_bad']} bad records")
    elif r["records_bad"] or r["stray"]:
        c.print("run again with --repair to remove them")


def _render_gc(c: Console, r: dict[str, Any]) -> None:
    c.print(_target(r["target"]))
    verb = "would remove" if r["dry_run"] else "removed"
    for x in r["removed"]:
        what = x["kind"].replace("_", " ")
        where = x.get("path") or x["id"]
        if x.get("namespace"):
            where = f"{x['namespace']} ({where})"
        blocks = f"{_num(x['blocks'])} blocks, " if x.get("blocks") else ""
        why = f" ({x['reason']})" if x.get("reason") else ""
        c.print(f"  {verb} {what} {where}: {blocks}{fmt_bytes(x['bytes'])}{why}")
    for s in r["skipped"]:
        c.print(f"  skipped {s['id']}: {s['reason']}")
    c.print(f"{verb}: {_num(r['removed_blocks'])} blocks, {fmt_bytes(r['freed_bytes'])}"
            + (" (dry run: nothing was removed)" if r["dry_run"] else ""))


_RENDERERS = {"inspect": _render_inspect, "du": _render_du, "fsck": _render_fsck, "gc": _render_gc}
