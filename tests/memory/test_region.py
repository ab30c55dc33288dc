"""The primary region: populated by the process that creates it, shared by name, contents intact."""

from __future__ import annotations

import os
import uuid

import numpy as np

from kvtier.memory.region import BlockRegion


def _resident_pages(name: str) -> int:
    """Pages of /dev/shm/``name`` that are allocated (st_blocks counts 512-byte units)."""
    return os.stat(f"/dev/shm/{name}").st_blocks * 512 // 4096


def test_the_creator_populates_the_region_and_an_attacher_sees_the_same_bytes() -> None:
    name = f"kvtier-test-{uuid.uuid4().hex[:12]}"
    owner = BlockRegion(name, 64, 16384, owner=True)
    try:
        assert owner.created
        assert owner.populated  # this kernel has MADV_POPULATE_WRITE (Linux 5.14+)
        assert _resident_pages(name) >= 64 * 16384 // 4096  # every page is there before any store
        assert not owner.array.any()  # populating writes nothing
        worker = BlockRegion(name, 64, 16384, owner=False)
        try:
            assert not worker.created and not worker.populated
            worker.array[3] = 7
            assert np.array_equal(owner.array[3], np.full(16384, 7, dtype=np.uint8))
        finally:
            worker.close()
    finally:
        owner.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_an_unpopulated_region_still_works() -> None:
    """Where populating is refused (an old kernel), pages come in on first use as before."""
    from kvtier.memory import region as region_mod

    arr = np.zeros(4096 * 3 + 1, dtype=np.uint8)[1:]  # not page-aligned: refused
    assert not region_mod.populate(arr)
    assert not region_mod.populate(np.zeros(0, dtype=np.uint8))


def test_every_mapping_of_the_region_advises_huge_pages_and_the_creator_logs_them(caplog) -> None:
    """Huge pages keep a block's memory physically contiguous, one segment per O_DIRECT call,
    where /dev/shm gives them on advice; the creator says how much of the region they back."""
    from kvtier.memory.region import huge_page_bytes, smaps_entry

    name = f"kvtier-test-{uuid.uuid4().hex[:12]}"
    with caplog.at_level("INFO", logger="kvtier"):
        owner = BlockRegion(name, 16, 256 << 10, owner=True)
    try:
        worker = BlockRegion(name, 16, 256 << 10, owner=False)
        try:
            for r in (owner, worker):
                assert r.huge_advised
                fields = smaps_entry(r.array.ctypes.data)
                assert fields is not None and "hg" in fields["VmFlags"].split()
            huge = huge_page_bytes(owner.array)
            assert huge is not None and 0 <= huge <= owner.array.nbytes
            lines = [m for m in caplog.messages if m.startswith(f"CPU region {name}: 4 MiB, ")]
            assert lines == [lines[0]] and f"{huge >> 20} MiB of it in huge pages" in lines[0]
            assert ("huge=advise" in lines[0]) == (huge < owner.array.nbytes // 2)
        finally:
            worker.close()
    finally:
        owner.close()
