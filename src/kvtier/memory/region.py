"""A block region: ``num_slots`` slots of ``block_bytes`` in one POSIX shared-memory segment.

The manager's process and every worker process of one engine map the same segment by name, so a
worker's copies land in the slots the scheduler assigned without any extra copy. The segment is
page-aligned; with ``block_bytes`` a multiple of 4096 every slot is usable for O_DIRECT.

Every process that maps the segment advises huge pages for it (``MADV_HUGEPAGE``): where the
``/dev/shm`` file system gives huge pages on advice (tmpfs mounted ``huge=advise``, or
``within_size``/``always``), every 2 MiB of slots is then one physically contiguous page. That
matters for O_DIRECT tiers: the kernel hands a device one segment per run of physically adjacent
pages, and 4 KiB pages reused right after another mapping freed them come back in descending order,
one segment each (on a virtual disk, 256 KiB loads from 4 KiB pages ran at about 0.7 of their
speed from huge pages; docs/BENCHMARKS.md). On a mount without ``huge=`` (tmpfs's default) the
advice changes nothing. The creator logs how much of the region huge pages back.

The process that creates the segment populates it at once (``MADV_POPULATE_WRITE``): the engine's
workers pin it for DMA (``cudaHostRegister``, which faults in every page anyway), and otherwise the
first stores and loads after start would pay for faulting in the pages one at a time.

Before Python 3.13, ``SharedMemory`` registers every segment it opens with the resource tracker,
which unlinks it when that process exits, pulling the region out from under the others. This
module unregisters it, and unlinking is explicit: the owner (the manager) unlinks at shutdown, and
a finalizer does it if the owner's process exits without shutting down.

A process killed outright runs neither, so whoever creates the segment also starts a
:class:`~kvtier.memory.watchdog.Watchdog`, a small process that unlinks it once no process uses it
any more, and that reclaims at its start segments whose creators are gone (see that module).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import sys
import weakref
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from kvtier.memory.watchdog import Watchdog

log = logging.getLogger("kvtier")

_PAGE = 4096
_MADV_POPULATE_WRITE = 23  # Linux 5.14 and later
_POPULATE_STEP = 256 << 20  # bytes per call (the GIL is let go between calls)


def populate(array: np.ndarray) -> bool:
    """Fault in every page of ``array``'s memory now, writable, without touching its contents.

    False where the kernel cannot (before Linux 5.14, or memory runs out): the pages then come in
    on first use, as they would have anyway.
    """
    if not sys.platform.startswith("linux") or array.nbytes == 0:
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    addr, size = array.ctypes.data, array.nbytes
    if addr % _PAGE:
        return False
    for off in range(0, size, _POPULATE_STEP):
        if madvise(addr + off, min(_POPULATE_STEP, size - off), _MADV_POPULATE_WRITE) != 0:
            return False
    return True


def advise_huge(mapping: mmap.mmap) -> bool:
    """Advise transparent huge pages for ``mapping`` (before its pages are faulted in); False
    where the platform or the kernel refuses."""
    flag = getattr(mmap, "MADV_HUGEPAGE", None)
    if flag is None or not hasattr(mapping, "madvise"):
        return False
    try:
        mapping.madvise(flag)
    except OSError:
        return False
    return True


def smaps_entry(addr: int) -> dict[str, str] | None:
    """The fields of this process's ``/proc/self/smaps`` entry for the mapping that holds
    ``addr`` (name -> the rest of its line, e.g. ``"Rss" -> "4 kB"``); None where that cannot
    be read or no mapping holds it."""
    fields: dict[str, str] | None = None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head, _, rest = line.partition(" ")
                if "-" in head and not head.endswith(":"):  # the next mapping's first line
                    if fields is not None:
                        break
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    if lo <= addr < hi:
                        fields = {}
                elif fields is not None and head.endswith(":"):
                    fields[head[:-1]] = rest.strip()
    except (OSError, ValueError):
        return None
    return fields


def huge_page_bytes(array: np.ndarray) -> int | None:
    """Bytes of ``array``'s mapping that this process maps as huge pages (``ShmemPmdMapped`` and
    ``AnonHugePages`` of its smaps entry); None where that cannot be read."""
    if array.nbytes == 0:
        return 0
    fields = smaps_entry(array.ctypes.data)
    if fields is None:
        return None
    try:
        return sum(int(fields.get(k, "0 kB").split()[0]) * 1024
                   for k in ("ShmemPmdMapped", "AnonHugePages"))
    except ValueError:
        return None


def _untrack(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(Exception):
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def _unlink_quietly(name: str) -> None:
    """Unlink a segment without telling the resource tracker (it no longer tracks it)."""
    import _posixshmem  # the module SharedMemory itself uses on POSIX

    with contextlib.suppress(FileNotFoundError, OSError):
        _posixshmem.shm_unlink("/" + name.lstrip("/"))


def _cleanup(name: str, owner: bool, watchdog: Watchdog | None) -> None:
    """The owner unlinks; a watchdog is told whether the segment is gone or is its to watch."""
    if owner:
        _unlink_quietly(name)
    if watchdog is not None:
        watchdog.stop(unlinked=owner)


class BlockRegion:
    """A shared-memory array of slots, created or attached by name."""

    def __init__(self, name: str, num_slots: int, block_bytes: int, *, owner: bool) -> None:
        """Open the segment ``name``, creating it if it does not exist yet.

        Either side may come first: the manager (``owner=True``) or a worker. Only the owner
        unlinks the segment; everybody closes its own mapping.
        """
        if num_slots <= 0 or block_bytes <= 0:
            raise ValueError("num_slots and block_bytes must be positive")
        self.name = name
        self.num_slots = num_slots
        self.block_bytes = block_bytes
        self.owner = owner
        size = max(num_slots * block_bytes, _PAGE)
        try:
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            self.created = True
        except FileExistsError:
            self._shm = shared_memory.SharedMemory(name=name, create=False)
            self.created = False
            if self._shm.size < num_slots * block_bytes:
                self._shm.close()
                raise ValueError(
                    f"shared memory {name!r} holds {self._shm.size} bytes, "
                    f"{num_slots * block_bytes} needed: another engine uses this instance_id"
                ) from None
        _untrack(self._shm)
        self._watchdog: Watchdog | None = None
        if self.created:
            try:
                self._watchdog = Watchdog(name, os.fstat(self._shm._fd).st_ino)  # type: ignore[attr-defined]
            except OSError:
                self._watchdog = None  # no watchdog: shutdown and the finalizer still unlink
        mapping = getattr(self._shm, "_mmap", None)
        self.huge_advised = advise_huge(mapping) if mapping is not None else False
        buf = self._shm.buf
        assert buf is not None
        self.array: np.ndarray = np.ndarray(
            (num_slots, block_bytes), dtype=np.uint8, buffer=buf
        )
        self._finalizer = weakref.finalize(self, _cleanup, name, owner, self._watchdog)
        self._closed = False
        self.populated = populate(self.array) if self.created else False
        if self.created:
            self._log_pages()

    def _log_pages(self) -> None:
        huge = huge_page_bytes(self.array)
        size = self.array.nbytes
        if huge is None or size < 2 << 20:
            return
        msg = f"CPU region {self.name}: {size / 2**20:.0f} MiB, {huge / 2**20:.0f} MiB of it in huge pages"
        if huge < size // 2:
            msg += ("; O_DIRECT tiers (storage) move blocks faster from huge pages: mount /dev/shm "
                    "with huge=advise (README, storage tier)")
        log.info(msg)

    def slot(self, slot_id: int) -> np.ndarray:
        """A writable view of one slot."""
        return self.array[slot_id]

    def close(self) -> None:
        """Unmap the segment here; the owner also unlinks it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.array = np.empty((0, self.block_bytes), dtype=np.uint8)
        with contextlib.suppress(BufferError):
            self._shm.close()
        self._finalizer.detach()
        _cleanup(self.name, self.owner, self._watchdog)
