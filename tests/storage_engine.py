"""An engine process for the shared-storage tests: a kvtier manager with one storage tier,
driven through the public API by JSON commands on stdin, one JSON answer per line on stdout.

    python tests/storage_engine.py '<extra_config JSON>' <namespace> <bytes_per_block>

Commands (``ids`` are block numbers; block ``i`` of salt ``s`` is ``make_key(i, s)``):
  {"op": "store", "salt": s, "ids": [...]}       store and wait until written to storage
  {"op": "stream", "salt": s, "start": i}         store 8 new blocks at a time forever, printing
                                                  {"stored": n} after each batch (for kill -9)
  {"op": "load", "salt": s, "ids": [...]}         drop the CPU tier, then look up, load and check
                                                  each block: {"good": [...], "wrong": [...], "miss": n}
  {"op": "present", "salt": s, "ids": [...]}      which ids the storage tier offers now
  {"op": "churn", "salt": s, "ids": [...], "peers": {salt: [ids]}, "target_bytes": n}
                                                  store own ids 8 at a time (until its tier wrote
                                                  target_bytes, if given) and after each batch
                                                  run a sync pass and load 8 peer blocks it offers
  {"op": "sync"}                                  one sync pass now
  {"op": "stats"}                                 the storage tier's stats
  {"op": "quit"}                                  shut down and exit
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from helpers import block_bytes_for, lookup_until, make_key, settle, store_blocks  # noqa: E402

import kvtier  # noqa: E402


def main() -> None:
    """Serve commands until ``quit``."""
    cfg = json.loads(sys.argv[1])
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=int(sys.argv[3]),
                                        namespace=sys.argv[2])
    m = spec.get_manager()
    tier = m.tiers[0]
    region = m.primary_blocks()
    bb = region.shape[1]

    def reply(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def load(keys: list[tuple[object, bytes]]) -> dict[str, object]:
        good, wrong, miss = [], [], 0
        ctx = kvtier.ReqContext("load")
        for ident, key in keys:
            if lookup_until(m, [key], ctx) != 1:
                miss += 1
                continue
            spec_ = m.prepare_load([key], ctx)
            ok = np.array_equal(region[int(spec_.block_ids[0])], block_bytes_for(key, bb))
            m.complete_load([key], ctx)
            (good if ok else wrong).append(ident)
        return {"good": good, "wrong": wrong, "miss": miss}

    reply({"ready": True, "stats": tier.stats(), "region": spec.region_name})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "store":
            store_blocks(m, [make_key(i, cmd["salt"]) for i in cmd["ids"]])
            settle(m)
            reply({"ok": True})
        elif op == "stream":
            i = cmd["start"]
            while True:
                store_blocks(m, [make_key(j, cmd["salt"]) for j in range(i, i + 8)])
                settle(m)
                i += 8
                reply({"stored": i})
        elif op == "load":
            m.reset_cache()
            reply(load([(i, make_key(i, cmd["salt"])) for i in cmd["ids"]]))
        elif op == "present":
            reply({"ids": [i for i in cmd["ids"] if tier.lookup([make_key(i, cmd["salt"])]) == 1]})
        elif op == "churn":
            rng = random.Random(cmd.get("seed", 0))
            ids = cmd["ids"]
            peers = [(s, i) for s, got in cmd["peers"].items() for i in got]
            good: list[object] = []
            wrong: list[object] = []
            target = cmd.get("target_bytes", 0)
            for j in range(0, len(ids), 8):
                if target and tier.stats()["bytes_written"] >= target:
                    break
                deadline = time.monotonic() + 30
                while tier.stats()["regions_owned"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)  # capacity is being shared out: this engine has none yet
                store_blocks(m, [make_key(i, cmd["salt"]) for i in ids[j : j + 8]])
                m.on_schedule_end()
                # read the peers' logs now: at 5x capacity a peer's block lives for a batch or
                # two, about one period of the sync thread (whose own timing other tests check)
                tier.sync_now()
                pick = [p for p in rng.sample(peers, min(len(peers), 400))
                        if tier.lookup([make_key(p[1], p[0])]) == 1][:8]
                res = load([(p, make_key(p[1], p[0])) for p in pick])
                good += res["good"]  # type: ignore[operator]
                wrong += res["wrong"]  # type: ignore[operator]
            settle(m)
            reply({"good": len(good), "wrong": wrong})
        elif op == "sync":
            tier.sync_now()
            reply({"ok": True})
        elif op == "stats":
            reply(tier.stats())
        elif op == "quit":
            m.shutdown()
            reply({"bye": True})
            return
        else:
            reply({"error": f"unknown op {op}"})
        time.sleep(0)


if __name__ == "__main__":
    main()
