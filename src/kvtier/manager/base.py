"""The scheduler-side contract (see API.md): what an engine calls, once per step or per request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kvtier.types import LoadStoreSpec, OffloadingEvent, PrepareStoreOutput, ReqContext


class OffloadingManager(ABC):
    """Tracks offloaded blocks for the scheduler. No method blocks on I/O."""

    @abstractmethod
    def lookup(self, keys: Sequence[bytes], ctx: ReqContext) -> int | None:
        """Leading run of ``keys`` loadable from the primary tier now; None: ask again next step."""

    @abstractmethod
    def prepare_load(self, keys: Sequence[bytes], ctx: ReqContext) -> LoadStoreSpec:
        """Pin ready keys; their primary slot ids, in order."""

    @abstractmethod
    def complete_load(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        """Unpin keys pinned by ``prepare_load``."""

    @abstractmethod
    def prepare_store(self, keys: Sequence[bytes], ctx: ReqContext) -> PrepareStoreOutput | None:
        """Reserve primary slots for keys not in the primary tier; None when none can be freed."""

    @abstractmethod
    def complete_store(
        self, keys: Sequence[bytes], ctx: ReqContext, success: bool = True
    ) -> None:
        """The bytes of ``keys`` (from a ``prepare_store``) are written; or release them."""

    def touch(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        """Recency hint for eviction."""
        return None

    def on_new_request(self, ctx: ReqContext) -> None:
        """A request arrived."""
        return None

    def on_request_finished(self, ctx: ReqContext) -> None:
        """A request finished."""
        return None

    def on_schedule_end(self) -> None:
        """Once per engine step: collect finished jobs, submit batched work."""
        return None

    def has_pending_work(self) -> bool:
        """True while tier jobs are in flight."""
        return False

    def take_events(self) -> Iterable[OffloadingEvent]:
        """Blocks stored/removed per medium since the last call."""
        return ()

    def get_stats(self) -> dict[str, Any]:
        """Counters per tier."""
        return {}

    def reset_cache(self) -> None:
        """Drop the primary tier's blocks (persistent tiers keep theirs)."""
        return None

    def shutdown(self) -> None:
        """Stop threads, close connections, release memory; idempotent."""
        return None

    @abstractmethod
    def primary_blocks(self) -> np.ndarray:
        """The primary region: writable uint8 array (num_slots, block_bytes)."""
