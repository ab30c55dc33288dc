"""The ``storage`` tier (and vLLM's ``fs`` alias): blocks in slab files, shared by every engine
that uses the same directory and namespace.

The scheduler thread owns the decisions: ``lookup`` answers from the in-memory index (this
engine's blocks and those the other engines' logs announced), and ``submit_store`` picks (and,
at capacity, evicts for) the slot of every new block in a region this engine owns, so capacity
is enforced before any byte is written. The I/O threads (``io``) do the copying (one
``pwritev`` per stored block; loads read adjacent records together, in prefix order, and report
blocks as they are verified: ``poll_loaded``); the sync thread (``fleet``) follows the other engines and
shares the capacity with them. ``layout`` says what is on disk and why it stays bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from kvtier.config import ConfigError, optional_float, require_bool, require_int, require_str
from kvtier.policies import resolve_policy
from kvtier.tiers.base import (
    Completions,
    Health,
    SecondaryTier,
    TierContext,
    TierEvent,
    TierJobResult,
)
from kvtier.tiers.storage import log as ilog
from kvtier.tiers.storage.fleet import Fleet
from kvtier.tiers.storage.io import IOPool
from kvtier.tiers.storage.join import JoinSpec, join_directory
from kvtier.tiers.storage.layout import (
    ALIGN,
    Geometry,
    dir_usage,
)
from kvtier.tiers.storage.shared import Shared
from kvtier.tiers.storage.slab import MAX_KEY_BYTES, SlabStore

log = logging.getLogger("kvtier.tiers.storage")

_JOIN_WAIT_S = 2.0  # how long to wait for an engine that is adopting or resizing the directory


class StorageTier(SecondaryTier):
    """Blocks as checksummed records in slab files under ``path`` (bounded by ``capacity_bytes``),
    shared with every engine that uses the same ``path`` and namespace."""

    #: after the file system filled up, how often (seconds) to look for room to grow back
    REGROW_CHECK_S = 5.0

    medium = "STORAGE"
    PARAMS: ClassVar[Mapping[str, str] | None] = {
        "path": "directory for the tier's files (created if missing)",
        "capacity_bytes": "bytes the namespace directory may occupy, files and metadata, "
                          "all engines together",
        "n_read_threads": "I/O threads that serve loads (and stores of blocks of 1 MiB or more)",
        "n_write_threads": "I/O threads that serve stores first",
        "direct_io": '"auto", true or false',
        "fsync": '"none", "batch" or "always"',
        "slab_bytes": "most bytes of one region's slab file",
        "sync_seconds": "how often to read what other engines stored, and rebalance with them",
        "eviction_policy": 'which of its own blocks this engine evicts: "lru" (default), "arc", '
                           '"chain", "adaptive" or a registered policy name',
        "native_io": "move runs of records with the native record I/O where it is built (true) "
                     "or always in Python (false)",
    }
    ALIASES: ClassVar[Mapping[str, str]] = {"root_dir": "path"}
    DEFAULTS: Mapping[str, Any] = {
        "n_read_threads": 8,
        "n_write_threads": 8,
        "direct_io": "auto",
        "fsync": "none",
        "slab_bytes": 1 << 30,
        "sync_seconds": 1.0,
        "eviction_policy": "lru",
        "native_io": True,
    }
    capacity_required = True

    @classmethod
    def validate_params(cls, params: Mapping[str, Any], label: str) -> dict[str, Any]:
        out = super().validate_params(params, label)
        path = out.get("path")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ConfigError(f"{label}.path", "a directory path (string, required)", path)
        out["path"] = os.fspath(path)
        if cls.capacity_required or out.get("capacity_bytes") is not None:
            out["capacity_bytes"] = require_int(out, "capacity_bytes", label=f"{label}.capacity_bytes")
        for k in ("n_read_threads", "n_write_threads"):
            out[k] = require_int(out, k, default=cls.DEFAULTS[k], label=f"{label}.{k}")
            if out[k] > 256:
                raise ConfigError(f"{label}.{k}", "an integer between 1 and 256", out[k])
        dio = out.get("direct_io", cls.DEFAULTS["direct_io"])
        if isinstance(dio, str) and dio.lower() in ("true", "false"):
            dio = dio.lower() == "true"
        if dio not in ("auto", True, False) or dio in (0, 1) and not isinstance(dio, bool):
            raise ConfigError(f"{label}.direct_io", '"auto", true or false', dio)
        out["direct_io"] = dio
        out["fsync"] = require_str(
            out, "fsync", default=cls.DEFAULTS["fsync"], label=f"{label}.fsync",
            choices=("none", "batch", "always"),
        )
        out["slab_bytes"] = require_int(
            out, "slab_bytes", default=cls.DEFAULTS["slab_bytes"], minimum=1 << 20,
            label=f"{label}.slab_bytes",
        )
        sync = optional_float(out, "sync_seconds", cls.DEFAULTS["sync_seconds"],
                              label=f"{label}.sync_seconds")
        assert sync is not None
        if sync > 3600:
            raise ConfigError(f"{label}.sync_seconds", "a number > 0 and at most 3600", sync)
        out["sync_seconds"] = sync
        policy = require_str(out, "eviction_policy", default=cls.DEFAULTS["eviction_policy"],
                             label=f"{label}.eviction_policy")
        resolve_policy(policy, key=f"{label}.eviction_policy")
        out["eviction_policy"] = policy
        out["native_io"] = require_bool(out, "native_io", cls.DEFAULTS["native_io"],
                                        label=f"{label}.native_io")
        return out

    @staticmethod
    def capacity_for(blocks: int, block_bytes: int, slab_bytes: int = 1 << 30) -> int:
        """The smallest ``capacity_bytes`` that holds ``blocks`` blocks of ``block_bytes`` (with
        every record header, region log and metadata file counted)."""
        return Geometry.capacity_for(blocks, block_bytes, slab_bytes)

    def __init__(
        self,
        ctx: TierContext,
        path: str,
        capacity_bytes: int | None = None,
        n_read_threads: int = 8,
        n_write_threads: int = 8,
        direct_io: str | bool = "auto",
        fsync: str = "none",
        slab_bytes: int = 1 << 30,
        sync_seconds: float = 1.0,
        eviction_policy: str = "lru",
        native_io: bool = True,
    ) -> None:
        super().__init__(
            ctx, path=path, capacity_bytes=capacity_bytes, n_read_threads=n_read_threads,
            n_write_threads=n_write_threads, direct_io=direct_io, fsync=fsync, slab_bytes=slab_bytes,
            sync_seconds=sync_seconds, eviction_policy=eviction_policy, native_io=native_io,
        )
        self.eviction_policy = eviction_policy
        self.native_io = bool(native_io)
        self.root = os.path.abspath(path)
        self.directory = os.path.join(self.root, ctx.namespace_fp.hex())
        self.capacity_bytes = self._resolve_capacity(capacity_bytes)
        self.n_read_threads = n_read_threads
        self.n_write_threads = n_write_threads
        self.direct_io_setting = direct_io
        self.fsync = fsync
        self.slab_bytes = slab_bytes
        self.sync_seconds = float(sync_seconds)
        if direct_io is True and ctx.block_bytes % ALIGN:
            raise ConfigError(
                f"{ctx.name}.direct_io",
                f"false or \"auto\": blocks of {ctx.block_bytes} bytes are not a multiple of {ALIGN}",
                direct_io,
            )
        self.engine_id = secrets.randbits(64) | 1
        self._read_health = Health(f"{self.name} (reads)")
        self._write_health = Health(f"{self.name} (writes)")
        self._sh: Shared | None = None
        self._fleet: Fleet | None = None
        self._lock_fd = -1
        self._open_error: str | None = None
        self._opening = False
        self._retrying = False
        self._regrowing = False
        self._next_regrow = 0.0
        self._in_flight = 0
        self._closed = False
        self.direct = False
        self._base_stats: dict[str, float] = {
            "hits": 0, "misses": 0, "lookup_hits": 0, "bytes_read": 0, "bytes_written": 0,
            "load_failures": 0, "store_failures": 0, "corrupt": 0, "evictions": 0,
            "recency_refreshes": 0, "start_verified": 0, "start_invalidated": 0,
            "index_rebuild_seconds": 0.0, "stale_misses": 0, "remote_hits": 0, "claims": 0,
            "releases": 0, "adopted_blocks": 0, "log_rewrites": 0, "sync_passes": 0,
            "sync_failures": 0, "regions_rebuilt": 0, "load_chunks": 0, "load_wait_seconds": 0.0,
            "load_read_seconds": 0.0, "load_check_seconds": 0.0, "load_other_seconds": 0.0,
            "store_chunks": 0, "store_wait_seconds": 0.0, "store_write_seconds": 0.0,
            "store_log_seconds": 0.0, "store_other_seconds": 0.0,
        }
        self._done = Completions()
        self._io = IOPool(self.name, n_read_threads, n_write_threads, self._done,
                          {"open": self._run_open, "regrow": self._run_regrow})
        self._io.refresh_window = self._refresh_window_locked
        try:
            self._open()
        except OSError as e:
            self._open_failed(e)
        self._retrying = True

    # -- start -----------------------------------------------------------------------------
    def _resolve_capacity(self, capacity_bytes: int | None) -> int:
        assert capacity_bytes is not None
        return capacity_bytes

    def _capacity_alone(self) -> int:
        """The capacity to set up the directory with (``fs`` without capacity_bytes measures)."""
        return self.capacity_bytes

    def _open_failed(self, e: OSError) -> None:
        self._open_error = str(e)
        self._read_health.record_failure(e)
        self._write_health.record_failure(e)

    def _open(self) -> None:
        """Join the namespace directory (see ``join``); raises OSError."""
        t0 = time.perf_counter()
        j = join_directory(JoinSpec(
            name=self.name, root=self.root, directory=self.directory, ctx=self.ctx,
            capacity_bytes=self.capacity_bytes, auto_capacity=getattr(self, "_auto_capacity", False),
            capacity_alone=self._capacity_alone, slab_bytes=self.slab_bytes, fsync=self.fsync,
            direct_io=self.direct_io_setting, sync_seconds=self.sync_seconds,
            engine_id=self.engine_id, read_health=self._read_health,
            write_health=self._write_health, base_stats=self._base_stats,
            wait_s=_JOIN_WAIT_S if not self._retrying else 0.05,
            policy_factory=(None if self.eviction_policy == "lru"
                            else resolve_policy(self.eviction_policy)),
            native_io=self.native_io,
        ))
        sh, fleet, geo = j.sh, j.fleet, j.sh.geo
        sh.stats["index_rebuild_seconds"] = time.perf_counter() - t0
        self._read_health.record_success()  # before the tier shows as open
        self._write_health.record_success()
        self.capacity_bytes = geo.capacity_bytes
        self._lock_fd = j.lock_fd
        self.direct = sh.store.direct
        self._sh = sh
        self._fleet = fleet
        self._io.sh = sh
        self._open_error = None
        fleet.start()
        with sh.index.lock:
            blocks = len(sh.index.own) + len(sh.index.remote)
            owned = len(sh.index.regions)
        log.info(
            "tier %s: %s (%s), %d blocks found in %.3fs; capacity %d bytes in %d regions of %d "
            "slots of %d bytes, %d held here, %d engines; %s I/O, fsync=%s, sync every %.2fs",
            self.name, self.directory, j.fs_type or "?", blocks, time.perf_counter() - t0,
            self.capacity_bytes, geo.regions, geo.slots_per_region, geo.slot_size, owned,
            len(fleet.live), "direct" if self.direct else "buffered", self.fsync,
            self.sync_seconds,
        )

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int | None:
        sh = self._sh
        if sh is None:
            return 0
        health = self._read_health
        if not health.up and not health.should_probe():
            return 0  # reads are failing: answer 0 until the next probe is due
        n = 0
        index = sh.index
        with index.lock:
            own, remote = index.own, index.remote
            for key in keys:
                k = key if len(key) <= ilog.KEY_INLINE else ilog.index_key(key)
                if k not in own and k not in remote:
                    break
                n += 1
        sh.count(lookup_hits=n, misses=1 if n < len(keys) else 0)
        return n

    def touch(self, keys: Sequence[bytes]) -> None:
        sh = self._sh
        if sh is None:
            return
        index = sh.index
        with index.lock:
            own, remote = index.own, index.remote
            if index.policy is not None:
                index.policy.observe([k if len(k) <= ilog.KEY_INLINE else ilog.index_key(k)
                                      for k in keys])
            for key in keys:
                k = key if len(key) <= ilog.KEY_INLINE else ilog.index_key(key)
                if k in own:
                    own.move_to_end(k)
                else:
                    s = remote.get(k)
                    v = index.slots.get(s) if s is not None else None
                    if s is not None and v is not None:
                        index.remote_hits[(s, k)] = v[1]

    # -- jobs ------------------------------------------------------------------------------
    def _request_open(self) -> None:
        if self._opening or self._closed:
            return
        self._opening = True
        self._io.housekeep("open", first=True)

    def _fail_now(self, job_id: int, keys: Sequence[bytes], stat: str) -> None:
        self._in_flight += 1
        self._base_stats[stat] += len(keys)
        self._done.put(TierJobResult(job_id, frozenset(keys)))

    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        sh = self._sh
        if sh is None:
            self._fail_now(job_id, keys, "load_failures")
            return
        failed: set[bytes] = set()
        work: list[tuple[bytes, int, int, bool]] = []
        index = sh.index
        with index.lock:
            own, remote, pins = index.own, index.remote, index.pins
            for key, ps in zip(keys, slots):
                k = key if len(key) <= ilog.KEY_INLINE else ilog.index_key(key)
                s = own.get(k)
                if s is not None:
                    own.move_to_end(k)
                    is_remote = False
                else:
                    s = remote.get(k)
                    if s is None:
                        failed.add(key)
                        continue
                    is_remote = True
                pins[s] = pins.get(s, 0) + 1
                work.append((key, int(ps), s, is_remote))
        if failed:
            sh.count(load_failures=len(failed))
        self._in_flight += 1
        self._io.enqueue("load", job_id, work, failed)

    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        sh = self._sh
        if sh is None:
            self._fail_now(job_id, keys, "store_failures")
            return
        failed: set[bytes] = set()
        work: list[tuple[bytes, int, int, bool]] = []
        evicted: list[bytes] = []
        index = sh.index
        spr = sh.geo.slots_per_region
        with index.lock:
            own, remote, writing = index.own, index.remote, index.writing
            new: list[tuple[bytes, bytes, int]] = []  # (key, index key, primary slot)
            taken: set[bytes] = set()
            for key, ps in zip(keys, slots):
                k = key if len(key) <= ilog.KEY_INLINE else ilog.index_key(key)
                if k in own:  # refreshed before any slot is taken: it is not evicted for this job
                    own.move_to_end(k)
                    continue
                if k in remote or k in writing or k in taken:
                    continue  # another engine stored it already, or a store is in flight
                if len(key) > MAX_KEY_BYTES:
                    failed.add(key)
                    continue
                taken.add(k)
                new.append((key, k, int(ps)))
            got = index.alloc_many(len(new), evicted) if new else []
            regions = index.regions
            for (key, k, ps), (s, old) in zip(new, got):
                writing[k] = s
                regions[s // spr].writing += 1
                work.append((key, ps, s, old))
            failed.update(key for key, _k, _ps in new[len(got):])  # no slot to be had
            for k in evicted:
                index._event(k, True)
        if failed or evicted:
            sh.count(store_failures=len(failed), evictions=len(evicted))
        self._in_flight += 1
        self._io.enqueue("store", job_id, work, failed)

    # -- housekeeping on I/O threads ---------------------------------------------------------
    def _run_open(self) -> None:
        try:
            if self._sh is None and not self._closed:
                self._open()
        except OSError as e:
            self._open_failed(e)
        finally:
            self._opening = False

    def _run_regrow(self) -> None:
        """After ENOSPC: give back as many slots as the file system has room for again."""
        try:
            sh = self._sh
            if sh is None:
                return
            try:
                st = os.statvfs(self.directory)
            except OSError:
                return
            room = (st.f_bavail * st.f_frsize) // sh.geo.slot_size - 1  # keep one slot spare
            index = sh.index
            grown = 0
            with index.lock:
                taken = (set(index.own.values()) | set(index.writing.values()) | index.doomed)
                for reg in index.regions.values():
                    if room <= 0:
                        break
                    old = reg.limit
                    new = min(reg.slots, old + room)
                    if new <= old:
                        continue
                    room -= new - old
                    grown += new - old
                    base = sh.geo.base(reg.region)
                    have = set(reg.free)
                    reg.free.extend(s for s in range(base + min(reg.fresh, new) - 1, base + old - 1, -1)
                                    if s not in taken and s not in have)
                    reg.limit = new
                    sh.store.limits[reg.region] = new
                total = index.usable_slots()
            if grown:
                log.warning("tier %s: the file system has room again; growing back to %d blocks",
                            self.name, total)
        finally:
            self._regrowing = False

    # -- results and housekeeping ----------------------------------------------------------
    def poll(self) -> list[TierJobResult]:
        sh = self._sh
        if sh is None:
            if not self._opening and self._read_health.should_probe():
                self._request_open()  # the directory could not be opened: retry off this thread
        elif not self._regrowing:
            now = time.monotonic()
            if now >= self._next_regrow:  # the regions are looked at a few times a second at most
                if any(r.limit < r.slots for r in sh.index.regions.values()):
                    self._next_regrow = now + self.REGROW_CHECK_S  # the disk filled up: look for
                    self._regrowing = True  # room again
                    self._io.housekeep("regrow")
                else:
                    self._next_regrow = now + min(0.05, self.REGROW_CHECK_S)
        done = self._done.drain()
        self._in_flight -= len(done)
        return done

    def poll_loaded(self) -> list[tuple[int, list[bytes]]]:
        """Keys of load jobs in flight that are loaded and verified already (see the base class).

        Reported from the first call on."""
        io = self._io
        io.report_loaded = True
        q = io.loaded
        out: list[tuple[int, list[bytes]]] = []
        while q:
            out.append(q.popleft())
        return out

    def take_events(self) -> list[TierEvent]:
        sh = self._sh
        if sh is None or not sh.index.events:  # read without the lock: one appended meanwhile
            return []  # is taken next time, and the scheduler does not wait for an I/O thread
        with sh.index.lock:
            ev, sh.index.events = sh.index.events, []
        return [TierEvent(keys, removed=removed) for keys, removed in ev]

    def has_pending_work(self) -> bool:
        return self._in_flight > 0

    @property
    def available(self) -> bool:
        """False while the directory cannot be opened or writes fail (until a probe is due)."""
        if self._sh is None:
            return False
        health = self._write_health
        return health.up or health.should_probe()

    @property
    def refresh_window(self) -> int:
        """A loaded block whose sequence is this far behind the newest gets a new one."""
        sh = self._sh
        if sh is None:
            return 1
        with sh.index.lock:
            return self._refresh_window_locked()

    def _refresh_window_locked(self) -> int:
        """``refresh_window``, for a caller that holds the index's lock."""
        sh = self._sh
        return 1 if sh is None else max(1, sh.index.usable_slots() // 2)

    @property
    def _store(self) -> SlabStore | None:
        """The slab files once the directory is open (for tests and tools)."""
        return self._sh.store if self._sh is not None else None

    def sync_now(self) -> None:
        """Log the recency renewals of loads so far and run a sync pass, now, on the calling
        thread (for tools, tests and benchmarks)."""
        self._io.log_renewals()
        if self._fleet is not None:
            self._fleet.sync()

    def record_location(self, key: bytes) -> tuple[str, int] | None:
        """Where ``key``'s record lies: (slab file path, byte offset), or None (for tools and tests)."""
        sh = self._sh
        if sh is None:
            return None
        with sh.index.lock:
            slot = sh.index.where(ilog.index_key(key))
        if slot is None:
            return None
        region, off = sh.store.locate(slot)
        return sh.store.slab_path(region), off

    def usage_bytes(self) -> int:
        """Bytes the namespace directory occupies (all engines), as counted against capacity."""
        return dir_usage(self.directory) if self._sh is not None else 0

    def stats(self) -> dict[str, Any]:
        sh = self._sh
        fleet = self._fleet
        if sh is None or fleet is None:
            st: dict[str, Any] = dict(self._base_stats)
            st.update(blocks=0, usage_bytes=0, capacity_bytes=self.capacity_bytes,
                      path=self.directory, direct_io=False, fsync=self.fsync, max_blocks=0)
            if self._open_error:
                st["error"] = self._open_error
            st["available"] = False
            return st
        with sh.stats_lock:
            st = dict(sh.stats)
        for k in ("load_failures", "store_failures"):
            st[k] += self._base_stats[k]
        index = sh.index
        with index.lock:
            own_n = len(index.own)
            remote_only = sum(1 for k in index.remote if k not in index.own)
            st["writing_blocks"] = len(index.writing)
            st["max_blocks"] = index.usable_slots()
            st["regions_owned"] = len(index.regions)
            st["next_seq"] = sh.seq
        st["blocks"] = own_n + remote_only
        st["own_blocks"] = own_n
        st["remote_blocks"] = remote_only
        st["usage_bytes"] = self.usage_bytes()
        st["capacity_bytes"] = self.capacity_bytes
        st["path"] = self.directory
        st["direct_io"] = self.direct
        st["native_io"] = sh.store.fast is not None
        st["native_read_threads"] = self._io.native_read_threads
        st["fsync"] = self.fsync
        st["regions"] = sh.geo.regions
        st["engines"] = len(fleet.live)
        st["engine_id"] = f"{self.engine_id:016x}"
        st["sync_seconds"] = self.sync_seconds
        st["mode"] = ("shared" if fleet.nolocks is None
                      else "writer" if fleet.nolocks.writer else "reader")
        st["available"] = self.available
        return st

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        fleet, sh = self._fleet, self._sh
        if fleet is not None:
            fleet.stop()
        self._io.shutdown()
        if sh is not None:
            self._io.log_renewals()  # the recency of the last loads
            with sh.index.lock:
                regs = list(sh.index.regions.values())
            for reg in regs:
                with reg.log.lock:
                    with contextlib.suppress(OSError):
                        if self.fsync != "none" or sh.network_fs:
                            reg.log.flush()
                    reg.log.close()
        if fleet is not None:
            fleet.leave()
        if sh is not None:
            sh.store.close()  # the regions' locks go with their descriptors
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1
