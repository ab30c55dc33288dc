"""Joining a namespace directory: what an engine does before its storage tier serves anything.

1. Take the membership ``lock``: exclusively when no other engine is there (then it may adopt
   the single-engine layout or apply a new ``capacity_bytes``, see ``maintain``), else shared;
   an engine that holds it exclusively for longer than a short wait is of an earlier version.
2. Read the region geometry (``POOL``), probe O_DIRECT and the file system's type.
3. Create this engine's presence file and run a first sync pass: every region log is read, the
   regions nobody holds are claimed (with their blocks), so lookups answer at once.

Where flock is not implemented, the engine that creates the ``writer`` file does step 1's work
and writes; the others read (see ``fleet.NoLocks``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.policies.base import EvictionPolicy
from kvtier.tiers.base import Health, TierContext
from kvtier.tiers.storage.fleet import Fleet, NoLocks
from kvtier.tiers.storage.index import BlockIndex
from kvtier.tiers.storage.layout import (
    ALIGN,
    Geometry,
    LocksUnsupported,
    fs_type,
    is_network_fs,
    read_pool,
    slot_size_for,
    try_lock,
    write_namespace_file,
)
from kvtier.tiers.storage.maintain import set_up_alone
from kvtier.tiers.storage.shared import Shared
from kvtier.tiers.storage.slab import SlabStore, probe_direct_io

log = logging.getLogger("kvtier.tiers.storage")


@dataclass
class JoinSpec:
    """What joining needs to know of the tier."""

    name: str
    root: str
    directory: str
    ctx: TierContext
    capacity_bytes: int
    auto_capacity: bool  # the capacity was measured, not given: no warning when it differs
    capacity_alone: Callable[[], int]  # the capacity to set the directory up with
    slab_bytes: int
    fsync: str
    direct_io: str | bool
    sync_seconds: float
    engine_id: int
    read_health: Health
    write_health: Health
    base_stats: dict[str, float]
    wait_s: float  # how long to wait for an engine that holds the directory alone
    # builds the eviction policy over this engine's own blocks from the directory's slot
    # count; None: plain LRU
    policy_factory: Callable[[int], EvictionPolicy[bytes]] | None = None
    native_io: bool = True  # the slab store may use the native record I/O


@dataclass
class Joined:
    """An open directory: shared state, the sync machinery, the membership lock."""

    sh: Shared
    fleet: Fleet
    lock_fd: int
    fs_type: str


def join_directory(spec: JoinSpec) -> Joined:
    """Join ``spec.directory`` (see the module docstring); raises OSError."""
    ctx = spec.ctx
    directory = spec.directory
    os.makedirs(directory, exist_ok=True)
    lock_fd = os.open(os.path.join(directory, "lock"), os.O_CREAT | os.O_RDWR, 0o644)
    store: SlabStore | None = None
    fleet: Fleet | None = None
    try:
        nolocks: NoLocks | None = None
        try:
            alone = try_lock(lock_fd)
        except LocksUnsupported as e:
            nolocks = NoLocks(directory, spec.engine_id, max(30.0, 10 * spec.sync_seconds))
            alone = nolocks.try_become_writer() and read_pool(directory) is None
            log.warning(
                "tier %s: %s (%s on %s): one engine writes the directory, the others only "
                "read it; this engine %s", spec.name, e.strerror, fs_type(directory) or "?",
                directory, "writes" if nolocks.writer else "reads")
        if not alone and nolocks is None:
            _hold_shared(lock_fd, directory, spec.wait_s)
        kind = fs_type(directory)
        direct = spec.direct_io
        if direct == "auto":  # probed beside the namespace directory, not counted in it
            direct = ctx.block_bytes % ALIGN == 0 and probe_direct_io(spec.root)
        write_namespace_file(directory, ctx.namespace, ctx.namespace_fp.hex(), ctx.block_bytes,
                             slot_size_for(ctx.block_bytes))
        adopted: dict[str, float] = {}
        if alone:
            adopted = set_up_alone(spec.root, directory, ctx, spec.capacity_alone(),
                                   spec.slab_bytes, fsync=spec.fsync, direct=bool(direct))
            if nolocks is None:
                _hold_shared(lock_fd, directory, spec.wait_s)
        geo = _read_pool(directory)
        if geo is None:
            raise OSError(errno.EAGAIN, "the directory is being set up by another engine",
                          directory)
        if geo.capacity_bytes != spec.capacity_bytes and not spec.auto_capacity:
            log.warning("tier %s: capacity_bytes %d differs from the %d the engines on %s "
                        "share; using %d (all engines must stop to change it)", spec.name,
                        spec.capacity_bytes, geo.capacity_bytes, directory, geo.capacity_bytes)
        if geo.total_slots == 0:
            log.warning("tier %s: capacity_bytes=%d holds no block of %d bytes (plus metadata)",
                        spec.name, geo.capacity_bytes, ctx.block_bytes)
        store = SlabStore(directory, geo, namespace_fp=ctx.namespace_fp, direct=bool(direct),
                          fsync=spec.fsync, native_io=spec.native_io)
        sh = Shared(
            name=spec.name, directory=directory, geo=geo, store=store,
            index=BlockIndex(geo, spec.engine_id, None if spec.policy_factory is None
                             else spec.policy_factory(max(1, geo.total_slots))),
            engine_id=spec.engine_id, fsync=spec.fsync,
            network_fs=is_network_fs(kind), primary=ctx.primary,
            read_health=spec.read_health, write_health=spec.write_health,
            stats=dict(spec.base_stats),
        )
        sh.count(**adopted)
        fleet = Fleet(sh, sync_seconds=spec.sync_seconds, nolocks=nolocks)
        fleet.join()
        fleet.sync(first=True)
    except BaseException:
        if fleet is not None:
            fleet.leave()
        if store is not None:
            store.close()
        os.close(lock_fd)
        raise
    return Joined(sh, fleet, lock_fd, kind)


def _read_pool(directory: str) -> Geometry | None:
    """The directory's geometry (OSError when its POOL file cannot be used)."""
    try:
        return read_pool(directory)
    except ValueError as e:
        raise OSError(errno.EINVAL, f"POOL file unusable ({e}); an engine alone on the "
                      "directory writes it again", directory) from None


def _hold_shared(lock_fd: int, directory: str, wait_s: float) -> None:
    """Hold the membership lock shared, waiting up to ``wait_s`` for an engine that holds it
    alone."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        if try_lock(lock_fd, shared=True):
            return
        if time.monotonic() > deadline:
            raise OSError(errno.EBUSY, "another engine holds the directory alone (an engine "
                          "of an earlier kvtier version, or one adopting or resizing it)",
                          directory)
        time.sleep(0.02)
