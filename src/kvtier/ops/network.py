"""Operator commands on a Redis / Valkey server or cluster holding network-tier blocks.

Everything a server holds is found with SCAN (every primary of a cluster, each on its own
connection); metadata comes from MEMORY USAGE, OBJECT IDLETIME and PTTL in pipelined round trips,
values from pipelined GETs of about 8 MiB per round trip. ``fsck --repair`` deletes a bad record
only if the key still holds the bytes that were checked (WATCH/MULTI), so a record an engine
rewrites meanwhile is never deleted. ``gc`` deletes with UNLINK; a block an engine reads in the
instant between its age check and its deletion is a miss for that engine, nothing worse.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvtier.format.record import header_size
from kvtier.ops.common import GcPlan, Options, gc_result, schema
from kvtier.ops.target import redact
from kvtier.ops.units import SECOND_EDGES, fmt_bytes, fmt_seconds, histogram
from kvtier.tiers.network.scan import (
    KEY_PREFIX,
    Node,
    Servers,
    block_bytes_of,
    check_value,
    delete_if_unchanged,
    engine_clients,
    fetch_values,
    key_meta,
    namespace_prefix,
    scan_keys,
    server_info,
    split_key,
    unlink,
    value_digest,
    value_lengths,
)

_SAMPLES = 5  # values whose length is read per namespace to learn its block size (CLIENT NO-TOUCH)
_SAMPLES_TOUCHING = 3  # the same where reading a length refreshes the block's recency
_UNRECOGNIZED_SHOWN = 20


def cli_repr(b: bytes) -> str:
    """A key as redis-cli prints it: printable ASCII as is, other bytes as \\xHH."""
    return "".join(chr(c) if 32 <= c < 127 and c not in (34, 92) else f"\\x{c:02x}" for c in b)


@dataclass
class _Ns:
    """What one scan learns about a namespace."""

    fp: str
    blocks: int = 0
    memory: int = 0
    header_bytes: int = 0
    idle: list[int] = field(default_factory=list)
    idle_unknown: int = 0
    ttl: list[int] = field(default_factory=list)
    samples: list[tuple[Node, bytes]] = field(default_factory=list)
    block_bytes: int | None = None
    keys: list[tuple[Node, bytes, int, int | None]] = field(default_factory=list)  # for gc


class RedisOps:
    """The commands on one server or cluster."""

    def __init__(self, url: str, opts: Options) -> None:
        self.url = url
        self.opts = opts
        self.servers = Servers(url, timeout=opts.timeout, password=opts.password)
        self.servers.connect()
        self._bb: dict[str, int | None] = {}

    def target_json(self) -> dict[str, Any]:
        """The ``target`` field."""
        return {"kind": "redis", "url": redact(self.url), "cluster": self.servers.cluster,
                "nodes": [n.name for n in self.servers.nodes]}

    def close(self) -> None:
        """Close the connections."""
        self.servers.close()

    # -- scanning -----------------------------------------------------------------------------
    def _block_bytes(self, fp: str, samples: list[tuple[Node, bytes]]) -> int | None:
        """The block size most sampled values of a namespace hold."""
        if fp in self._bb:
            return self._bb[fp]
        sizes: Counter[int] = Counter()
        for node, rkey in samples:
            (n,) = value_lengths(node, [rkey])
            parts = split_key(rkey)
            if n is not None and parts is not None and block_bytes_of(parts[1], n) > 0:
                sizes[block_bytes_of(parts[1], n)] += 1
        bb = sizes.most_common(1)[0][0] if sizes else None
        self._bb[fp] = bb
        return bb

    def _selected(self, fp: str, node: Node, rkey: bytes) -> bool:
        sel = self.opts.selection
        if not sel:
            return True
        pid = namespace_prefix(bytes.fromhex(fp)).decode()
        if sel.matches(id=pid, fingerprint=fp):
            return True
        return sel.matches(id=pid, fingerprint=fp,
                           block_bytes=self._block_bytes(fp, self._geometry_samples(fp, node, rkey)))

    def _geometry_samples(self, fp: str, node: Node, rkey: bytes) -> list[tuple[Node, bytes]]:
        """``rkey`` and a few more keys of its namespace on ``node``, for a majority vote.

        One damaged value (truncated, or not a string) must not decide a namespace's block size.
        """
        want = self._samples_wanted()
        out = [(node, rkey)]
        for batch in scan_keys(node, namespace_prefix(bytes.fromhex(fp)) + b"*"):
            for k in batch:
                if k != rkey:
                    out.append((node, k))
                if len(out) >= want:
                    return out
        return out

    def _samples_wanted(self) -> int:
        """Values read per namespace to learn its block size (fewer where a read is an access)."""
        return _SAMPLES if self.servers.no_touch else _SAMPLES_TOUCHING

    def _scan(self, *, meta: bool, keep_keys: bool = False,
              geometry: bool = True) -> tuple[dict[str, _Ns], list[bytes]]:
        """Every block key of the selected namespaces, with metadata when ``meta``.

        Idle times are read before anything that could count as an access. ``geometry`` reads
        the length of a few values per namespace (three on servers without CLIENT NO-TOUCH, where
        that read counts as an access) to learn its block size.
        """
        found: dict[str, _Ns] = {}
        skipped: set[str] = set()
        unrecognized: list[bytes] = []
        with self.opts.progress.task("scanning keys", None, unit="keys") as advance:
            for node in self.servers.nodes:
                for batch in scan_keys(node):
                    advance(len(batch))
                    mine: list[tuple[bytes, str, bytes]] = []
                    for rk in batch:
                        parts = split_key(rk)
                        if parts is None:
                            unrecognized.append(rk)
                        elif parts[0] not in skipped:
                            mine.append((rk, *parts))
                    metas = key_meta(node, [m[0] for m in mine]) if meta and mine else None
                    for i, (rk, fp, key) in enumerate(mine):
                        if fp in skipped:
                            continue
                        if fp not in found:
                            if not self._selected(fp, node, rk):
                                skipped.add(fp)
                                continue
                            found[fp] = _Ns(fp)
                        ns = found[fp]
                        if metas is not None and metas[i].memory is None:
                            continue  # deleted since SCAN saw it
                        ns.blocks += 1
                        ns.header_bytes += header_size(len(key))
                        if len(ns.samples) < self._samples_wanted():
                            ns.samples.append((node, rk))
                        if metas is None:
                            if keep_keys:
                                ns.keys.append((node, rk, 0, None))
                            continue
                        m = metas[i]
                        ns.memory += m.memory or 0
                        if m.idle is None:
                            ns.idle_unknown += 1
                        else:
                            ns.idle.append(m.idle)
                        if m.ttl_ms >= 0:
                            ns.ttl.append(m.ttl_ms // 1000)
                        if keep_keys:
                            ns.keys.append((node, rk, m.memory or 0, m.idle))
        for fp, ns in found.items():
            ns.block_bytes = self._block_bytes(fp, ns.samples) if geometry else self._bb.get(fp)
        self.opts.selection.check_all_matched(
            [namespace_prefix(bytes.fromhex(fp)).decode() for fp in found])
        return found, unrecognized

    def _ns_json(self, ns: _Ns, *, full: bool) -> dict[str, Any]:
        bb = ns.block_bytes
        d: dict[str, Any] = {
            "id": namespace_prefix(bytes.fromhex(ns.fp)).decode(), "fingerprint": ns.fp,
            "namespace": self.opts.selection.namespace_for(ns.fp, bb), "lane": None,
            "blocks": ns.blocks, "bytes": ns.memory,
            "data_bytes": ns.header_bytes + ns.blocks * bb if bb is not None else None,
        }
        if not full:
            return d
        d.update({
            "block_bytes": bb,
            "record_bytes": (ns.header_bytes // ns.blocks + bb) if bb is not None and ns.blocks
            else None,
            "capacity_bytes": None, "usage": None, "in_use": None, "engines": [],
            "age": {"unit": "seconds", "source": "OBJECT IDLETIME (time since last access)",
                    "unknown": ns.idle_unknown, "buckets": histogram(ns.idle, SECOND_EDGES)},
            "ttl": {"with_ttl": len(ns.ttl), "buckets": histogram(ns.ttl, SECOND_EDGES)},
        })
        return d

    def _medium(self) -> dict[str, Any]:
        servers = [server_info(n) for n in self.servers.nodes]
        return {"servers": servers, "maxmemory_bytes": sum(s["maxmemory"] for s in servers),
                "used_memory_bytes": sum(s["used_memory"] for s in servers),
                "no_touch": self.servers.no_touch}

    # -- inspect / du -------------------------------------------------------------------------
    def inspect(self) -> dict[str, Any]:
        """Namespaces, blocks, memory, idle-time and TTL histograms, connected engines."""
        found, unrecognized = self._scan(meta=True)
        namespaces = [self._ns_json(ns, full=True) for ns in found.values()]
        stale: list[dict[str, Any]] = [
            {"kind": "unrecognized_key", "key": cli_repr(k), "bytes": 0,
             "reason": f"under {KEY_PREFIX.decode()} but not a block's key; left alone"}
            for k in unrecognized[:_UNRECOGNIZED_SHOWN]]
        engines = [c for n in self.servers.nodes for c in engine_clients(n)]
        return {
            "schema": schema("inspect"), "target": self.target_json(), "medium": self._medium(),
            "namespaces": namespaces, "engines": engines, "stale": stale,
            "unrecognized_keys": len(unrecognized),
            "totals": {"namespaces": len(namespaces),
                       "blocks": sum(n["blocks"] for n in namespaces),
                       "bytes": sum(n["bytes"] for n in namespaces)},
        }

    def du(self) -> dict[str, Any]:
        """Blocks and server memory per namespace."""
        found, _unrecognized = self._scan(meta=True)
        namespaces = [self._ns_json(ns, full=False) for ns in found.values()]
        return {"schema": schema("du"), "target": self.target_json(), "namespaces": namespaces,
                "total_blocks": sum(n["blocks"] for n in namespaces),
                "total_bytes": sum(n["bytes"] for n in namespaces)}

    # -- fsck ---------------------------------------------------------------------------------
    def fsck(self, repair: bool) -> dict[str, Any]:
        """GET and verify every block's record; with ``repair`` delete the bad ones."""
        t0 = time.perf_counter()
        checked = 0
        nbytes = 0
        moved = 0
        bad: list[dict[str, Any]] = []
        skip_fp: set[str] = set()
        ok_fp: set[str] = set()
        with self.opts.progress.task("fsck", None) as advance:
            for node in self.servers.nodes:
                for batch in scan_keys(node):
                    keys: list[bytes] = []
                    for rk in batch:
                        parts = split_key(rk)
                        if parts is None or parts[0] in skip_fp:
                            continue
                        if parts[0] not in ok_fp:
                            if self._selected(parts[0], node, rk):
                                ok_fp.add(parts[0])
                            else:
                                skip_fp.add(parts[0])
                                continue
                        keys.append(rk)
                    for rk, val in fetch_values(node, keys):
                        fp, key = split_key(rk) or ("", b"")
                        digest: int | None
                        reason: str | None
                        if val is None:
                            continue  # deleted since SCAN saw it
                        if isinstance(val, Exception):
                            text = str(val)
                            if text.startswith(("MOVED", "ASK")):
                                moved += 1
                                continue
                            if not text.startswith("WRONGTYPE"):
                                raise val
                            reason, named, digest = "not a string value", None, None
                        else:
                            nbytes += len(val)
                            advance(len(val))
                            reason, named = check_value(bytes.fromhex(fp), key, val)
                            digest = value_digest(val) if reason else 0
                        checked += 1
                        if reason is None:
                            continue
                        entry: dict[str, Any] = {
                            "key": key.hex(), "reason": reason,
                            "namespace": namespace_prefix(bytes.fromhex(fp)).decode(),
                            "where": {"node": node.name, "redis_key": cli_repr(rk)},
                            "repaired": False,
                        }
                        if named is not None and named != key:
                            entry["header_key"] = named.hex()
                        if repair:
                            entry["repaired"] = delete_if_unchanged(node, rk, digest)
                            entry["note"] = "deleted" if entry["repaired"] else \
                                "the key changed since it was read (or is gone): left alone"
                        bad.append(entry)
        self.opts.selection.check_all_matched(
            [namespace_prefix(bytes.fromhex(fp)).decode() for fp in ok_fp | skip_fp])
        secs = time.perf_counter() - t0
        out: dict[str, Any] = {
            "schema": schema("fsck"), "target": self.target_json(), "repair": repair,
            "records_checked": checked, "records_bad": len(bad), "bad": bad,
            "repaired": sum(1 for b in bad if b.get("repaired")),
            "stray": [], "skipped": [],
            "bytes_read": nbytes, "seconds": secs,
            "read_bytes_per_s": nbytes / secs if secs > 0 else 0.0,
            "no_touch": self.servers.no_touch,
        }
        if moved:
            out["skipped"].append({"namespace": None, "reason": f"{moved} keys moved to another "
                                   "node while the cluster was read (resharding); run again"})
        return out

    # -- gc -----------------------------------------------------------------------------------
    def gc(self, plan: GcPlan) -> dict[str, Any]:
        """Drop namespaces, blocks idle longer than an age, blocks beyond a size per namespace."""
        from kvtier.ops.units import UsageError

        if plan.older_than_writes is not None:
            raise UsageError("--older-than-writes: Redis blocks age in time; use --older-than "
                             "DURATION (time since last access)")
        removed: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        if not (plan.drop or plan.older_than_s is not None or plan.shrink_to is not None):
            return gc_result(self.target_json(), plan, removed, skipped)  # --stale: nothing here
        found, _unrecognized = self._scan(meta=True, keep_keys=True, geometry=False)
        for ns in found.values():
            nid = namespace_prefix(bytes.fromhex(ns.fp)).decode()
            doomed: list[tuple[Node, bytes, int, int | None]] = []
            why: list[str] = []
            rest = ns.keys
            if plan.drop:
                doomed, rest = rest, []
                why.append("dropped")
            if plan.older_than_s is not None:
                if any(k[3] is None for k in rest):
                    skipped.append({"id": nid, "reason": "idle time not tracked for some keys "
                                    "(an LFU maxmemory-policy?): those are kept"})
                old = [k for k in rest if k[3] is not None and k[3] >= plan.older_than_s]
                rest = [k for k in rest if k[3] is None or k[3] < plan.older_than_s]
                doomed += old
                why.append(f"idle {fmt_seconds(plan.older_than_s)} or longer")
            if plan.shrink_to is not None:
                size = sum(k[2] for k in rest)
                rest.sort(key=lambda k: -(k[3] or 0))  # most idle first
                i = 0
                while size > plan.shrink_to and i < len(rest):
                    size -= rest[i][2]
                    i += 1
                doomed += rest[:i]
                why.append(f"beyond {fmt_bytes(plan.shrink_to)} of server memory, most idle first")
            if not doomed:
                continue
            count = len(doomed)
            if not plan.dry_run:
                by_node: dict[str, tuple[Node, list[bytes]]] = {}
                for node, rk, _mem, _idle in doomed:
                    by_node.setdefault(node.name, (node, []))[1].append(rk)
                count = sum(unlink(node, rks) for node, rks in by_node.values())
            removed.append({"kind": "namespace" if plan.drop else "blocks", "id": nid,
                            "blocks": count, "bytes": sum(k[2] for k in doomed),
                            "reason": "; ".join(why)})
        return gc_result(self.target_json(), plan, removed, skipped)
