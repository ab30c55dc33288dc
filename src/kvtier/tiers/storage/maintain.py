"""Work on a namespace directory that only an engine alone there may do (exclusive ``lock``).

* ``adopt_single_engine_layout``: a directory written by the single-engine layout (slab files,
  ``intent-NN`` files, no ``POOL``; and ``<fingerprint>.N/`` directories of second engines)
  becomes regions with logs. Its slab files keep their slots in place; the records are found by
  reading their headers, the slots named by intent files (writes in flight when that engine
  ended) are verified in full and dropped when torn, and a key found twice keeps its newest copy.
* ``resize``: a new ``capacity_bytes`` with nobody else attached: regions beyond it are removed,
  a region that got smaller is cut.

``set_up_alone`` decides which applies and writes the ``POOL`` file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass

from kvtier.tiers.base import TierContext
from kvtier.tiers.storage import log as ilog
from kvtier.tiers.storage import slab_scan
from kvtier.tiers.storage.layout import (
    Geometry,
    LocksUnsupported,
    log_name,
    parse_slab_name,
    read_legacy_intents,
    read_pool,
    slab_name,
    slot_size_for,
    try_lock,
    write_pool,
)
from kvtier.tiers.storage.slab import SlabStore

log = logging.getLogger("kvtier.tiers.storage")


def set_up_alone(root: str, directory: str, ctx: TierContext, capacity: int, slab_bytes: int, *,
                 fsync: str, direct: bool) -> dict[str, float]:
    """Alone on ``directory``: write its geometry for ``capacity``, adopting the single-engine
    layout or fitting the regions to a new capacity first; returns counters for the stats."""
    counters: dict[str, float] = {}
    fp_hex = ctx.namespace_fp.hex()
    lanes = sorted(os.path.join(root, n) for n in os.listdir(root)
                   if n.startswith(fp_hex + ".") and n.rsplit(".", 1)[-1].isdigit())
    legacy_spr = slab_bytes // slot_size_for(ctx.block_bytes)  # what the earlier layout used
    try:
        old = read_pool(directory)
    except ValueError as e:
        log.warning("storage directory %s: POOL is unusable (%s); setting it up again", directory, e)
        old = None
    if old is None and os.path.exists(os.path.join(directory, "POOL")):
        geo = Geometry.plan(capacity, ctx.block_bytes, slab_bytes,
                            legacy_spr if slab_files(directory) else None)
        resize(directory, geo)
    elif old is None:
        legacy = is_single_engine_layout(directory, lanes)
        geo = Geometry.plan(capacity, ctx.block_bytes, slab_bytes, legacy_spr if legacy else None)
        if legacy:
            res = adopt_single_engine_layout(directory, lanes, geo, namespace_fp=ctx.namespace_fp,
                                             direct=direct, fsync=fsync)
            counters.update(start_verified=res.verified, start_invalidated=res.torn)
    else:
        geo = Geometry.plan(capacity, ctx.block_bytes, slab_bytes,
                            old.slots_per_region if slab_files(directory) else None)
        if geo != old:
            resize(directory, geo)
    if geo != old:
        write_pool(directory, geo)
    for name in os.listdir(directory):
        if name.endswith(".new") or name.startswith(".direct-probe"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
    return counters


@dataclass
class Adopted:
    """What adopting a single-engine-layout directory found."""

    blocks: int = 0
    verified: int = 0
    torn: int = 0
    dropped_files: int = 0


def slab_files(directory: str) -> dict[int, str]:
    """Slab files of a directory by number."""
    out: dict[int, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            n = parse_slab_name(name)
            if n is not None:
                out[n] = os.path.join(directory, name)
    return out


def is_single_engine_layout(directory: str, lanes: list[str]) -> bool:
    """True for a directory the single-engine layout wrote (no POOL, data or lanes present)."""
    if os.path.exists(os.path.join(directory, "POOL")):
        return False
    names = os.listdir(directory)
    return bool(lanes) or any(n.startswith(("slab-", "intent-")) for n in names)


def adopt_single_engine_layout(directory: str, lanes: list[str], geo: Geometry, *,
                               namespace_fp: bytes, direct: bool, fsync: str) -> Adopted:
    """Turn a single-engine-layout directory into regions with logs (see the module docstring)."""
    spr = geo.slots_per_region
    res = Adopted()
    placed = slab_files(directory)
    suspects: dict[int, set[int]] = {}
    for g in read_legacy_intents(directory):
        suspects.setdefault(g // spr, set()).add(g % spr)
    for lane in lanes:
        _merge_lane(directory, lane, geo, placed, suspects, res)
    for r, path in list(placed.items()):
        if r >= geo.regions:  # beyond the capacity given now
            os.unlink(path)
            del placed[r]
            res.dropped_files += 1
    store = SlabStore(directory, geo, namespace_fp=namespace_fp, direct=direct, fsync=fsync)
    try:
        found: dict[bytes, tuple[int, int]] = {}
        for r in sorted(placed):
            store.truncate_region(r, geo.slots_in(r))
            n = store.allocated_slots(r)
            base = geo.base(r)
            sus = suspects.get(r, set())
            for rec in slab_scan.scan(store, r, n):
                if rec.slot - base in sus:
                    res.verified += 1
                    if not slab_scan.verify_slot(store, rec.slot):
                        res.torn += 1
                        continue
                ik = ilog.index_key(rec.key)
                prev = found.get(ik)
                if prev is None or prev[1] < rec.seq:
                    found[ik] = (rec.slot, rec.seq)
        per_region: dict[int, list[tuple[int, int, int, int, bytes]]] = {r: [] for r in placed}
        for ik, (slot, seq) in found.items():
            per_region[slot // spr].append((ilog.PUT, slot % spr, 0, seq, ik))
        for r, entries in per_region.items():
            entries.sort(key=lambda e: e[3])
            w = ilog.LogWriter.create(os.path.join(directory, log_name(r)), r, geo.log_size(r),
                                      entries, sync=True)
            w.close()
        res.blocks = len(found)
    finally:
        store.close()
    for name in os.listdir(directory):
        if name.startswith("intent-"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
    log.warning(
        "storage directory %s: adopted from the single-engine layout: %d blocks in %d slab "
        "files (%d records checked for torn writes, %d torn; %d files beyond the capacity removed)",
        directory, res.blocks, len(placed), res.verified, res.torn, res.dropped_files)
    return res


def _merge_lane(directory: str, lane: str, geo: Geometry, placed: dict[int, str],
                suspects: dict[int, set[int]], res: Adopted) -> None:
    """Move a second engine's ``<fingerprint>.N`` slab files into free region numbers."""
    spr = geo.slots_per_region
    lock = os.path.join(lane, "lock")
    if os.path.exists(lock):
        fd = os.open(lock, os.O_RDWR)
        try:
            if not try_lock(fd):
                log.warning("storage directory %s: %s is in use by an engine of an earlier "
                            "kvtier version; left as it is", directory, lane)
                return
        except LocksUnsupported:
            pass
        finally:
            os.close(fd)
    lane_intents: dict[int, set[int]] = {}
    for g in read_legacy_intents(lane):
        lane_intents.setdefault(g // spr, set()).add(g % spr)
    free = (r for r in range(geo.regions) if r not in placed)
    for idx, path in sorted(slab_files(lane).items()):
        r = next(free, None)
        if r is None:
            os.unlink(path)
            res.dropped_files += 1
            continue
        dest = os.path.join(directory, slab_name(r))
        os.rename(path, dest)
        placed[r] = dest
        if idx in lane_intents:
            suspects.setdefault(r, set()).update(lane_intents[idx])
    shutil.rmtree(lane, ignore_errors=True)


def resize(directory: str, new: Geometry) -> None:
    """Fit the regions on disk to ``new``: drop the files of regions beyond it, and cut a
    region whose slab file holds more slots than it may now (its file and its log)."""
    dropped = 0
    for name in os.listdir(directory):
        r = parse_slab_name(name)
        if r is None and name.startswith("log-"):
            with contextlib.suppress(ValueError):
                r = int(name[4:9])
        if r is not None and r >= new.regions:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                dropped += name.startswith("slab-")
    for r in range(new.regions):  # a region whose file is longer than it may be now is cut
        path = os.path.join(directory, slab_name(r))
        keep = new.slots_in(r)
        if not os.path.exists(path) or os.path.getsize(path) <= keep * new.slot_size:
            continue
        got = ilog.LogTail(os.path.join(directory, log_name(r))).read()
        held: dict[int, tuple[bytes, int]] = {}
        for kind, slot, _aux, value, key in got[1] if got else []:
            if kind == ilog.PUT:
                held[slot] = (key, value)
            elif kind == ilog.DEL:
                held.pop(slot, None)
        entries = [(ilog.PUT, i, 0, seq, k) for i, (k, seq) in sorted(held.items()) if i < keep]
        ilog.LogWriter.create(os.path.join(directory, log_name(r)), r, new.log_size(r), entries,
                              sync=True).close()
        os.truncate(path, keep * new.slot_size)
    log.info("storage directory %s: %d regions for a capacity of %d bytes (%d slab files "
             "removed)", directory, new.regions, new.capacity_bytes, dropped)
