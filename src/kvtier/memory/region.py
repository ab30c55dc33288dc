"""A block region: ``num_slots`` slots of ``block_bytes`` in one POSIX shared-memory segment.

The manager's process and every worker process of one engine map the same segment by name, so a
worker's copies land in the slots the scheduler assigned without any extra copy. The segment is
page-aligned; with ``block_bytes`` a multiple of 4096 every slot is usable for O_DIRECT.

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
import os
import weakref
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from kvtier.memory.watchdog import Watchdog

_PAGE = 4096


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
        buf = self._shm.buf
        assert buf is not None
        self.array: np.ndarray = np.ndarray(
            (num_slots, block_bytes), dtype=np.uint8, buffer=buf
        )
        self._finalizer = weakref.finalize(self, _cleanup, name, owner, self._watchdog)
        self._closed = False

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
