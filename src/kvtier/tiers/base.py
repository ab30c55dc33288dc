"""The contract every secondary tier implements.

A secondary tier holds blocks below the CPU primary tier. It never touches engine memory: it
copies bytes between primary slots (``ctx.primary[slot]``) and its own medium. Every method is
called from the scheduler thread and must return without waiting for I/O; the I/O runs on the
tier's own threads, and results come back through :meth:`SecondaryTier.poll`, which the manager
calls once per engine step.

While a job is in flight, the manager holds the slots it names: a load job's slots are written
by the tier and by nobody else; a store job's slots are not modified until the job is polled.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvtier.config import ConfigError

log = logging.getLogger("kvtier.tiers")


@dataclass
class TierContext:
    """What the manager hands to a tier when it builds it."""

    namespace: str
    namespace_fp: bytes
    block_bytes: int
    primary: np.ndarray  # (num_slots, block_bytes) uint8, the primary region
    name: str  # unique per manager: "<type><index>", e.g. "storage0"
    index: int = 0


@dataclass
class TierJobResult:
    """The outcome of one load or store job."""

    job_id: int
    failed_keys: frozenset[bytes] = field(default_factory=frozenset)
    bytes_moved: int = 0
    seconds: float = 0.0

    @property
    def success(self) -> bool:
        """True when every key of the job succeeded."""
        return not self.failed_keys


@dataclass
class TierEvent:
    """Blocks that appeared in (``removed=False``) or left (``removed=True``) a tier."""

    keys: list[bytes]
    removed: bool


class Health:
    """Up/down state of a tier's medium, with exponential-backoff re-probing.

    ``record_failure`` marks the tier down and logs once per burst (not once per block);
    ``should_probe`` says when to try the medium again; ``record_success`` marks it up.
    """

    def __init__(
        self, name: str, *, min_backoff: float = 0.1, max_backoff: float = 1.0
    ) -> None:
        self.name = name
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._backoff = min_backoff
        self.failures = 0
        self.down_events = 0

    @property
    def up(self) -> bool:
        """True while the medium is believed to work."""
        return self._down_since is None

    def record_failure(self, err: BaseException | str) -> None:
        """Count a failure; on the first of a burst mark the tier down and log it."""
        with self._lock:
            self.failures += 1
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                self._backoff = self.min_backoff
                self.down_events += 1
                log.warning("tier %s is down: %s", self.name, err)
            else:
                self._backoff = min(self._backoff * 2, self.max_backoff)
            self._next_probe = now + self._backoff

    def record_success(self) -> None:
        """Mark the medium up again (logs the recovery once)."""
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is not None:
                log.warning(
                    "tier %s is up again after %.2fs", self.name, time.monotonic() - self._down_since
                )
                self._down_since = None

    def should_probe(self) -> bool:
        """While down: True when the backoff has passed and one probe may be tried."""
        if self._down_since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if now >= self._next_probe:
                self._next_probe = now + self._backoff
                return True
            return False


class Completions:
    """A thread-safe queue of finished job results, drained by ``poll``."""

    def __init__(self) -> None:
        self._q: deque[TierJobResult] = deque()

    def put(self, result: TierJobResult) -> None:
        """Called from an I/O thread when a job ends."""
        self._q.append(result)

    def drain(self) -> list[TierJobResult]:
        """Called from the scheduler thread: everything finished so far."""
        out: list[TierJobResult] = []
        q = self._q
        while q:
            out.append(q.popleft())
        return out

    def __len__(self) -> int:
        return len(self._q)


class SecondaryTier(ABC):
    """Base class of secondary tiers (built-in and out-of-tree)."""

    #: medium name reported in events and stats ("STORAGE", "NETWORK", ...)
    medium: ClassVar[str] = "SECONDARY"
    #: parameters this tier accepts (name -> meaning); None accepts anything
    PARAMS: ClassVar[Mapping[str, str] | None] = None
    #: parameter aliases (alias -> canonical name), e.g. vLLM's names
    ALIASES: ClassVar[Mapping[str, str]] = {}
    #: ``write_policy`` when the tier's config entry names none ("through" or "back")
    DEFAULT_WRITE_POLICY: ClassVar[str] = "through"

    @classmethod
    def validate_params(cls, params: Mapping[str, Any], label: str) -> dict[str, Any]:
        """Check and normalise parameters before anything is built; raise ConfigError.

        ``label`` is how the config names this entry (``secondary_tiers[0]``). The default
        resolves aliases and rejects unknown names; tiers extend it to check values.
        """
        out: dict[str, Any] = {}
        for key, value in params.items():
            name = cls.ALIASES.get(key, key)
            if cls.PARAMS is not None and name not in cls.PARAMS:
                raise ConfigError(
                    f"{label}.{key}",
                    f"a parameter of tier {cls.__name__}: " + ", ".join(sorted(cls.PARAMS)),
                    value,
                )
            if name in out:
                raise ConfigError(f"{label}.{key}", f"one of {key!r} or its alias, not both", value)
            out[name] = value
        return out

    def __init__(self, ctx: TierContext, **params: Any) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.params = params

    # -- lookups ---------------------------------------------------------------------------
    @abstractmethod
    def lookup(self, keys: Sequence[bytes]) -> int | None:
        """Length of the leading run of ``keys`` this tier holds and can load.

        Answers from what the tier knows now. ``None`` means the tier must ask its medium first:
        it has started (or already has in flight) that query, and the manager asks again after
        the next :meth:`poll`. A tier that is down answers 0.
        """

    # -- jobs ------------------------------------------------------------------------------
    @abstractmethod
    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        """Start copying ``keys`` from the medium into primary slots ``slots`` (same order).

        Every loaded block is verified before its slot counts as written; a block that fails
        verification is a failed key (and is removed from the tier). Keys come in prefix order:
        a tier that can finishes them in that order and reports them through ``poll_loaded`` as
        they finish, so that the leading blocks of a request can be served before the job ends.
        """

    @abstractmethod
    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        """Start copying primary slots ``slots`` to the medium under ``keys``."""

    @abstractmethod
    def poll(self) -> list[TierJobResult]:
        """Results of jobs finished since the last call (also completes lookup queries)."""

    def poll_loaded(self) -> list[tuple[int, list[bytes]]]:
        """Progress of load jobs still in flight: ``(job_id, keys)`` pairs, each naming keys of
        that job loaded and verified since the last call (the tier writes their slots no more).

        Optional (the default reports nothing): ``poll`` still reports every job's end, and its
        failed keys never include a key reported here. A tier may start reporting only once
        this has been called.
        """
        return []

    # -- hints and housekeeping ------------------------------------------------------------
    def touch(self, keys: Sequence[bytes]) -> None:
        """Recency hint: ``keys`` were used."""
        return None

    def take_events(self) -> list[TierEvent]:
        """Blocks stored in or removed from this tier since the last call."""
        return []

    def has_pending_work(self) -> bool:
        """True while jobs or queries are in flight."""
        return False

    def stats(self) -> dict[str, Any]:
        """Counters (hits, misses, bytes read/written, failures, usage)."""
        return {}

    def block_capacity(self) -> int | None:
        """How many blocks the tier holds when full, when it knows (admission policies size
        their shadows by it); None when unbounded or unknown."""
        st = self.stats()
        cap = st.get("max_blocks")
        if isinstance(cap, int) and cap > 0:
            return cap
        cap_bytes = st.get("capacity_bytes")
        if isinstance(cap_bytes, int) and cap_bytes > 0 and self.ctx.block_bytes:
            return max(1, cap_bytes // self.ctx.block_bytes)
        return None

    @property
    def available(self) -> bool:
        """False while the tier's medium is down.

        While a tier is unavailable the manager sends it no store jobs (it counts them as cascade
        failures) but still calls ``lookup`` (answer 0 without touching the medium) and ``poll``
        once per step: re-probe the medium from there, without blocking (see :class:`Health`).
        """
        return True

    def shutdown(self) -> None:
        """Stop threads and close connections; idempotent. Persistent data stays."""
        return None
