"""The storage tier's store chunks: records written, then named by the logs.

A store chunk (a task of :class:`kvtier.tiers.storage.io.IOPool`) logs a DEL for every slot
whose old record it is about to overwrite, writes the records (each run of adjacent slots of one
region, up to ``MERGE_BYTES`` of payload, with one ``pwritev``; with the native record I/O every
run of the chunk in one call), then logs a PUT for each record written: a record is named by a
log only while it is whole. Its time queued, writing records (header, checksum and
``pwritev``), appending to the logs and in the rest goes to the tier's ``store_*_seconds``.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING, Any

from kvtier.tiers.storage import log as ilog

if TYPE_CHECKING:
    from kvtier.tiers.storage.io import IOPool, Task

log = logging.getLogger("kvtier.tiers.storage")

#: adjacent records: one pwritev up to this many payload bytes
MERGE_BYTES = 1 << 20


def run_store(pool: IOPool, task: Task, hdr: Any) -> None:
    t_pick = time.perf_counter()
    t_log = 0.0
    sh = pool.sh
    assert sh is not None and task.job is not None
    store, index, primary, geo = sh.store, sh.index, sh.primary, sh.geo
    items = task.items
    err: OSError | None = None
    with index.lock:
        seq0 = sh.seq
        sh.seq += len(items)
        regs = {index.region_of(s): index.regions[index.region_of(s)] for _, _, s, _ in items}
    # 1. the old records of reused slots leave the log before they are overwritten
    failed_items: list[tuple[bytes, int]] = []
    ok_items: list[tuple[bytes, int, int, int]] = []  # key, primary slot, slot, seq
    for r, reg in regs.items():
        base = geo.base(r)
        mine = [(k, ps, s, old, seq0 + i) for i, (k, ps, s, old) in enumerate(items)
                if s // geo.slots_per_region == r]
        dels = [s for _k, _ps, s, old, _q in mine if old]
        if dels:
            def forget(dels: list[int] = dels) -> None:
                for s in dels:
                    index.slots.pop(s, None)

            t0 = time.perf_counter()
            try:
                sh.append(reg, [(ilog.DEL, s - base, 0, 0, b"") for s in dels], forget)
            except OSError as e:
                err = e
                failed_items.extend((k, s) for k, _ps, s, _o, _q in mine)
                continue
            finally:
                t_log += time.perf_counter() - t0
        ok_items.extend((k, ps, s, q) for k, ps, s, _o, q in mine)
    # 2. the records
    done: list[tuple[bytes, int, int]] = []
    written: set[int] = set()
    t_write = time.perf_counter()
    runs = pool._runs(ok_items, MERGE_BYTES) if ok_items else []  # adjacent: one pwritev
    results = store.write_runs([(run[0][2], [(k, memoryview(primary[ps]), q)
                                              for k, ps, _s, q in run]) for run in runs], hdr)
    for run, result in zip(runs, results):
        if isinstance(result, OSError):
            err = result
            failed_items.extend((k, s) for k, _ps, s, _q in run)
        else:
            written.add(result)
            done.extend((k, s, q) for k, _ps, s, q in run)
    t_write = time.perf_counter() - t_write
    if done and sh.fsync == "batch":
        try:
            store.sync_regions(written)
        except OSError as e:
            err = e
            failed_items.extend((k, s) for k, s, _q in done)
            done = []
    if err is not None and err.errno == errno.ENOSPC:
        shrink_to_fit(pool, [s for _, s in failed_items])
    # 3. the log names them; they become loadable here
    stored: list[tuple[bytes, int, int]] = []
    for r, reg in regs.items():
        mine_done = [(k, s, q) for k, s, q in done if s // geo.slots_per_region == r]
        if not mine_done:
            continue

        def publish(mine_done: list[tuple[bytes, int, int]] = mine_done) -> None:
            for key, s, seq in mine_done:
                index.slots[s] = (ilog.index_key(key), seq)

        base = geo.base(r)
        t0 = time.perf_counter()
        try:
            sh.append(reg, [(ilog.PUT, s - base, 0, q, k) for k, s, q in mine_done], publish,
                      sync=sh.sync_logs)
            stored.extend(mine_done)
        except OSError as e:
            err = e
            failed_items.extend((k, s) for k, s, _q in mine_done)
        t_log += time.perf_counter() - t0
    stored.sort(key=lambda x: x[2])  # the job's order: the last key stored is the newest
    with index.lock:
        own, writing, remote = index.own, index.writing, index.remote
        for key, s, _seq in stored:  # loadable here from now on
            ik = ilog.index_key(key)
            if len(key) > ilog.KEY_INLINE:
                index.full_keys[ik] = key
            writing.pop(ik, None)
            own[ik] = s
            if ik not in remote:
                index._event(ik, False)
        for key, s in failed_items:
            index.writing.pop(ilog.index_key(key), None)
            index.free_slot(s)
        for _k, _ps, s, _o in items:
            index.regions[index.region_of(s)].writing -= 1
    sh.count(bytes_written=len(stored) * store.block_bytes, store_failures=len(failed_items),
             store_chunks=1, store_wait_seconds=t_pick - task.queued,
             store_write_seconds=t_write, store_log_seconds=t_log,
             store_other_seconds=time.perf_counter() - t_pick - t_write - t_log)
    if err is not None:
        sh.write_health.record_failure(err)
    elif stored:
        sh.write_health.record_success()
    pool.finish_chunk(task.job, {k for k, _ in failed_items}, len(stored) * store.block_bytes)

def shrink_to_fit(pool: IOPool, slots: list[int]) -> None:
    """The file system is full: from now on, stay within the file space already allocated.

    The region that found no space keeps below that slot; the others stop growing. Slots
    given up this way come back when the file system has room again (``regrow``).
    """
    sh = pool.sh
    if not slots or sh is None:
        return
    index, geo = sh.index, sh.geo
    with index.lock:
        before = index.usable_slots()
        for s in slots:
            reg = index.regions.get(index.region_of(s))
            if reg is not None:
                reg.limit = min(reg.limit, s - geo.base(reg.region))
        for reg in index.regions.values():
            reg.limit = min(reg.limit, reg.fresh)
            sh.store.limits[reg.region] = reg.limit
        after = index.usable_slots()
    if after < before:
        log.warning("tier %s: file system full; keeping to %d blocks (%d bytes) from now on",
                    sh.name, after, after * geo.slot_size)
