"""The storage tier shared by several engines (processes) on one directory, in one run.

It measures, on one directory of one disk:

1. **delay until another engine's block is found**: engine A stores one block; engine B, in
   another process, asks its storage tier's ``lookup`` every 0.5 ms; the delay is from A's store
   job finishing to B's first hit. kvtier with ``sync_seconds`` 1.0 (the default) and 0.1;
   vLLM 0.33's ``fs`` tier (one file per block, found by B's existence probe once A renamed it)
   with the same two processes as the baseline.
2. **lookup of 1,000 blocks another engine stored**: kvtier's ``lookup`` (one call, answered
   from the index the logs built) against vLLM's ``fs`` existence probe (its
   ``FsAsyncLookupManager.batch_lookup``: one ``os.path.exists`` per key), best of 20 calls.
3. **write and read throughput with 1, 2 and 4 engines**: N engine processes share the
   directory (16 / N I/O threads each, so 16 in all); each writes its share of ``--total-mib``
   through its tier's ``submit_store``/``poll`` (jobs of 32 blocks, 8 in flight), then each
   reads the blocks *another* engine wrote (itself with one engine). Aggregate GB/s = bytes /
   (last end - first start). The baseline, run just before each: 16 threads of raw O_DIRECT
   ``pwritev``/``preadv`` on their own preallocated files in the same directory.

Usage::

    python benchmarks/bench_storage_shared.py --dir /work/bench-shared [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import platform
import random
import select
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
from raw_direct import direct_io

MiB = 1 << 20
JOB_BLOCKS = 32


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# -- the worker process ------------------------------------------------------------------------
def _keys(salt: str, n: int, start: int = 0) -> list[bytes]:
    return [f"{salt}:{i}".encode().ljust(32, b".") for i in range(start, start + n)]


class _Worker:
    """One engine: a storage tier over its own primary memory, driven like bench_storage does."""

    def __init__(self, a: dict[str, Any]) -> None:
        from kvtier.format.record import namespace_fingerprint
        from kvtier.tiers.base import TierContext
        from kvtier.tiers.storage import StorageTier

        self.block = int(a["block"])
        self.slots = JOB_BLOCKS * 8
        buf = mmap.mmap(-1, self.slots * self.block)
        self.primary = np.frombuffer(buf, dtype=np.uint8).reshape(self.slots, self.block)
        self.primary[:] = np.random.default_rng(os.getpid()).integers(0, 256, self.primary.shape,
                                                                      dtype=np.uint8)
        ns = f"bench-shared/{self.block}"
        ctx = TierContext(ns, namespace_fingerprint(ns), self.block, self.primary, "storage0")
        half = max(1, a["threads"] // 2)
        self.tier = StorageTier(ctx, path=a["dir"], capacity_bytes=a["capacity"],
                                n_read_threads=half, n_write_threads=max(1, a["threads"] - half),
                                sync_seconds=a["sync_seconds"], slab_bytes=a.get("slab_bytes", 1 << 30))
        self.jobs = 0

    def drive(self, kind: str, keys: list[bytes]) -> tuple[float, float, int]:
        """Submit ``keys`` in jobs of 32, 8 in flight; (start, end, failed keys)."""
        submit = self.tier.submit_store if kind == "store" else self.tier.submit_load
        jobs = [keys[i : i + JOB_BLOCKS] for i in range(0, len(keys), JOB_BLOCKS)]
        pending: set[int] = set()
        failed = 0
        nxt = 0
        t0 = time.monotonic()
        j = 0
        while j < len(jobs) or pending:
            while j < len(jobs) and len(pending) < 8:
                ks = jobs[j]
                sl = (np.arange(len(ks)) + nxt) % self.slots
                nxt = (nxt + len(ks)) % self.slots
                self.jobs += 1
                submit(self.jobs, ks, sl)
                pending.add(self.jobs)
                j += 1
            for res in self.tier.poll():
                pending.discard(res.job_id)
                failed += len(res.failed_keys)
            time.sleep(0.0002)
        return t0, time.monotonic(), failed

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        tier = self.tier
        if op == "balance":  # wait until capacity is split among the engines
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                tier.sync_now()
                st = tier.stats()
                if st["engines"] == cmd["engines"] and st["regions_owned"] >= st["regions"] // cmd["engines"]:
                    break
                time.sleep(0.05)
            return {"regions_owned": tier.stats()["regions_owned"]}
        if op in ("write", "read"):
            keys = _keys(cmd["salt"], cmd["n"])
            t0, t1, failed = self.drive("store" if op == "write" else "load", keys)
            return {"t0": t0, "t1": t1, "failed": failed}
        if op == "sync":
            tier.sync_now()
            return {"blocks": tier.stats()["blocks"]}
        if op == "store_one":
            t0, t1, failed = self.drive("store", _keys(cmd["salt"], 1, cmd["i"]))
            return {"t": t1, "failed": failed}
        if op == "watch":
            key = _keys(cmd["salt"], 1, cmd["i"])
            deadline = time.monotonic() + 30
            while tier.lookup(key) != 1 and time.monotonic() < deadline:
                time.sleep(0.0005)
            return {"t": time.monotonic()}
        if op == "lookup":
            keys = _keys(cmd["salt"], cmd["n"])
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                found = tier.lookup(keys)
                times.append(time.perf_counter() - t0)
            return {"best_s": min(times), "median_s": statistics.median(times), "found": found}
        if op == "stats":
            return dict(tier.stats())
        raise ValueError(op)


class _VllmWorker:
    """vLLM 0.33's fs tier's own functions: its file names, block writes and existence probe."""

    def __init__(self, a: dict[str, Any]) -> None:
        from vllm.v1.kv_offload.file_mapper import FileMapper
        from vllm.v1.kv_offload.tiering.fs.io import probe_o_direct
        from vllm.v1.kv_offload.tiering.fs.manager import FsAsyncLookupManager

        self.block = int(a["block"])
        self.mapper = FileMapper(root_dir=a["dir"], model_name="bench", tokens_per_hash=16,
                                 blocks_per_file=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
                                 rank=0, dtype="bfloat16")
        self.buf = mmap.mmap(-1, self.block)
        self.buf.write(os.urandom(self.block))
        self.direct = probe_o_direct(a["dir"])

        class _Tier:
            file_mapper = self.mapper

        self.lookup = FsAsyncLookupManager(_Tier(), "fs")  # type: ignore[arg-type]

    def key(self, salt: str, i: int) -> bytes:
        from vllm.v1.kv_offload.base import make_offload_key

        return make_offload_key(_keys(salt, 1, i)[0], 0)

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from vllm.v1.kv_offload.base import ReqContext
        from vllm.v1.kv_offload.tiering.fs.io import batch_store_block

        op = cmd["op"]
        if op == "store_one" or op == "write":
            n = cmd.get("n", 1)
            start = cmd.get("i", 0)
            paths = [self.mapper.get_file_name(self.key(cmd["salt"], start + j)) for j in range(n)]
            batch_store_block(paths, memoryview(self.buf), [0] * n, self.block, self.direct)
            return {"t": time.monotonic()}
        ctx = ReqContext(req_id="bench")
        if op == "watch":
            keys = [self.key(cmd["salt"], cmd["i"])]
            deadline = time.monotonic() + 30
            while not all(self.lookup.batch_lookup(keys, ctx)) and time.monotonic() < deadline:
                time.sleep(0.0005)
            return {"t": time.monotonic()}
        if op == "lookup":
            keys = [self.key(cmd["salt"], i) for i in range(cmd["n"])]
            times = []
            found = 0
            for _ in range(20):
                t0 = time.perf_counter()
                found = sum(1 for x in self.lookup.batch_lookup(keys, ctx) if x)
                times.append(time.perf_counter() - t0)
            return {"best_s": min(times), "median_s": statistics.median(times), "found": found}
        raise ValueError(op)


def worker_main(args: dict[str, Any]) -> None:
    """Serve JSON commands on stdin (see ``Engine``)."""
    logging.basicConfig(level=logging.WARNING)
    w: Any = _VllmWorker(args) if args.get("vllm") else _Worker(args)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            if not args.get("vllm"):
                w.tier.shutdown()
            print(json.dumps({"bye": True}), flush=True)
            return
        print(json.dumps(w.handle(cmd)), flush=True)


class Engine:
    """A worker process."""

    def __init__(self, **args: Any) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                      json.dumps(args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.read()

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], 600)[0]:
            raise RuntimeError("worker gave no answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited ({self.proc.wait()})")
        return dict(json.loads(line))

    def cmd(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.read()

    def quit(self) -> None:
        try:
            self.cmd(op="quit")
        finally:
            self.proc.wait(timeout=60)


# -- raw baseline ------------------------------------------------------------------------------
def raw_throughput(directory: str, block: int, threads: int, total: int) -> tuple[float, float]:
    """(write GB/s, read GB/s) of ``threads`` threads doing O_DIRECT I/O on their own files."""
    per = max(1, total // threads // block)
    paths = [os.path.join(directory, f"raw-{i}") for i in range(threads)]
    for p in paths:
        fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, per * block)
        finally:
            os.close(fd)

    def run(mode: str) -> float:
        return direct_io([(p, [j * block for j in range(per)]) for p in paths], block, mode)

    try:
        return run("w"), run("r")
    finally:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)


# -- the measurements --------------------------------------------------------------------------
def delay(directory: str, block: int, sync_seconds: float | None, samples: int) -> list[float]:
    """Seconds from A's store finishing to B finding the block; ``None``: vLLM's fs tier."""
    path = os.path.join(directory, "delay")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    args: dict[str, Any] = {"dir": path, "block": block, "threads": 4, "capacity": 256 * MiB,
                            "sync_seconds": sync_seconds or 1.0, "vllm": sync_seconds is None}
    a = Engine(**args)
    b = Engine(**args)
    out = []
    try:
        rng = random.Random(samples)
        for i in range(samples):
            b.send(op="watch", salt="d", i=i)
            time.sleep(rng.uniform(0.01, 1.0))  # land anywhere in B's sync period
            ta = a.cmd(op="store_one", salt="d", i=i)["t"]
            tb = b.read()["t"]
            out.append(max(0.0, tb - ta))
    finally:
        a.quit()
        b.quit()
        shutil.rmtree(path, ignore_errors=True)
    return out


def lookups(directory: str, block: int, n: int) -> dict[str, dict[str, float]]:
    """Lookup of ``n`` blocks another engine stored: kvtier's index vs vLLM's existence probe."""
    res: dict[str, dict[str, float]] = {}
    for name, vllm in (("kvtier", False), ("vLLM fs", True)):
        path = os.path.join(directory, "lookup")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        args: dict[str, Any] = {"dir": path, "block": block, "threads": 4,
                                "capacity": 2 * n * (block + 8192) + 64 * MiB, "sync_seconds": 0.2,
                                "vllm": vllm}
        a = Engine(**args)
        b = Engine(**args)
        try:
            if vllm:
                a.cmd(op="write", salt="l", n=n)
            else:
                b.cmd(op="balance", engines=2)
                a.cmd(op="balance", engines=2)
                a.cmd(op="write", salt="l", n=n)
                b.cmd(op="sync")
            r = b.cmd(op="lookup", salt="l", n=n)
            if r["found"] != n:
                raise RuntimeError(f"{name}: found {r['found']} of {n}")
            res[name] = r
        finally:
            a.quit()
            b.quit()
            shutil.rmtree(path, ignore_errors=True)
    return res


def engines_throughput(directory: str, block: int, n_engines: int, total: int, threads: int
                       ) -> tuple[float, float]:
    """(write GB/s, read GB/s) of ``n_engines`` processes sharing one directory."""
    path = os.path.join(directory, "engines")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    per = max(1, total // n_engines // block)
    cap = 2 * per * n_engines * (block + 8192) + 64 * MiB
    es = [Engine(dir=path, block=block, threads=max(2, threads // n_engines), capacity=cap,
                 sync_seconds=0.2) for _ in range(n_engines)]
    try:
        for e in es:
            e.send(op="balance", engines=n_engines)
        for e in es:
            e.read()
        for i, e in enumerate(es):
            e.send(op="write", salt=f"e{i}", n=per)
        w = [e.read() for e in es]
        for e in es:
            e.cmd(op="sync")
        for i, e in enumerate(es):
            e.send(op="read", salt=f"e{(i + 1) % n_engines}", n=per)
        r = [e.read() for e in es]
        if any(x["failed"] for x in w + r):
            raise RuntimeError(f"failed blocks: write {[x['failed'] for x in w]}, "
                               f"read {[x['failed'] for x in r]}")
        nbytes = per * n_engines * block
        wt = max(x["t1"] for x in w) - min(x["t0"] for x in w)
        rt = max(x["t1"] for x in r) - min(x["t0"] for x in r)
        return nbytes / wt / 1e9, nbytes / rt / 1e9
    finally:
        for e in es:
            e.quit()
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    """Run every measurement and print tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/work/bench-shared")
    ap.add_argument("--sizes", default=f"{256 << 10},{2 << 20}", help="block sizes for throughput")
    ap.add_argument("--total-mib", type=int, default=1024, help="data per throughput measurement")
    ap.add_argument("--threads", type=int, default=16, help="I/O threads in all")
    ap.add_argument("--engines", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--delay-samples", type=int, default=20)
    ap.add_argument("--lookup-blocks", type=int, default=1000)
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.dir, exist_ok=True)
    st = os.statvfs(args.dir)
    df = subprocess.run(["df", "--output=source,fstype", args.dir], capture_output=True, text=True)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"{platform.platform()}")
    print(f"disk: {args.dir} on {' '.join(df.stdout.split()[2:4])}, "
          f"free {st.f_bavail * st.f_frsize / 2**30:.1f} GiB")
    out: dict[str, Any] = {}

    _progress("delay until another engine's block is found")
    delays: dict[str, list[float]] = {}
    for name, sync in (("kvtier sync_seconds=1.0", 1.0), ("kvtier sync_seconds=0.1", 0.1),
                       ("vLLM fs", None)):
        try:
            delays[name] = delay(args.dir, 256 << 10, sync, args.delay_samples)
        except Exception as e:  # vLLM missing, say
            print(f"note: {name}: {type(e).__name__}: {e}")
    print("\n| delay until another engine finds a block | median ms | p90 ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, v in delays.items():
        v = sorted(v)
        print(f"| {name} | {1e3 * statistics.median(v):.0f} | {1e3 * v[int(0.9 * (len(v) - 1))]:.0f} "
              f"| {1e3 * v[-1]:.0f} |")
    out["delay_s"] = delays

    _progress(f"lookup of {args.lookup_blocks} blocks another engine stored")
    lk = lookups(args.dir, 256 << 10, args.lookup_blocks)
    print(f"\n| lookup of {args.lookup_blocks} blocks another engine stored | best ms | median ms |")
    print("|---|---:|---:|")
    for name, r in lk.items():
        print(f"| {name} | {1e3 * r['best_s']:.3f} | {1e3 * r['median_s']:.3f} |")
    out["lookup"] = lk

    rows = []
    for block in [int(x) for x in args.sizes.split(",") if x]:
        for n in [int(x) for x in args.engines.split(",") if x]:
            runs = []
            for rep in range(args.repeat):
                _progress(f"{block >> 10} KiB, {n} engine(s), run {rep + 1}/{args.repeat}: raw, then kvtier")
                rw, rr = raw_throughput(args.dir, block, args.threads, args.total_mib * MiB)
                w, r = engines_throughput(args.dir, block, n, args.total_mib * MiB, args.threads)
                runs.append((rw, rr, w, r, w / rw, r / rr))
            med = [statistics.median(x[i] for x in runs) for i in range(6)]
            rows.append({"block": block, "engines": n, "raw_write": med[0], "raw_read": med[1],
                         "write": med[2], "read": med[3], "write_ratio": med[4],
                         "read_ratio": med[5], "runs": runs})
    print("\n| block | engines | raw write GB/s | kvtier write GB/s | x raw | raw read GB/s | "
          "kvtier read GB/s | x raw |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['block'] >> 10} KiB | {row['engines']} | {row['raw_write']:.2f} | "
              f"{row['write']:.2f} | {row['write_ratio']:.2f} | {row['raw_read']:.2f} | "
              f"{row['read']:.2f} | {row['read_ratio']:.2f} |")
    print("(medians over the runs; 'x raw' is the median of each run's ratio to the raw run just "
          "before it; reads are of blocks another engine wrote)")
    out["throughput"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
