"""Raw O_DIRECT I/O through io_uring from one Python thread, against the raw baseline's threads.

Needs the optional ``liburing`` package (``pip install liburing``). On one preallocated file it
measures, for ``--block`` blocks and ``--total-mib`` per measurement, rounds of: the baseline of
``raw_direct.direct_io`` (``--threads`` threads, one ``pwritev``/``preadv`` of one block per
call, interleaved block by block), then one thread keeping ``--depths`` I/Os in flight through
io_uring, waiting for completions either with ``liburing``'s own wait call or by reading an
eventfd registered with the ring. Each line gives GB/s and CPU seconds per GiB (whole process).

With ``--gil`` it first checks whether waiting for a completion lets another Python thread run:
a thread counting in a loop while the main thread waits 1 s for a timeout through each wait
call, as a share of its rate beside ``time.sleep``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from raw_direct import direct_io  # noqa: E402

try:
    import liburing as lu
except ImportError:
    sys.exit("raw_uring.py needs the liburing package: pip install liburing")


def _cpu() -> float:
    return time.process_time()


def uring_io(path: str, block: int, n: int, mode: str, depth: int, eventfd: bool) -> tuple[float, float]:
    """(GB/s, CPU s/GiB) of ``n`` blocks written or read by this thread, ``depth`` in flight."""
    ring: Any = lu.Ring()
    lu.io_uring_queue_init(depth, ring, 0)
    efd = -1
    if eventfd:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        lu.io_uring_register_eventfd(ring, efd)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, block * depth)
    buf.write(os.urandom(block) * depth)
    mv = memoryview(buf)
    slots = [mv[i * block : (i + 1) * block] for i in range(depth)]
    free = list(range(depth))
    iovs: dict[int, Any] = {}
    cqe: Any = lu.Cqe()
    prep = lu.io_uring_prep_writev if mode == "w" else lu.io_uring_prep_readv
    t0, c0 = time.perf_counter(), _cpu()
    nxt = done = 0
    while done < n:
        while free and nxt < n:
            s = free.pop()
            iovs[s] = lu.Iovec([slots[s]])  # must outlive the I/O
            sqe = lu.io_uring_get_sqe(ring)
            prep(sqe, fd, iovs[s], nxt * block)
            sqe.user_data = s
            nxt += 1
        if eventfd:
            lu.io_uring_submit(ring)
            while not lu.io_uring_cq_ready(ring):
                os.eventfd_read(efd)
        else:
            lu.io_uring_submit_and_wait(ring, 1)
        got = 0
        for _ in lu.CqeIter(ring, cqe):
            e = cqe[0]
            if e.res != block:  # the package raises OSError for a negative result
                raise OSError(f"short I/O: {e.res}")
            free.append(e.user_data)
            got += 1
        lu.io_uring_cq_advance(ring, got)
        done += got
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    os.close(fd)
    lu.io_uring_queue_exit(ring)
    if eventfd:
        os.close(efd)
    return n * block / dt / 1e9, dc / (n * block / 2**30)


def gil_check() -> None:
    """Print how far a counting thread gets while this one waits in each wait call."""
    state = {"count": 0, "stop": False}

    def spin() -> None:
        while not state["stop"]:
            state["count"] += 1

    def rate(block_fn: Any) -> float:
        state["count"], state["stop"] = 0, False
        t = threading.Thread(target=spin)
        t.start()
        time.sleep(0.05)
        t0, c0 = time.perf_counter(), state["count"]
        try:
            block_fn()
        finally:
            dt, c1 = time.perf_counter() - t0, state["count"]
            state["stop"] = True
            t.join()
        return (c1 - c0) / dt

    ring: Any = lu.Ring()
    lu.io_uring_queue_init(8, ring, 0)
    efd = os.eventfd(0, os.EFD_CLOEXEC)

    def wait_1s(how: str) -> None:
        ts = lu.timespec(1)  # must outlive the submission
        sqe = lu.io_uring_get_sqe(ring)
        lu.io_uring_prep_timeout(sqe, ts, 0, 0)
        cqe: Any = lu.Cqe()
        if how == "io_uring_wait_cqe":
            lu.io_uring_submit(ring)
            lu.io_uring_wait_cqe(ring, cqe)
        elif how == "io_uring_submit_and_wait":
            lu.io_uring_submit_and_wait(ring, 1)
        else:
            lu.io_uring_register_eventfd(ring, efd)
            lu.io_uring_submit(ring)
            while not lu.io_uring_cq_ready(ring):
                os.eventfd_read(efd)
            lu.io_uring_unregister_eventfd(ring)
        lu.io_uring_cq_advance(ring, 1)

    solo = rate(lambda: time.sleep(1.0))
    for how in ("io_uring_wait_cqe", "io_uring_submit_and_wait", "eventfd read"):
        print(f"GIL: a counting thread ran at {rate(lambda h=how: wait_1s(h)) / solo:.2f} of its "
              f"rate while the main thread waited 1 s in {how}", flush=True)
    lu.io_uring_queue_exit(ring)
    os.close(efd)


def main() -> None:
    """Run the rounds and print one line per measurement."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-uring")
    ap.add_argument("--block", type=int, default=256 << 10)
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--depths", default="16,32,64")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after a sync before a phase")
    ap.add_argument("--gil", action="store_true")
    args = ap.parse_args()
    if args.gil:
        gil_check()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "raw-uring.dat")
    n = args.total_mib * (1 << 20) // args.block
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.posix_fallocate(fd, 0, n * args.block)
    os.close(fd)
    offsets = [i * args.block for i in range(n)]
    targets = [(path, offsets[i :: args.threads]) for i in range(args.threads)]
    print(f"load average {os.getloadavg()[0]:.1f}; {n} blocks of {args.block} bytes per measurement")
    for r in range(args.repeat):
        for mode in "wr":
            runs: list[tuple[str, Any]] = [(f"threads x{args.threads}", None)]
            for d in (int(x) for x in args.depths.split(",")):
                runs += [(f"uring qd{d} wait", (d, False)), (f"uring qd{d} eventfd", (d, True))]
            for name, how in runs:
                os.sync()
                time.sleep(args.settle)
                if how is None:
                    c0 = _cpu()
                    gbs = direct_io(targets, args.block, mode)
                    cpu = (_cpu() - c0) / (n * args.block / 2**30)
                else:
                    gbs, cpu = uring_io(path, args.block, n, mode, how[0], how[1])
                print(f"round {r + 1} {'write' if mode == 'w' else 'read '} {name:20s} "
                      f"{gbs:6.2f} GB/s  {cpu:.3f} CPU s/GiB", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
