"""fsck beside an engine: a suspect slot counts as bad only when two reads a moment apart found
the same thing. Valid records carry no byte digest, so a slot an engine rewrote between the
two reads (another key, or the same key with a newer write sequence) must not pass as "the same
bytes twice" (it did, and fsck then reported a block the engine was merely rewriting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import make_key, settle, store_blocks
from ops_helpers import storage_manager

from kvtier.ops import storage as ops_storage
from kvtier.ops.common import Options
from kvtier.ops.storage import StorageOps
from kvtier.tiers.storage import StorageTier
from kvtier.tiers.storage.scan import SlotCheck
from kvtier.tiers.storage.scan_logs import Logged, index_key

NS = "ops/confirm"
MISSING = "missing: its slab file ends before this slot"
OTHER = ("another block's record: its region's log names another key in this slot"
         " (no engine serves it)")


@pytest.fixture
def lane_and_slot(tmp_path: Path) -> Any:
    """A lane whose engine is gone, and one of its written slots (file, offset, slot)."""
    root = tmp_path / "tier"
    m = storage_manager(root, NS)
    key = make_key(0, NS)
    try:
        store_blocks(m, [key])
        settle(m)
        tier = m.tiers[0]
        assert isinstance(tier, StorageTier)
        loc = tier.record_location(key)
        assert loc is not None
        slot = tier._sh.index.own[index_key(key)]  # type: ignore[union-attr]
    finally:
        m.shutdown()
    ops = StorageOps(str(root), None, Options(threads=1))
    (ln,) = ops.lanes()
    yield ln, loc[0], loc[1], slot
    ops.close()


def _confirm_with(monkeypatch: pytest.MonkeyPatch, ln: Any, suspect: SlotCheck, reason: str,
                  reads: list[SlotCheck], logged_key: bytes) -> list[tuple[SlotCheck, str]]:
    """Run fsck's confirmation of one suspect with the slot reading ``reads`` in turn and the
    logs naming ``logged_key`` in its slot."""
    seq = iter(reads)
    monkeypatch.setattr(ops_storage, "recheck", lambda _ln, _c: next(seq))
    monkeypatch.setattr(ops_storage, "read_logs",
                        lambda _ln: Logged(slots={suspect.slot: (index_key(logged_key), 99)}))
    monkeypatch.setattr(ops_storage, "_SETTLE_S", 0.01)
    return StorageOps._confirm(ln, [(suspect, reason)])


def _record(where: tuple[str, int, int], key: bytes, seq: int) -> SlotCheck:
    file, offset, slot = where
    return SlotCheck(slot, file, offset, "record", key, seq)


def test_a_slot_rewritten_between_the_two_reads_is_not_confirmed(
        lane_and_slot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ln, file, offset, slot = lane_and_slot
    where = (file, offset, slot)
    x, y, z = (make_key(i, NS) for i in (10, 11, 12))
    # a slot the logs name past the scanned end of its file: read twice, another record each time
    missing = SlotCheck(slot, file, offset, "bad", y, 0, MISSING)
    assert _confirm_with(monkeypatch, ln, missing, MISSING,
                         [_record(where, x, 10), _record(where, z, 20)], y) == []
    # the same key rewritten (a newer write sequence) between the two reads
    assert _confirm_with(monkeypatch, ln, missing, MISSING,
                         [_record(where, x, 10), _record(where, x, 11)], y) == []
    # a record of another key than the log names, rewritten with that key again meanwhile
    suspect = _record(where, x, 10)
    assert _confirm_with(monkeypatch, ln, suspect, OTHER, [_record(where, x, 11)], y) == []


def test_a_slot_that_reads_the_same_twice_is_confirmed(
        lane_and_slot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ln, file, offset, slot = lane_and_slot
    where = (file, offset, slot)
    x, y = make_key(10, NS), make_key(11, NS)
    missing = SlotCheck(slot, file, offset, "bad", y, 0, MISSING)
    got = _confirm_with(monkeypatch, ln, missing, MISSING,
                        [_record(where, x, 10), _record(where, x, 10)], y)
    assert [(c.key, c.seq, r) for c, r in got] == [(x, 10, OTHER)]
    suspect = _record(where, x, 10)
    got = _confirm_with(monkeypatch, ln, suspect, OTHER, [_record(where, x, 10)], y)
    assert [(c.key, c.seq, r) for c, r in got] == [(x, 10, OTHER)]
