"""Storage tier throughput in steady state against the disk's raw parallel O_DIRECT speed, in one run.

For each block size (256 KiB and 2 MiB by default), on one directory:

* raw O_DIRECT (the baseline): 16 threads (``--threads``) doing O_DIRECT ``preadv`` (then
  ``pwritev``) of one block at a time, from an aligned buffer, on one preallocated (and written)
  file in the same directory (what ``fio --direct=1 --numjobs=16 --bs=<block>`` measures on one
  file), in two layouts: each thread over its own contiguous part of the file, and the threads
  interleaved block by block; and in two ways, in alternating order from round to round: every
  block through the thread's one reused buffer (fio's way), and every block from (into) its own
  place in memory as large as the data, as a cache tier's blocks are (a virtual disk's host
  copies the data, and which way it serves faster varies: either was ahead by up to a third in
  runs on the same day). Measured once per round in each layout and way; a round's raw figure is
  the best of the four, rounds interleaved with the systems below; the baseline is the best round.
* raw, one run (control): the raw file measured once per round the way a system is (the timed
  writes, then the reads; contiguous parts, distinct memory), in the systems' place in the
  round. It gets no best-of, so its ratios are what the disk's drift alone takes from a run
  scored against the best-of baseline: the yardstick for reading the systems' ratios.
* kvtier manager: the storage tier behind kvtier's manager, driven with the engine's calls, in
  steady state: the tier holds exactly the blocks of one measurement (``capacity_for``) and the
  CPU tier at least as many (every load lands in memory of its own, as the baseline's reads
  do), is filled once, then stores as many blocks again (every store evicts an old block: the timed writes,
  ``prepare_store``/``complete_store`` in requests of 32 blocks), then ``reset_cache`` and
  ``lookup`` each step until every request's blocks are promoted back (the timed reads; 8 requests
  of 32 blocks in flight). Every load verifies its checksums. Loads are split by phase: the
  scheduler's calls, a request's wait from its first lookup to its answer, and per I/O chunk the
  time queued, reading, verifying and in bookkeeping.
* kvtier manager, Python I/O (``--systems`` ``manager-python``, not measured by default): the same
  with the tier's ``native_io: false``, every run of records sealed, written, read and hashed in
  Python, to measure what the native record I/O is worth in the same rounds.
* kvtier tier: the same steady state through the tier's own contract
  (``submit_store``/``submit_load``/``poll``), jobs of 32 blocks, 8 in flight.
* vLLM 0.33's ``fs`` tier through its ``TieringOffloadingManager`` and LMCache 0.5.6's
  ``LocalDiskBackend`` (``storage_peers.py``), when available.

Before each timed phase the disk is given a moment (``sync``, ``--settle`` seconds) to finish what
the last phase wrote. Ratios: each run over the best raw round of the same block size; and, as a
shared disk drifts, also against the raw rounds' median and against the raw run of the same round.
Then it times
the index rebuild of a tier holding ``--rebuild-blocks`` small blocks. Usage::

    python benchmarks/bench_storage.py --dir /work/bench-storage [--sizes 262144,2097152]
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pagemap import segments_per_block
from raw_direct import direct_io
from storage_peers import LMCACHE_NOTES, lmcache_throughput, lmcache_worker, vllm_throughput

MiB = 1 << 20
JOB_BLOCKS = 32  # blocks per job / per request
RAW, ONE_BUFFER, DISTINCT = "raw O_DIRECT", "raw, one buffer a thread", "raw, distinct memory"
CONTROL = "raw, one run (control)"
Result = tuple[float, float, dict[str, float]]  # write GB/s, read GB/s, load phases


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def settle(seconds: float) -> None:
    """Let the disk finish what the last phase wrote before the next one is timed."""
    os.sync()
    time.sleep(seconds)


# -- raw ---------------------------------------------------------------------------------------
class RawFile:
    """The baseline: ``threads`` threads of O_DIRECT I/O on one preallocated file, each block
    from (into) the thread's one reused buffer, and from (into) distinct memory."""

    def __init__(self, directory: str, block: int, threads: int, total: int) -> None:
        self.block, self.threads = block, threads
        self.per = max(1, total // threads // block)
        self.path = os.path.join(directory, "raw-baseline")
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, self.per * threads * block)
        finally:
            os.close(fd)
        # a place of its own for every block of the file, in memory of the kind kvtier's CPU
        # region is (shared memory, huge pages advised, populated), filled now
        from kvtier.memory.region import BlockRegion

        self.region = BlockRegion(f"kvtier-bench-raw-{os.getpid()}-{block}", self.per * threads,
                                  block, owner=True)
        flat = self.region.array.reshape(-1)
        step = 64 * MiB
        for at in range(0, len(flat), step):
            n = min(step, len(flat) - at)
            flat[at : at + n] = np.random.default_rng(at).integers(0, 256, n, dtype=np.uint8)
        self.memory = memoryview(flat)  # released before the region closes
        self.segments = segments_per_block(flat, block)
        self._run("w")  # written once: reads then come from the disk, not unwritten extents

    def _run(self, mode: str, strided: bool = False, distinct: bool = False) -> float:
        block, per, threads = self.block, self.per, self.threads
        self.cpu = time.process_time()
        targets = [(self.path, [j * block for j in (
            range(i, per * threads, threads) if strided else range(i * per, (i + 1) * per))])
            for i in range(threads)]
        rate = direct_io(targets, block, mode, self.memory if distinct else None)
        self.cpu = (time.process_time() - self.cpu) / (per * threads * block / 2**30)
        return rate

    def measure(self, settle_s: float, distinct: bool = False) -> list[Result]:
        """[(write GB/s, read GB/s, phases)] of each layout: each thread on its own contiguous
        part of the file, then the threads interleaved block by block (a read pass, then an
        overwrite pass, each). ``distinct``: every block from (into) its own memory instead of
        the thread's one buffer."""
        out: list[Result] = []
        for strided in (False, True):
            settle(settle_s)
            r = self._run("r", strided, distinct)
            cpu = self.cpu
            settle(settle_s)
            w = self._run("w", strided, distinct)
            out.append((w, r, self._phases(cpu, distinct)))
        return out

    def _phases(self, cpu: float, distinct: bool) -> dict[str, float]:
        """A run's CPU seconds per GiB, and its memory's contiguity where it used the distinct
        memory and pagemap could tell."""
        phases = {"cpu_s_per_gib": cpu}
        if distinct and self.segments is not None:
            phases["mem_segments"] = self.segments
        return phases

    def single(self, settle_s: float) -> Result:
        """One run measured as a system is: the timed writes, then the reads, once each (each
        thread over its own contiguous part, every block from or into its own memory), with no
        best-of. Scored like the systems, it shows what the disk's drift alone costs a run
        against the best-of baseline."""
        settle(settle_s)
        w = self._run("w", False, True)
        settle(settle_s)
        r = self._run("r", False, True)
        return w, r, self._phases(self.cpu, True)

    def close(self) -> None:
        """Remove the file."""
        self.memory.release()
        self.region.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


# -- kvtier ------------------------------------------------------------------------------------
def _primary(slots: int, block: int) -> np.ndarray:
    buf = mmap.mmap(-1, slots * block)
    arr = np.frombuffer(buf, dtype=np.uint8).reshape(slots, block)
    arr[:] = np.random.default_rng(0).integers(0, 256, (slots, block), dtype=np.uint8)
    return arr


def _keys(tag: str, n: int) -> list[bytes]:
    return [tag.encode() + i.to_bytes(8, "little") * 3 + b"\0" * 7 for i in range(n)]


def _drive(tier: Any, submit: Callable[[int, list[bytes], np.ndarray], None], keys: list[bytes],
           slots: int, job_blocks: int, in_flight: int) -> tuple[float, int]:
    """Submit ``keys`` in jobs, at most ``in_flight`` at a time; returns (seconds, failed keys)."""
    jobs = [keys[i : i + job_blocks] for i in range(0, len(keys), job_blocks)]
    pending: set[int] = set()
    failed = 0
    next_slot = 0
    t0 = time.perf_counter()
    j = 0
    while j < len(jobs) or pending:
        while j < len(jobs) and len(pending) < in_flight:
            ks = jobs[j]
            sl = (np.arange(len(ks)) + next_slot) % slots
            next_slot = (next_slot + len(ks)) % slots
            submit(j + 1, ks, sl)
            pending.add(j + 1)
            j += 1
        for res in tier.poll():
            pending.discard(res.job_id)
            failed += len(res.failed_keys)
        time.sleep(0.0002)  # an engine step's worth of other work
    return time.perf_counter() - t0, failed


def kvtier_throughput(directory: str, block: int, total: int, args: argparse.Namespace) -> Result:
    """Steady state through the storage tier's contract: (write GB/s, read GB/s, {})."""
    from kvtier.format.record import namespace_fingerprint
    from kvtier.tiers.base import TierContext
    from kvtier.tiers.storage import StorageTier

    n = max(1, total // block)
    slots = n  # every block in memory of its own, as in the raw baseline (and the manager's run)
    primary = _primary(slots, block)
    ns = f"bench/{block}"
    ctx = TierContext(ns, namespace_fingerprint(ns), block, primary, "storage0")
    path = os.path.join(directory, "kvtier")
    shutil.rmtree(path, ignore_errors=True)
    half = args.threads // 2
    tier = StorageTier(ctx, path=path, capacity_bytes=StorageTier.capacity_for(n, block),
                       n_read_threads=half, n_write_threads=args.threads - half)
    try:
        fill, keys = _keys("f", n), _keys("s", n)
        _, f0 = _drive(tier, tier.submit_store, fill, slots, args.job_blocks, args.jobs_in_flight)
        settle(args.settle)
        dt_w, fw = _drive(tier, tier.submit_store, keys, slots, args.job_blocks, args.jobs_in_flight)
        settle(args.settle)
        dt_r, fr = _drive(tier, tier.submit_load, keys, slots, args.job_blocks, args.jobs_in_flight)
        st = tier.stats()
        if f0 or fw or fr or st["corrupt"] or st["evictions"] < n:
            raise RuntimeError(f"storage tier: failed keys {f0}/{fw}/{fr}, stats {st}")
        return n * block / dt_w / 1e9, n * block / dt_r / 1e9, {}
    finally:
        tier.shutdown()
        shutil.rmtree(path, ignore_errors=True)


def rebuild_seconds(directory: str, blocks: int, block: int) -> float:
    """Index rebuild time of a tier holding ``blocks`` blocks of ``block`` bytes."""
    from kvtier.format.record import namespace_fingerprint
    from kvtier.tiers.base import TierContext
    from kvtier.tiers.storage import StorageTier

    slots = 256
    primary = _primary(slots, block)
    ns = "bench/rebuild"
    ctx = TierContext(ns, namespace_fingerprint(ns), block, primary, "storage0")
    path = os.path.join(directory, "rebuild")
    shutil.rmtree(path, ignore_errors=True)
    cap = blocks * (block + 8192) + 64 * MiB
    tier = StorageTier(ctx, path=path, capacity_bytes=cap)
    try:
        keys = [i.to_bytes(8, "little") * 4 for i in range(blocks)]
        _, failed = _drive(tier, tier.submit_store, keys, slots, 256, 1)
        assert failed == 0 and tier.stats()["blocks"] == blocks
    finally:
        tier.shutdown()
    os.sync()
    tier = StorageTier(ctx, path=path, capacity_bytes=cap)
    try:
        st = tier.stats()
        assert st["blocks"] == blocks, st
        return float(st["index_rebuild_seconds"])
    finally:
        tier.shutdown()
        shutil.rmtree(path, ignore_errors=True)



def _manager_store(m: Any, keys: list[bytes]) -> None:
    import kvtier

    for j in range(0, len(keys), JOB_BLOCKS):
        ctx = kvtier.ReqContext(f"w{j}")
        batch = keys[j : j + JOB_BLOCKS]
        out = m.prepare_store(batch, ctx)
        while out is None:  # every slot is still being written out: next step
            m.on_schedule_end()
            time.sleep(0.0002)
            out = m.prepare_store(batch, ctx)
        m.complete_store(out.keys_to_store, ctx)
        m.on_schedule_end()
    while m.has_pending_work():
        m.on_schedule_end()
        time.sleep(0.0002)


def kvtier_manager_python_throughput(directory: str, block: int, total: int,
                                     args: argparse.Namespace) -> Result:
    """``kvtier_manager_throughput`` with the native record I/O turned off."""
    return kvtier_manager_throughput(directory, block, total, args, native_io=False)


def manager_for(path: str, block: int, n: int, threads: int, jobs_in_flight: int,
                native_io: bool = True, cpu_bytes: int = 0, namespace: str = "") -> Any:
    """A kvtier manager over a storage tier at ``path`` holding exactly ``n`` blocks, configured
    to measure throughput, its CPU region written (``cpu_bytes``: the CPU tier's size; 0: the
    size below)."""
    import kvtier
    from kvtier.tiers.storage import StorageTier

    half = threads // 2
    # This measures the tier's throughput, so every block goes to it (no backpressure drops: the
    # writer waits for slots instead) and requests wait for all their blocks however long the
    # queue ahead of them (8 requests of 32 blocks in flight), past any promotion deadline. The
    # CPU tier holds 4 times the blocks of the requests in flight: blocks loaded early stay
    # pinned until their promotion job ends (a job spans the requests of a step), so with twice
    # the blocks in flight a new request could find no slot and be answered with misses. And it
    # holds at least one measurement's blocks: every load lands in memory of its own, as the
    # raw baseline's reads do and as they do in an engine's CPU tier of many GiB. Cycling 1 GiB
    # of loads through a 256 MiB tier (the size before 2026-12-01 14:00 at 256 KiB) read 8-10%
    # slower on this host's virtual disk, the same native reads 25-35% (docs/BENCHMARKS.md).
    cpu_bytes = cpu_bytes or max(n * block, 4 * jobs_in_flight * JOB_BLOCKS * block)
    cfg = {"cpu_bytes_to_use": cpu_bytes,
           "promotion_deadline_seconds": 600, "secondary_tiers": [
               {"type": "storage", "path": path, "capacity_bytes": StorageTier.capacity_for(n, block),
                "n_read_threads": half, "n_write_threads": threads - half,
                "max_pinned_share": 1.0, "slow_store_factor": 1e9, "native_io": native_io}]}
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=block,
                                        namespace=namespace or f"bench/{block}")
    m = spec.get_manager()
    m.primary_blocks()[:] = 1  # an engine's worker has written the slots before they are stored
    return m


def manager_load(m: Any, keys: list[bytes], jobs_in_flight: int
                 ) -> tuple[float, float, list[float], float]:
    """Promote ``keys`` back (after ``reset_cache``) as an engine asks for them: requests of
    ``JOB_BLOCKS`` keys, ``jobs_in_flight`` at a time, ``lookup`` each step until answered.
    Returns (seconds, CPU seconds of the process, each request's wait from its first lookup to
    its answer, seconds in the scheduler's calls). RuntimeError when a block was not served."""
    import kvtier

    n = len(keys)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    pending: dict[str, tuple[list[bytes], float]] = {}
    waits: list[float] = []
    nxt = served = 0
    sched = 0.0
    while nxt < n or pending:
        ts = time.perf_counter()
        while nxt < n and len(pending) < jobs_in_flight:
            pending[f"r{nxt}"] = (keys[nxt : nxt + JOB_BLOCKS], ts)
            nxt += JOB_BLOCKS
        for rid, (batch, first) in list(pending.items()):
            r = m.lookup(batch, kvtier.ReqContext(rid))
            if r is not None:
                served += r
                waits.append(time.perf_counter() - first)
                del pending[rid]
        m.on_schedule_end()
        sched += time.perf_counter() - ts
        time.sleep(0.0002)  # the rest of an engine step
    if served != n:
        raise RuntimeError(f"kvtier manager served {served} of {n} blocks")
    return time.perf_counter() - t0, time.process_time() - cpu0, waits, sched


def kvtier_manager_throughput(directory: str, block: int, total: int, args: argparse.Namespace,
                              native_io: bool = True) -> Result:
    """Steady state through kvtier's manager: (write GB/s, read GB/s, load phases)."""
    n = max(1, total // block)
    path = os.path.join(directory, "kvtier-manager")
    shutil.rmtree(path, ignore_errors=True)
    m = manager_for(path, block, n, args.threads, args.jobs_in_flight, native_io)
    segments = segments_per_block(m.primary_blocks(), block)
    fill, keys = _keys("f", n), _keys("s", n)
    tier_name = m.tiers[0].name
    try:
        _manager_store(m, fill)  # the slab files exist and the tier is full
        settle(args.settle)
        sw0 = m.get_stats()["tiers"][tier_name]
        t0 = time.perf_counter()
        _manager_store(m, keys)  # every block stored evicts one
        dt_w = time.perf_counter() - t0
        sw1 = m.get_stats()["tiers"][tier_name]
        settle(args.settle)
        m.reset_cache()
        st0 = m.get_stats()
        dt_r, cpu_s, waits, sched = manager_load(m, keys, args.jobs_in_flight)
        cpu = cpu_s / (n * block / 2**30)
        st1 = m.get_stats()
        t0s, t1s = st0["tiers"][tier_name], st1["tiers"][tier_name]
        if (t1s["corrupt"] or t1s["load_failures"] or t1s["evictions"] < n
                or st1["manager"].get("backpressure_dropped", 0)):
            raise RuntimeError(f"kvtier manager: stats {st1}")
        d = {k: float(t1s.get(k, 0) - t0s.get(k, 0)) for k in (
            "load_chunks", "load_wait_seconds", "load_read_seconds", "load_check_seconds",
            "load_other_seconds", "hits")}
        chunks = max(1.0, d["load_chunks"])
        phases = {
            **({} if segments is None else {"mem_segments": segments}),
            "cpu_s_per_gib": cpu,
            "request_wait_ms": 1e3 * statistics.mean(waits),
            "scheduler_share": sched / dt_r,
            "blocks_per_chunk": d["hits"] / chunks,
            "chunk_wait_ms": 1e3 * d["load_wait_seconds"] / chunks,
            "chunk_read_ms": 1e3 * d["load_read_seconds"] / chunks,
            "chunk_check_ms": 1e3 * d["load_check_seconds"] / chunks,
            "chunk_other_ms": 1e3 * d["load_other_seconds"] / chunks,
        }
        dw = {k: float(sw1.get(k, 0) - sw0.get(k, 0)) for k in (
            "store_chunks", "store_wait_seconds", "store_write_seconds", "store_log_seconds",
            "store_other_seconds")}
        if dw["store_chunks"]:
            phases.update({
                "store_chunk_wait_ms": 1e3 * dw["store_wait_seconds"] / dw["store_chunks"],
                "store_write_us": 1e6 * dw["store_write_seconds"] / n,
                "store_log_us": 1e6 * dw["store_log_seconds"] / n,
                "store_other_us": 1e6 * dw["store_other_seconds"] / n,
                "store_wall_us": 1e6 * dt_w / n,
            })
        return n * block / dt_w / 1e9, n * block / dt_r / 1e9, phases
    finally:
        m.shutdown()
        shutil.rmtree(path, ignore_errors=True)


PHASES = [
    ("mem_segments", "memory: physically contiguous runs per block (1: one; pagemap, as root)"),
    ("cpu_s_per_gib", "CPU seconds per GiB loaded (all threads)"),
    ("request_wait_ms", "request: first lookup to answer (ms)"),
    ("scheduler_share", "scheduler calls (lookup, on_schedule_end), share of wall time"),
    ("blocks_per_chunk", "blocks per I/O chunk"),
    ("chunk_wait_ms", "chunk: queued until a thread takes it (ms)"),
    ("chunk_read_ms", "chunk: reading, preadv (native: with the hashes and the wait for a thread) (ms)"),
    ("chunk_check_ms", "chunk: verifying headers and checksums (ms)"),
    ("chunk_other_ms", "chunk: bookkeeping (ms)"),
    ("store_chunk_wait_ms", "store chunk: queued until a thread takes it (ms)"),
    ("store_write_us", "store, thread time per block: records (header, checksum, pwritev) (us)"),
    ("store_log_us", "store, thread time per block: log appends, DEL and PUT (us)"),
    ("store_other_us", "store, thread time per block: the rest (us)"),
    ("store_wall_us", "store: wall time per block (us)"),
]


def _raw_round(raw: RawFile, runs: dict[str, list[Result]], rep: int, args: argparse.Namespace,
               block: int) -> None:
    """One round of the baseline: both ways (in alternating order), each in its better layout;
    the round's raw figure is the better of the two ways."""
    _progress(f"{block >> 10} KiB, round {rep + 1}/{args.repeat}: raw")
    for distinct in (False, True) if rep % 2 == 0 else (True, False):
        layouts = raw.measure(args.settle, distinct)
        runs[DISTINCT if distinct else ONE_BUFFER].append(
            (max(x[0] for x in layouts), max(x[1] for x in layouts), layouts[0][2]))
    a, b = runs[ONE_BUFFER][-1], runs[DISTINCT][-1]
    runs[RAW].append((max(a[0], b[0]), max(a[1], b[1]), a[2]))


def main() -> None:
    """Run the storage benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/work/bench-storage", help="directory on the disk to measure")
    ap.add_argument("--sizes", default=f"{256 << 10},{2 << 20}", help="block sizes in bytes")
    ap.add_argument("--total-mib", type=int, default=1024, help="data per measurement")
    ap.add_argument("--threads", type=int, default=16, help="I/O threads (readers + writers)")
    ap.add_argument("--job-blocks", type=int, default=JOB_BLOCKS, help="blocks per tier job")
    ap.add_argument("--jobs-in-flight", type=int, default=8)
    ap.add_argument("--rebuild-blocks", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds: raw and every system once each (raw first in odd rounds, last in even)")
    ap.add_argument("--raw-first", action="store_true",
                    help="raw first in every round (the order before 2026-12-01)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds the disk gets (after a sync) before each timed phase")
    ap.add_argument("--systems", default="control,manager,tier,vllm,lmcache",
                    help="which systems to measure beside raw (control, manager, tier, vllm, "
                         "lmcache; also manager-python: the manager with native_io false)")
    ap.add_argument("--peers-python", default="/work/peers-venv/bin/python",
                    help="python of a venv with lmcache==0.5.6 ('' to skip LMCache)")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's fs tier")
    ap.add_argument("--json", help="also write results here")
    ap.add_argument("--lmcache-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lmcache_worker:
        print(json.dumps(lmcache_worker(args.dir, int(args.sizes), args.total_mib * MiB, args.threads)))
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("vllm").setLevel(logging.ERROR)
    os.makedirs(args.dir, exist_ok=True)
    st = os.statvfs(args.dir)
    df = subprocess.run(["df", "--output=source,fstype", args.dir], capture_output=True, text=True)
    dev = " ".join(df.stdout.split()[2:4])
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"{platform.platform()}; load average {os.getloadavg()[0]:.1f}")
    print(f"disk: {args.dir} on {dev}, free {st.f_bavail * st.f_frsize / 2**30:.1f} GiB")
    print(f"{args.threads} I/O threads everywhere; jobs of {args.job_blocks} blocks, "
          f"{args.jobs_in_flight} in flight; {args.total_mib} MiB per measurement, {args.repeat} rounds")
    total = args.total_mib * MiB
    wanted = set(args.systems.split(","))
    systems: list[tuple[str, Callable[..., Result] | None]] = []  # None: the control
    if "control" in wanted:
        systems.append((CONTROL, None))
    if "manager" in wanted:
        systems.append(("kvtier manager", kvtier_manager_throughput))
    if "manager-python" in wanted:
        systems.append(("kvtier manager, Python I/O", kvtier_manager_python_throughput))
    if "tier" in wanted:
        systems.append(("kvtier tier", kvtier_throughput))
    skipped: list[str] = []
    if "vllm" in wanted and not args.no_vllm:
        try:
            import vllm.v1.kv_offload.tiering.spec  # noqa: F401
            systems.append(("vLLM fs (manager)", vllm_throughput))
        except Exception as e:
            skipped.append(f"vLLM 0.33 fs tier: cannot import ({type(e).__name__}: {e})")
    if "lmcache" in wanted and args.peers_python:
        if os.path.exists(args.peers_python):
            systems.append(("LMCache LocalDisk", lmcache_throughput))
        else:
            skipped.append(f"LMCache: {args.peers_python} does not exist")
    rows: list[dict[str, Any]] = []
    phase_rows: list[dict[str, Any]] = []
    for block in [int(x) for x in args.sizes.split(",") if x]:
        raw = RawFile(args.dir, block, args.threads, total)
        runs: dict[str, list[Result]] = {RAW: [], ONE_BUFFER: [], DISTINCT: []}
        runs.update({name: [] for name, _ in systems})
        failed: set[str] = set()
        try:
            for rep in range(args.repeat):
                raw_last = rep % 2 == 1 and not args.raw_first
                if not raw_last:
                    _raw_round(raw, runs, rep, args, block)
                for name, fn in systems:
                    if name in failed:
                        continue
                    _progress(f"{block >> 10} KiB, round {rep + 1}/{args.repeat}: {name}")
                    try:
                        runs[name].append(raw.single(args.settle) if fn is None
                                          else fn(args.dir, block, total, args))
                    except Exception as e:
                        skipped.append(f"{name} at {block >> 10} KiB failed: {type(e).__name__}: {e}")
                        failed.add(name)
                if raw_last:
                    _raw_round(raw, runs, rep, args, block)
        finally:
            raw.close()
        raws = runs[RAW]
        best_w, best_r = max(r[0] for r in raws), max(r[1] for r in raws)
        med_w, med_r = statistics.median(r[0] for r in raws), statistics.median(r[1] for r in raws)
        for name, vals in runs.items():
            if not vals:
                continue
            wr = [v[0] / best_w for v in vals]
            rr = [v[1] / best_r for v in vals]
            paired = [(v[0] / raws[i][0], v[1] / raws[i][1]) for i, v in enumerate(vals)]
            rows.append({"block": block, "system": name,
                         "write_gbps": statistics.median(v[0] for v in vals),
                         "read_gbps": statistics.median(v[1] for v in vals),
                         "write_ratio": statistics.median(wr), "read_ratio": statistics.median(rr),
                         "write_ratios": wr, "read_ratios": rr,
                         "write_x_median_raw": statistics.median(v[0] for v in vals) / med_w,
                         "read_x_median_raw": statistics.median(v[1] for v in vals) / med_r,
                         "write_x_same_round": statistics.median(p[0] for p in paired),
                         "read_x_same_round": statistics.median(p[1] for p in paired),

                         "best_raw": [best_w, best_r], "runs": [list(v[:2]) for v in vals]})
            keys = [k for k, _ in PHASES if k in vals[0][2]]
            if keys:
                phase_rows.append({"block": block, "system": name, **{
                    k: statistics.median(v[2][k] for v in vals) for k in keys}})
    print()
    print("| block | system | write GB/s | x best raw | x median raw | x same round | read GB/s "
          "| x best raw | x median raw | x same round | per-run read x best raw |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        per_run = ", ".join(f"{x:.2f}" for x in row["read_ratios"])
        print(f"| {row['block'] >> 10} KiB | {row['system']} | {row['write_gbps']:.2f} | "
              f"{row['write_ratio']:.2f} | {row['write_x_median_raw']:.2f} | "
              f"{row['write_x_same_round']:.2f} | {row['read_gbps']:.2f} | {row['read_ratio']:.2f} | "
              f"{row['read_x_median_raw']:.2f} | {row['read_x_same_round']:.2f} | {per_run} |")
    print("(GB/s: medians over the rounds. Raw, one buffer a thread: every block through the "
          "thread's one buffer (as fio does); raw, distinct memory: every block from or into "
          "memory of its own; each round's better layout. 'raw O_DIRECT', the baseline: each "
          "round's better of the two; raw, one run (control): one run a round, measured as the systems "
          "are, no best-of. 'x best raw': median of each run's ratio to the best raw "
          "round; 'x median raw': median GB/s over the raw rounds' median; 'x same round': median "
          "of each run's ratio to the raw run of its round)")
    if phase_rows:
        print()
        print("Loads (and the timed stores) by phase, medians over the rounds:")
        print()
        print("| phase | " + " | ".join(f"{r['block'] >> 10} KiB {r['system']}" for r in phase_rows)
              + " |")
        print("|---|" + "---:|" * len(phase_rows))
        for key, label in PHASES:
            print(f"| {label} | " + " | ".join(f"{r[key]:.2f}" if key in r else "" for r in phase_rows)
                  + " |")
    for note in dict.fromkeys(LMCACHE_NOTES + skipped):
        print(f"note: {note}")
    rebuilds: list[dict[str, float]] = []
    plan = [(args.rebuild_blocks, 4096), (args.rebuild_blocks // 10, 256 << 10)]
    for blocks, size in plan if args.rebuild_blocks else []:
        _progress(f"index rebuild: writing {blocks} blocks of {size >> 10} KiB")
        rb = rebuild_seconds(args.dir, blocks, size)
        rebuilds.append({"blocks": blocks, "block_bytes": size, "seconds": rb})
        print(f"index rebuild at start: {blocks} blocks of {size >> 10} KiB in {rb:.2f} s "
              f"({rb / blocks * 1e6:.1f} us per block)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "phases": phase_rows, "rebuilds": rebuilds,
                       "notes": LMCACHE_NOTES + skipped}, f, indent=2)


if __name__ == "__main__":
    main()
