"""A soak run: a steady workload through CPU, storage and network tiers while faults come and go.

A stand-in engine loop drives one manager through the public API (lookup, load and verify every
block it loads, store the rest, ``on_schedule_end`` each step) for a bounded time, cut into
phases; each phase injects one fault for its first part and heals it for the rest:

- ``baseline`` (also the warm-up), ``disk full`` (a filler file takes the file system's free
  space), ``unwritable files`` (``chattr +i`` on the tier's files), ``corrupt records`` (bytes
  flipped in records on disk and in Redis), ``redis killed`` (SIGKILL, restarted half-way),
  ``redis paused`` (SIGSTOP, then SIGCONT), ``redis out of memory`` (``maxmemory`` at what it
  holds, ``noeviction``), ``throttled disk`` (50 write I/O operations a second, kernel limit),
  and ``recovered``.

It reports requests served, hit rate per phase, wrong blocks served, exceptions that escaped the
manager, blocks the CPU tier refused, scheduler-call latency (max, p99), RSS (after warm-up, peak,
final), and open descriptors, threads and ``/dev/shm`` entries at start and end.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.faults import ThrottledDisk, throttle_unavailable

PHASES = ("baseline", "disk full", "unwritable files", "corrupt records", "redis killed",
          "redis paused", "redis out of memory", "throttled disk", "recovered")
_BUCKETS = np.logspace(0, 7, 281)  # latency histogram edges in microseconds: 1 us .. 10 s


def _rss_kib() -> tuple[int, int]:
    """(current, peak) resident set of this process in KiB."""
    cur = peak = 0
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cur, peak


def _fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(out)


def _shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("kvtier-")}
    except OSError:
        return set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A redis-server on a loopback port that the soak kills, restarts and pauses."""

    def __init__(self, workdir: Path, maxmemory: int) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("the soak needs redis-server on PATH")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--maxmemory", str(self.maxmemory),
             "--maxmemory-policy", "allkeys-lru", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with self.client() as c:
                    c.ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A redis-py client (closed on exit)."""
        import redis

        c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        try:
            yield c
        finally:
            c.close()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """End the server (continuing it first if it was paused)."""
        self.signal(signal.SIGCONT)
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@dataclass
class PhaseStats:
    """What one phase saw."""

    name: str
    requests: int = 0
    looked_up: int = 0
    hit: int = 0
    refused: int = 0
    max_call_ms: float = 0.0
    slowest_call: str = ""
    slowest_cpu_ms: float = 0.0  # CPU time the slowest call used: the rest it waited
    calls_over_10ms: int = 0
    max_gc_ms: float = 0.0
    rss_mib: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"phase": self.name, "requests": self.requests, "blocks_looked_up": self.looked_up,
                "blocks_hit": self.hit,
                "hit_rate": self.hit / self.looked_up if self.looked_up else 0.0,
                "blocks_refused": self.refused, "max_call_ms": self.max_call_ms,
                "slowest_call": self.slowest_call, "slowest_call_cpu_ms": self.slowest_cpu_ms,
                "calls_over_10ms": self.calls_over_10ms, "max_gc_pause_ms": self.max_gc_ms,
                "rss_mib": self.rss_mib, "notes": self.notes}


class _Latency:
    """Max and a log-bucket histogram of call durations: constant memory however long the run."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(_BUCKETS) + 1, dtype=np.int64)
        self.max_us = 0.0
        self.slowest = ""

    def add(self, us: float, what: str) -> None:
        self.counts[int(np.searchsorted(_BUCKETS, us))] += 1
        if us > self.max_us:
            self.max_us = us
            self.slowest = what

    def quantile(self, q: float) -> float:
        total = int(self.counts.sum())
        if not total:
            return 0.0
        c = np.cumsum(self.counts)
        i = int(np.searchsorted(c, q * total))
        return float(_BUCKETS[min(i, len(_BUCKETS) - 1)])


def _payload(key: bytes, n: int) -> np.ndarray:
    return np.frombuffer((key * (n // len(key) + 1))[:n], dtype=np.uint8)


class Soak:
    """One soak run (see the module docstring)."""

    def __init__(self, seconds: float, *, block_bytes: int = 16384, cpu_slots: int = 256,
                 storage_bytes: int = 48 << 20, disk_bytes: int = 160 << 20,
                 redis_bytes: int = 32 << 20, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> None:
        self.seconds = seconds
        self.block_bytes = block_bytes
        self.cpu_slots = cpu_slots
        self.storage_bytes = storage_bytes
        self.disk_bytes = disk_bytes
        self.redis_bytes = redis_bytes
        self.rng = random.Random(seed)
        self.progress = progress or (lambda s: None)
        self.lat = _Latency()
        self.errors = 0
        self.first_error = ""
        self.wrong = 0
        self.phases: list[PhaseStats] = []

    # -- the stand-in engine ---------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except Exception:
            self.errors += 1
            if not self.first_error:
                self.first_error = traceback.format_exc()
            return None
        finally:
            us = (time.perf_counter() - t0) * 1e6
            self.lat.add(us, what)
            ph = self.phases[-1]
            if us > ph.max_call_ms * 1000:
                ph.max_call_ms = us / 1000
                ph.slowest_call = what
                ph.slowest_cpu_ms = (time.thread_time() - c0) * 1000
            if us > 10_000:
                ph.calls_over_10ms += 1

    def _request(self, n: int) -> list[bytes]:
        # A shared prefix (skewed choice among 300 conversations of 8 blocks), then 4 new blocks.
        conv = min(int(self.rng.paretovariate(1.1)) - 1, 299)
        keys = [f"conv{conv}-{i}".encode().ljust(32, b".") for i in range(8)]
        keys += [f"req{n}-{i}".encode().ljust(32, b".") for i in range(4)]
        return keys

    def _serve(self, m: Any, keys: list[bytes], ctx: Any, ph: PhaseStats) -> bool:
        """One request's scheduler calls: lookup, load and check, store. False: ask next step."""
        r = self._call("lookup", m.lookup, keys, ctx)
        if r is None:
            return False
        bb = self.block_bytes
        region = m.primary_blocks()
        if r:
            spec = self._call("prepare_load", m.prepare_load, keys[:r], ctx)
            if spec is not None:
                for key, slot in zip(keys[:r], spec.block_ids):
                    if not np.array_equal(region[int(slot)], _payload(key, bb)):
                        self.wrong += 1
                self._call("complete_load", m.complete_load, keys[:r], ctx)
        out = self._call("prepare_store", m.prepare_store, keys[r:], ctx)
        if out is None:
            ph.refused += len(keys) - r
        else:
            for key, slot in zip(out.keys_to_store, out.store_spec.block_ids):
                region[int(slot)] = _payload(key, bb)
            self._call("complete_store", m.complete_store, out.keys_to_store, ctx)
        ph.requests += 1
        ph.looked_up += len(keys)
        ph.hit += r
        return True

    # -- faults ----------------------------------------------------------------------------
    def _files(self, root: Path) -> list[Path]:
        return [p for p in root.rglob("*") if p.is_file()]

    def _corrupt(self, storage_root: Path, redis: RedisProcess, ph: PhaseStats) -> None:
        n = 0
        for p in self._files(storage_root):
            if p.name.startswith("slab-") and p.stat().st_size > 8192:
                with open(p, "r+b") as f:
                    for _ in range(20):
                        f.seek(self.rng.randrange(0, p.stat().st_size - 1))
                        f.write(bytes([self.rng.randrange(256)]))
                        n += 1
        with contextlib.suppress(Exception), redis.client() as c:
            keys = [k for _, k in zip(range(200), c.scan_iter(count=100))]
            for k in self.rng.sample(keys, min(40, len(keys))):
                c.setrange(k, self.rng.randrange(0, 4096 + self.block_bytes), b"\xa5")
                n += 1
        ph.notes.append(f"{n} bytes flipped")

    def _inject(self, name: str, ctx: dict[str, Any], ph: PhaseStats) -> Callable[[], None]:
        """Start phase ``name``'s fault; returns what heals it."""
        redis: RedisProcess = ctx["redis"]
        root: Path = ctx["storage"]
        disk: ThrottledDisk | None = ctx["disk"]
        if name == "disk full":
            filler = root.parent / "filler"
            st = os.statvfs(root)
            free = st.f_bavail * st.f_frsize
            with open(filler, "wb") as f:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(f.fileno(), 0, max(free, 1))
            ph.notes.append(f"filled {free >> 20} MiB")
            return lambda: filler.unlink(missing_ok=True)
        if name == "unwritable files":
            files = [str(p) for p in self._files(root)]
            if shutil.which("chattr") is None or not files:
                ph.notes.append("chattr unavailable: no fault")
                return lambda: None
            ok = subprocess.run(["chattr", "+i", *files], capture_output=True).returncode == 0
            ph.notes.append(f"chattr +i on {len(files)} files" if ok else "chattr +i failed")

            def writable() -> None:
                subprocess.run(["chattr", "-i", *files], capture_output=True)
            return writable
        if name == "corrupt records":
            self._corrupt(root, redis, ph)
            return lambda: None
        if name == "redis killed":
            redis.kill()
            return redis.start
        if name == "redis paused":
            redis.signal(signal.SIGSTOP)
            return lambda: redis.signal(signal.SIGCONT)
        if name == "redis out of memory":
            with redis.client() as c:
                used = int(c.info("memory")["used_memory"])
                c.config_set("maxmemory-policy", "noeviction")
                c.config_set("maxmemory", str(used))

            def heal() -> None:
                with redis.client() as c:
                    c.config_set("maxmemory", str(redis.maxmemory))
                    c.config_set("maxmemory-policy", "allkeys-lru")
            return heal
        if name == "throttled disk":
            if disk is None:
                ph.notes.append("no kernel throttle here: no fault")
                return lambda: None
            disk.set_iops(50)
            return lambda: disk.set_iops(None)
        return lambda: None

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the soak; returns the report."""
        import kvtier

        work = Path(tempfile.mkdtemp(prefix="kvtier-soak-"))
        disk: ThrottledDisk | None = None
        why = throttle_unavailable()
        try:
            if why is None:
                disk = ThrottledDisk(self.disk_bytes, str(work)).start()
                storage_root = disk.path / "tier"
            else:
                storage_root = work / "tier"
            storage_root.mkdir()
            redis = RedisProcess(work, self.redis_bytes)
            redis.start()
            try:
                return self._run(kvtier, storage_root, redis, disk, why)
            finally:
                redis.stop()
        finally:
            if disk is not None:
                disk.close()
            shutil.rmtree(work, ignore_errors=True)

    def _run(self, kvtier: Any, root: Path, redis: RedisProcess, disk: ThrottledDisk | None,
             why: str | None) -> dict[str, Any]:
        # One manager built and shut down first: what a process starts once (Python's resource
        # tracker and its pipe) is not counted as left open by the run.
        kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": self.block_bytes}, gpu_block_size=16,
                                     bytes_per_gpu_block=self.block_bytes).get_manager().shutdown()
        gc.collect()
        fds0, threads0, shm0 = _fd_targets(), threading.active_count(), _shm_entries()
        cfg = {"cpu_bytes_to_use": self.cpu_slots * self.block_bytes,
               "secondary_tiers": [
                   {"type": "storage", "path": str(root), "capacity_bytes": self.storage_bytes,
                    "n_read_threads": 2, "n_write_threads": 2},
                   # Sized to what the server holds (a few thousand blocks): the default
                   # remembers 262,144 keys, tens of MiB the run would spend filling.
                   {"type": "network", "url": redis.url, "presence_cache_keys": 16384}]}
        spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16,
                                            bytes_per_gpu_block=self.block_bytes,
                                            namespace="soak")
        m = spec.get_manager()
        region = spec.region_name
        ctx = {"redis": redis, "storage": root, "disk": disk}
        phase_s = self.seconds / len(PHASES)
        t_start = time.monotonic()
        n = 0
        pending: list[tuple[list[bytes], Any]] = []
        rss_warm = peak_rss = 0
        gc_t0 = [0.0]

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                gc_t0[0] = time.perf_counter()
            elif self.phases:
                ms = (time.perf_counter() - gc_t0[0]) * 1000
                self.phases[-1].max_gc_ms = max(self.phases[-1].max_gc_ms, ms)

        gc.callbacks.append(on_gc)
        try:
            for i, name in enumerate(PHASES):
                ph = PhaseStats(name)
                self.phases.append(ph)
                self.progress(f"phase {i + 1}/{len(PHASES)}: {name}")
                heal = self._inject(name, ctx, ph)
                healed = False
                end = t_start + (i + 1) * phase_s
                heal_at = t_start + (i + 0.5) * phase_s
                while (now := time.monotonic()) < end:
                    if not healed and now >= heal_at:
                        heal()
                        healed = True
                    t0 = time.monotonic()
                    still: list[tuple[list[bytes], Any]] = []
                    for keys, rctx in pending:
                        if not self._serve(m, keys, rctx, ph):
                            still.append((keys, rctx))
                    for _ in range(2):
                        n += 1
                        rctx = kvtier.ReqContext(f"r{n}")
                        keys = self._request(n)
                        if not self._serve(m, keys, rctx, ph):
                            still.append((keys, rctx))
                    pending = still
                    self._call("on_schedule_end", m.on_schedule_end)
                    self._call("take_events", m.take_events)
                    time.sleep(max(0.0, 0.01 - (time.monotonic() - t0)))
                if not healed:
                    heal()
                stats = m.get_stats()
                ph.notes.append("degraded: " + ", ".join(
                    t for t, s in stats["tiers"].items() if s.get("degraded")) or "none")
                rss, peak_rss = _rss_kib()
                ph.rss_mib = rss / 1024
                if i == 0:
                    rss_warm = rss
            final_stats = m.get_stats()
        finally:
            gc.callbacks.remove(on_gc)
            rss_final, peak_rss = _rss_kib()
            m.shutdown()
        del m, spec
        gc.collect()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (threading.active_count() > threads0
                                               or region in _shm_entries()):
            time.sleep(0.1)
        fds1, threads1, shm1 = _fd_targets(), threading.active_count(), _shm_entries()
        return {
            "seconds": self.seconds,
            "throttle": "kernel (loop device + cgroup)" if disk is not None else f"none: {why}",
            "requests": sum(p.requests for p in self.phases),
            "phases": [p.as_dict() for p in self.phases],
            "wrong_blocks": self.wrong,
            "exceptions_escaped": self.errors,
            "first_exception": self.first_error,
            "blocks_refused": sum(p.refused for p in self.phases),
            "call_latency_ms": {"max": self.lat.max_us / 1000, "p99": self.lat.quantile(0.99) / 1000,
                                "slowest_call": self.lat.slowest},
            "rss_mib": {"after_warmup": rss_warm / 1024, "peak": peak_rss / 1024,
                        "final": rss_final / 1024,
                        "growth_after_warmup": (rss_final - rss_warm) / rss_warm if rss_warm else 0},
            "fds": {"start": len(fds0), "end": len(fds1),
                    "left_open": sorted(set(fds1) - set(fds0))},
            "threads": {"start": threads0, "end": threads1},
            "shm_entries": {"start": len(shm0), "end": len(shm1),
                            "region_left_behind": region in shm1},
            "manager": final_stats["manager"],
            "tiers": {k: {s: v for s, v in t.items() if isinstance(v, (int, float, bool, str))}
                      for k, t in final_stats["tiers"].items()},
        }
