"""Backpressure per secondary tier: a slow tier may not pin more than its share of the CPU tier.

Every block cascaded to a tier holds its primary slot until the tier has read it. A tier that falls
behind the store rate would otherwise collect pinned slots until the CPU tier refuses the engine's
stores. Each tier therefore has a bound: its queued and in-flight cascades may pin at most
``max_pinned_share`` of the CPU tier's slots (but never fewer than 64 slots, or all of them in a
smaller CPU tier, so that a fast tier always has a few steps' batches in flight). Blocks past
the bound are not cascaded to that tier (they stay in the tiers above, where they were stored)
and are counted as dropped.

A second, earlier signal is the tier's store time per byte against its own healthy baseline.
A job's per-byte time depends on its size (a small job pays a fixed cost per job, a large one
streams), so the baseline is kept per size class (job bytes within a power of two): a floor
that follows faster jobs quickly and slower ones only slowly. Each job gives a ratio, its time
per byte over its class's baseline (the first job of a class sets the baseline and gives none);
the ratio is capped at twice ``slow_store_factor``, so that one stalled job is not a slow tier,
and a fast EWMA of the ratios is the signal. While it is over ``slow_store_factor``, the bound is
halved (not below the 64-slot floor), so a tier that is slowing down sheds load before it reaches
the full bound.

A job's time is known only when it ends, and a medium that slows down sharply ends its jobs late:
before the first slow job ends, the engine may already have pinned the whole bound behind it.
So each step also looks at the tier's oldest store job still in flight: once the time the tier
has spent on it (from its submission or the end of the previous store job, less the share during
which tasks waited for a CPU) is past twice ``slow_store_factor`` times what its size class's
baseline says it should take, the tier is *stalled*, which halves the bound as a slow signal
does, until that job ends or a younger one is the oldest. Twice the factor, as for the cap: a
job has to be far past any hiccup of a healthy medium. This needs the warm-up's samples first.

A job's store time is the time the tier was busy with it, not its time since submission: from
its submission, or from the end of the tier's previous store job if that ended later, to its own
end. Time a job spends queued behind the tier's earlier stores is not counted again, so a burst
of stores does not look like a slow medium, while a medium that takes longer per byte (a
throttled or failing disk, a server that falls behind) still does: its jobs end further apart.

A job that ran while the machine's CPUs were the bottleneck says little about the medium: the
tier's threads waited to run, not for the device. Linux's pressure stall information tells how
long runnable tasks waited for a CPU (``cpu.pressure`` of the process's cgroup, else
``/proc/pressure/cpu``; one ``pread`` of a file kept open, about 2 us, per store job submitted
and ended). A job during which tasks waited for a CPU more than half of the time is *CPU-bound*
(counted in ``latency_samples_cpu_bound``): it never moves the baseline, and it adds a sample
only for the slowness that waiting for a CPU cannot explain. Its time less the share during
which tasks waited is a lower bound of the time the tier spent on anything else; only when that
lower bound is itself over the baseline does it count, as that ratio. A disk that turns slow
while the machine is busy is still seen (its jobs are slow far past what the CPU wait
explains), while a busy machine in front of a healthy disk adds no samples. Where the kernel
offers no such file every job counts fully.

A tier that dropped a block in the last second, or whose latency is high, is *degraded*: reported
in ``get_stats()``, logged when it starts (at most once every 10 s per tier) and when it ends. It
recovers on its own: jobs keep going to it within the bound, and their latency is what lifts the
signal. Loads (promotions) from the tier are never held back. Everything here runs on the
scheduler thread and is O(1) per call.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("kvtier.manager")

DEFAULT_MAX_PINNED_SHARE = 0.25
DEFAULT_SLOW_STORE_FACTOR = 8.0
MIN_BOUND_SLOTS = 64  # a few steps' batches: below this a tier could not keep up even when fast
DROP_MEMORY_S = 1.0  # a drop keeps the tier degraded this long
LOG_EVERY_S = 10.0
_FAST = 0.3  # EWMA weight of a new sample in the recent latency
_FLOOR_UP = 0.01  # how fast the baseline follows slower samples
_FLOOR_DOWN = 0.2  # and faster ones (not at once: one lucky job is not the baseline)
_WARMUP_JOBS = 8  # samples before the latency signal counts
CPU_BOUND_SHARE = 0.5  # a job during which tasks waited for a CPU longer than this share: no sample


def _open_cpu_pressure() -> int | None:
    """A descriptor of the CPU pressure file that covers this process, or None."""
    paths = ["/proc/pressure/cpu"]
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):  # cgroup v2: the process's own group first
                    paths.insert(0, "/sys/fs/cgroup" + line[3:].strip().rstrip("/") + "/cpu.pressure")
    except OSError:
        pass
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        if _read_stall(fd) is not None:
            return fd
        os.close(fd)
    return None


def _read_stall(fd: int) -> float | None:
    try:
        raw = os.pread(fd, 256, 0)
        line = raw[:raw.index(b"\n")]  # "some avg10=.. avg60=.. avg300=.. total=<us>"
        return int(line[line.rindex(b"=") + 1:]) / 1e6
    except (OSError, ValueError):
        return None


_pressure: list[int | None] = []  # the CPU pressure file's descriptor, once looked for


def cpu_stall_seconds() -> float | None:
    """Seconds (cumulative) during which some runnable task waited for a CPU; None where the
    kernel does not say (no pressure stall information)."""
    if not _pressure:
        _pressure.append(_open_cpu_pressure())
    fd = _pressure[0]
    return None if fd is None else _read_stall(fd)


class TierBackpressure:
    """The backpressure state of one secondary tier (see the module docstring)."""

    def __init__(self, name: str, num_slots: int, max_pinned_share: float,
                 slow_store_factor: float) -> None:
        self.name = name
        self.floor = min(num_slots, MIN_BOUND_SLOTS)
        self.bound = max(self.floor, int(num_slots * max_pinned_share))
        self.slow_factor = slow_store_factor
        self.pinned = 0
        self.max_pinned_seen = 0
        self.dropped = 0
        self.degraded = False
        self.degraded_events = 0
        self.baselines: dict[int, float] = {}  # size class -> healthy seconds per byte
        self.recent: float | None = None  # EWMA of time per byte over its class's baseline
        self._samples = 0
        self._busy_until = -1e18  # end of the latest store job seen
        self.cpu_bound_samples = 0
        # store jobs in flight, oldest first: job id -> (submitted, bytes, CPU stall seconds then)
        self._inflight: OrderedDict[int, tuple[float, int, float | None]] = OrderedDict()
        self.stalled = False
        self.stalled_steps = 0
        self._last_drop = -1e18
        self._last_log = -1e18
        self._logged = False

    @property
    def slow(self) -> bool:
        """True while recent store time per byte is far above the healthy baseline, or the
        oldest store job in flight is far past its expected time (stalled)."""
        return self.stalled or (self._samples >= _WARMUP_JOBS and self.recent is not None
                                and self.recent > self.slow_factor)

    @property
    def limit(self) -> int:
        """Slots the tier's cascades may pin now."""
        return max(self.floor, self.bound // 2) if self.slow else self.bound

    def admit(self, keys: Sequence[bytes]) -> Sequence[bytes]:
        """The leading part of ``keys`` that fits under the limit; counts them as pinned.

        The rest are dropped (counted) and stay only in the tiers above.
        """
        room = self.limit - self.pinned
        n = len(keys)
        if room >= n:
            self.pinned += n
            if self.pinned > self.max_pinned_seen:
                self.max_pinned_seen = self.pinned
            return keys
        take = max(0, room)
        self.pinned += take
        if self.pinned > self.max_pinned_seen:
            self.max_pinned_seen = self.pinned
        self.dropped += n - take
        self._last_drop = time.monotonic()
        return keys[:take]

    def release(self, n: int) -> None:
        """``n`` slots the tier's cascades pinned are released."""
        self.pinned -= n
        if self.pinned < 0:
            raise RuntimeError(f"tier {self.name}: more cascade slots released than pinned")

    def observe(self, seconds: float, nbytes: int, submitted: float | None = None,
                cpu_wait_share: float | None = None) -> None:
        """A store job of ``nbytes`` took ``seconds`` from submission to its end.

        With ``submitted`` (a ``time.monotonic()`` instant), only the part after the end of the
        tier's previous store job counts (see the module docstring); a job that ended within a
        span already counted adds no sample. ``cpu_wait_share``: the share of the job's time
        during which tasks waited for a CPU; past ``CPU_BOUND_SHARE`` the job counts only for
        the slowness that share cannot explain, and never moves the baseline.
        """
        if nbytes <= 0 or seconds <= 0:
            return
        if submitted is not None:
            end = submitted + seconds
            busy = end - max(submitted, self._busy_until)
            if end > self._busy_until:
                self._busy_until = end
            if busy <= 0:
                return
            seconds = busy
        x = seconds / nbytes
        size_class = nbytes.bit_length()
        base = self.baselines.get(size_class)
        if cpu_wait_share is not None and cpu_wait_share > CPU_BOUND_SHARE:
            self.cpu_bound_samples += 1
            floor = x * (1.0 - min(cpu_wait_share, 1.0))  # time not explained by CPU waits
            if base is not None and floor > base:
                self._add(min(floor / base, 2 * self.slow_factor))
            return
        if base is None:
            self.baselines[size_class] = x
            return
        self._add(min(x / base, 2 * self.slow_factor))
        if x < base:
            base += _FLOOR_DOWN * (x - base)
        else:
            base += _FLOOR_UP * (min(x, self.slow_factor * base) - base)
        self.baselines[size_class] = base

    def job_started(self, job_id: int, submitted: float, nbytes: int,
                    stall: float | None) -> None:
        """A store job of ``nbytes`` was submitted at ``submitted`` (``time.monotonic()``);
        ``stall``: the CPU stall seconds reading then (``cpu_stall_seconds()``)."""
        if nbytes > 0:
            self._inflight[job_id] = (submitted, nbytes, stall)

    @property
    def stores_in_flight(self) -> bool:
        """True while a store job of this tier is in flight."""
        return bool(self._inflight)

    def job_ended(self, job_id: int) -> None:
        """A store job ended (done, failed or dropped); unknown ids are ignored."""
        self._inflight.pop(job_id, None)

    def _check_stalled(self, now: float, stall_now: float | None) -> None:
        self.stalled = False
        if self._samples < _WARMUP_JOBS or not self._inflight:
            return
        submitted, nbytes, stall = next(iter(self._inflight.values()))
        base = self.baselines.get(nbytes.bit_length())
        if base is None:
            return
        age = now - max(submitted, self._busy_until)
        if stall is not None and stall_now is not None and now > submitted:
            age *= 1.0 - min(max((stall_now - stall) / (now - submitted), 0.0), 1.0)
        if age > 2 * self.slow_factor * base * nbytes:
            self.stalled = True
            self.stalled_steps += 1

    def _add(self, r: float) -> None:
        """One job's latency ratio into the signal."""
        self._samples += 1
        self.recent = r if self.recent is None else self.recent + _FAST * (r - self.recent)

    def tick(self, now: float, stall_now: float | None = None) -> None:
        """Once per step, after the step's ended jobs were reported: look at the oldest store
        job in flight (``stall_now``: the CPU stall seconds reading now, if any), then enter or
        leave the degraded state; logs at most one pair per 10 s."""
        self._check_stalled(now, stall_now)
        bad = self.slow or now - self._last_drop < DROP_MEMORY_S
        if bad and not self.degraded:
            self.degraded = True
            self.degraded_events += 1
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                self._logged = True
                why = ("a store job is far past its expected time" if self.stalled
                       else f"store latency {self._ratio():.1f}x its baseline" if self.slow
                       else "its stores fall behind")
                log.warning(
                    "tier %s is degraded (%s): its stores may pin %d CPU slots, blocks past "
                    "that stay in the tiers above (%d dropped so far); loads go on",
                    self.name, why, self.limit, self.dropped)
        elif not bad and self.degraded:
            self.degraded = False
            if self._logged:
                self._logged = False
                log.warning("tier %s has recovered (%d stores dropped so far)", self.name,
                            self.dropped)

    def _ratio(self) -> float:
        return 0.0 if self.recent is None else self.recent

    def stats(self) -> dict[str, Any]:
        """What ``get_stats()`` reports for the tier."""
        return {
            "degraded": self.degraded,
            "backpressure_dropped": self.dropped,
            "degraded_events": self.degraded_events,
            "pinned_slots": self.pinned,
            "max_pinned_slots": self.bound,
            "peak_pinned_slots": self.max_pinned_seen,
            "store_latency_ratio": round(self._ratio(), 3),
            "latency_samples_cpu_bound": self.cpu_bound_samples,
            "stalled_steps": self.stalled_steps,
        }
