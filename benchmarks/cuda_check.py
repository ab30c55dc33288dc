"""CUDA check of kvtier's worker: bytes intact through GPU -> primary -> GPU, and its speed.

Run from the repository root on a machine with a CUDA GPU and torch (nothing else to install;
``src/`` is put on the path)::

    python benchmarks/cuda_check.py            # writes $OUT/cuda_check.json when OUT is set

It builds a ``kvtier.TieringOffloadingSpec`` over CUDA KV tensors (a list of per-layer tensors,
a few GiB in all), gets the worker from ``spec.get_worker``, and for ``blocks_per_slot`` f = 1
and f > 1:

* stores randomly chosen engine blocks into randomly chosen primary slots, loads them back into
  other randomly chosen engine blocks, and compares on the GPU (``torch.equal``) that every
  loaded block equals its source and that no other block changed;
* does the same for one tensor-parallel rank's share of each slot (strided host memory, as
  ``kvtier.vllm`` hands each rank of a TP>1 engine);
* when vLLM is importable, loads through ``kvtier.vllm``'s worker a job that starts inside an
  offloaded block (a GPU prefix hit covering part of it) and checks those bytes too;
* times the store (GPU -> CPU) and the load (CPU -> GPU) of the same jobs, and a plain torch
  copy of the same number of bytes as one contiguous buffer (pinned host <-> device
  ``copy_``) on the same machine, and prints GB/s and the ratio.

Without CUDA it runs the same steps on CPU tensors with small sizes (a check of the script and
of the CPU copy path; its GB/s are not GPU numbers) and says so. Finishes in well under 3 min.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _ensure_xxhash() -> str | None:
    """kvtier imports xxhash for its record checksums; this check never hashes a block."""
    try:
        import xxhash  # noqa: F401

        return None
    except ImportError:
        import hashlib

        shim = types.ModuleType("xxhash")

        def _d(data: bytes, n: int) -> bytes:
            return hashlib.blake2b(data, digest_size=n).digest()

        shim.xxh3_128_digest = lambda d: _d(bytes(d), 16)  # type: ignore[attr-defined]
        shim.xxh3_64_intdigest = lambda d: int.from_bytes(_d(bytes(d), 8), "little")  # type: ignore[attr-defined]
        sys.modules["xxhash"] = shim
        return "xxhash not installed: a hashlib stand-in is used (no block is hashed here)"


NOTE = _ensure_xxhash()

import kvtier  # noqa: E402
from kvtier.config import shm_free_bytes  # noqa: E402

GB = 1e9


def sync(dev: torch.device) -> None:
    """Wait for the device."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def plain_copy_gbps(nbytes: int, dev: torch.device, repeat: int) -> tuple[float, float]:
    """(device->host, host->device) GB/s of one contiguous pinned buffer <-> device copy_."""
    pin = dev.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    devbuf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
    d2h, h2d = [], []
    for _ in range(repeat):
        sync(dev)
        t0 = time.perf_counter()
        host.copy_(devbuf, non_blocking=pin)
        sync(dev)
        d2h.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        devbuf.copy_(host, non_blocking=pin)
        sync(dev)
        h2d.append(time.perf_counter() - t0)
    del host, devbuf
    return nbytes / statistics.median(d2h) / GB, nbytes / statistics.median(h2d) / GB


class RankShare:
    """One tensor-parallel rank's share of every slot (as kvtier.vllm gives each rank)."""

    def __init__(self, region: Any, rank: int, world: int) -> None:
        self._region = region
        self.block_bytes = region.block_bytes // world
        self.array = region.array[:, rank * self.block_bytes : (rank + 1) * self.block_bytes]

    def close(self) -> None:
        """Detach."""
        self._region.close()


def run_case(f: int, dev: torch.device, layers: int, page: int, num_blocks: int,
             primary_bytes: int, repeat: int, rng: np.random.Generator,
             world: int = 1) -> dict[str, Any]:
    """Round trips and timings for one blocks_per_slot value (rank world-1 of ``world``)."""
    tokens = 16
    bytes_per_block = layers * page
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": primary_bytes, "block_size": tokens * f},
        gpu_block_size=tokens, bytes_per_gpu_block=bytes_per_block * world,
        namespace="cuda-check", instance_id=f"cudacheck-{uuid.uuid4().hex[:10]}",
    )
    manager = spec.get_manager()
    kv = [torch.randint(0, 256, (num_blocks, page), dtype=torch.uint8, device=dev)
          for _ in range(layers)]
    t0 = time.perf_counter()
    if world == 1:
        worker = spec.get_worker(kv)
    else:
        from kvtier.memory.region import BlockRegion

        region = BlockRegion(spec.region_name, spec.num_slots, spec.block_bytes, owner=False)
        worker = kvtier.OffloadingWorker(kv, RankShare(region, world - 1, world), f,
                                         bytes_per_block)
    attach_s = time.perf_counter() - t0
    try:
        slots_total = spec.num_slots
        n_slots = min(slots_total, num_blocks // (2 * f))  # sources and destinations disjoint
        job_bytes = n_slots * spec.block_bytes // world
        perm = rng.permutation(num_blocks)
        src_blocks = perm[: n_slots * f]
        dst_pool = perm[n_slots * f : 2 * n_slots * f]
        store_t, load_t = [], []
        intact = True
        untouched_ok = True
        for rep in range(repeat):
            slots = rng.permutation(slots_total)[:n_slots]
            dst_blocks = rng.permutation(dst_pool)
            sync(dev)
            t0 = time.perf_counter()
            assert worker.transfer_async(2 * rep + 1, kvtier.GPULoadStoreSpec(src_blocks),
                                         kvtier.LoadStoreSpec(slots))
            worker.wait([2 * rep + 1])
            store_t.append(time.perf_counter() - t0)
            before = [t.clone() for t in kv] if rep == 0 else None
            sync(dev)
            t0 = time.perf_counter()
            assert worker.transfer_async(2 * rep + 2, kvtier.LoadStoreSpec(slots),
                                         kvtier.GPULoadStoreSpec(dst_blocks))
            worker.wait([2 * rep + 2])
            load_t.append(time.perf_counter() - t0)
            done = {r.job_id: r.success for r in worker.get_finished()}
            assert done.get(2 * rep + 1) and done.get(2 * rep + 2), done
            si = torch.as_tensor(src_blocks, device=dev)
            di = torch.as_tensor(dst_blocks, device=dev)
            for t in kv:
                if not torch.equal(t.index_select(0, si), t.index_select(0, di)):
                    intact = False
            if before is not None:
                mask = torch.ones(num_blocks, dtype=torch.bool, device=dev)
                mask[di] = False
                for t, b in zip(kv, before):
                    if not torch.equal(t[mask], b[mask]):
                        untouched_ok = False
                del before
            # fresh source bytes for the next round, so a stale slot cannot pass
            for t in kv:
                t.index_copy_(0, si, torch.randint(0, 256, (len(si), page), dtype=torch.uint8,
                                                   device=dev))
        return {
            "blocks_per_slot": f,
            "tp_share": f"rank {world - 1} of {world}" if world > 1 else "whole slot",
            "slots_per_job": n_slots,
            "job_bytes": job_bytes,
            "bytes_intact": intact,
            "other_blocks_untouched": untouched_ok,
            "store_gbps": job_bytes / statistics.median(store_t) / GB,
            "load_gbps": job_bytes / statistics.median(load_t) / GB,
            "pin_s": attach_s,
        }
    finally:
        worker.shutdown()
        manager.shutdown()
        del kv


def partial_case(dev: torch.device, layers: int, page: int, num_blocks: int,
                 primary_bytes: int, rng: np.random.Generator) -> dict[str, Any]:
    """vLLM adapter: a load starting inside an offloaded block (needs vllm importable)."""
    try:
        from vllm.v1.kv_offload.base import GPULoadStoreSpec as VGPUSpec

        from kvtier.vllm import KVTierLoadStoreSpec, KVTierWorker
    except Exception as e:  # vllm not installed here: the case is optional
        return {"skipped": f"vllm not importable ({type(e).__name__}: {e})"}
    f = 4
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": primary_bytes, "block_size": 16 * f},
        gpu_block_size=16, bytes_per_gpu_block=layers * page,
        namespace="cuda-check", instance_id=f"cudacheck-{uuid.uuid4().hex[:10]}",
    )
    manager = spec.get_manager()
    kv = [torch.randint(0, 256, (num_blocks, page), dtype=torch.uint8, device=dev)
          for _ in range(layers)]
    worker = spec.get_worker(kv)
    adapter = KVTierWorker(worker, f)
    try:
        perm = rng.permutation(num_blocks)
        slots = [int(x) for x in rng.permutation(spec.num_slots)[:3]]
        src = perm[: 3 * f]
        assert worker.transfer_async(1, kvtier.GPULoadStoreSpec(src), kvtier.LoadStoreSpec(slots))
        worker.wait([1])
        dst = [int(x) for x in perm[3 * f : 3 * f + 9]]  # skip 1 sub-block: 3 + 4 + 2 blocks
        gpu = VGPUSpec(dst, group_sizes=[len(dst)], block_indices=[f * 7 + 1])
        assert adapter.submit_load(2, KVTierLoadStoreSpec(slots), gpu)
        adapter.wait({2})
        want = torch.as_tensor(src[1:10], device=dev)
        got = torch.as_tensor(dst, device=dev)
        intact = all(torch.equal(t.index_select(0, got), t.index_select(0, want)) for t in kv)
        return {"partial_load_intact": intact}
    finally:
        adapter.shutdown()
        manager.shutdown()


def main() -> int:
    """Run the check; exit status 1 when bytes were not intact."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-gib", type=float, default=4.0, help="engine KV tensors in all (CUDA)")
    ap.add_argument("--primary-gib", type=float, default=2.0, help="primary region (CUDA)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda:0" if cuda else "cpu")
    if cuda:
        layers, page = 32, 64 << 10  # 32 layers x 64 KiB: one 16-token block of an 8B bf16 model
        kv_bytes, primary = int(args.kv_gib * (1 << 30)), int(args.primary_gib * (1 << 30))
        name = torch.cuda.get_device_name(dev)
    else:
        print("no CUDA device: running the CPU mode (checks the script and the CPU copy path; "
              "its GB/s are not GPU numbers)")
        layers, page = 4, 16 << 10
        kv_bytes, primary = 64 << 20, 16 << 20
        name = "cpu"
    shm = shm_free_bytes()
    if shm and primary > 0.8 * shm:
        primary = int(0.8 * shm)
        print(f"/dev/shm has {shm / 2**30:.2f} GiB free: primary region cut to "
              f"{primary / 2**30:.2f} GiB")
    num_blocks = kv_bytes // (layers * page)
    rng = np.random.default_rng(1234)
    cases = []
    for f, world in ((1, 1), (4, 1), (1, 2)):
        print(f"blocks_per_slot={f}, world={world}: storing and loading ...", flush=True)
        cases.append(run_case(f, dev, layers, page, num_blocks, primary, args.repeat, rng,
                              world))
    print("vLLM adapter: a load starting inside an offloaded block ...", flush=True)
    partial = partial_case(dev, layers, page, num_blocks, primary, rng)
    job_bytes = max(c["job_bytes"] for c in cases)
    d2h, h2d = plain_copy_gbps(job_bytes, dev, max(3, args.repeat))
    print()
    print(f"device: {name}; KV {layers} layers x {num_blocks} blocks x {page} B "
          f"({kv_bytes / 2**30:.2f} GiB); primary {primary / 2**30:.2f} GiB; "
          f"torch {torch.__version__}")
    if NOTE:
        print(NOTE)
    hdr = (f"{'f':>3} {'share':>12} {'job MiB':>9} {'intact':>7} {'others':>7} {'GPU->CPU GB/s':>14} "
           f"{'vs torch':>9} {'CPU->GPU GB/s':>14} {'vs torch':>9}")
    print(hdr)
    for c in cases:
        print(f"{c['blocks_per_slot']:>3} {c['tp_share']:>12} {c['job_bytes'] / 2**20:>9.0f} "
              f"{str(c['bytes_intact']):>7} {str(c['other_blocks_untouched']):>7} "
              f"{c['store_gbps']:>14.2f} {c['store_gbps'] / d2h:>9.2f} "
              f"{c['load_gbps']:>14.2f} {c['load_gbps'] / h2d:>9.2f}")
    print(f"plain torch copy of {job_bytes / 2**20:.0f} MiB: device->host {d2h:.2f} GB/s, "
          f"host->device {h2d:.2f} GB/s")
    print(f"vLLM adapter, load starting inside an offloaded block: {partial}")
    elapsed = time.perf_counter() - t_start
    print(f"finished in {elapsed:.1f} s")
    ok = all(c["bytes_intact"] and c["other_blocks_untouched"] for c in cases)
    ok = ok and partial.get("partial_load_intact", True)
    result = {
        "device": name, "cuda": cuda, "torch": torch.__version__,
        "python": platform.python_version(), "layers": layers, "page_bytes": page,
        "num_blocks": num_blocks, "primary_bytes": primary, "cases": cases,
        "vllm_partial_load": partial,
        "torch_copy_d2h_gbps": d2h, "torch_copy_h2d_gbps": h2d, "ok": ok,
        "elapsed_s": elapsed, "note": NOTE,
    }
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cuda_check.json"), "w") as fh:
            json.dump(result, fh, indent=2)
    print("OK: bytes intact" if ok else "FAILED: bytes differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
