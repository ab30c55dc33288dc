"""Tensor-parallel worker processes for the real-scheduler tests, started as vLLM's
multiprocessing executor starts them (``spawn``).

Each worker builds the real ``OffloadingConnector`` worker half from the engine's pickled
config, registers its own KV tensors (its share of the KV heads) through
``register_kv_caches`` (which attaches kvtier's primary region and copies this rank's share of
each slot), and runs the stand-in model runner on every ``SchedulerOutput`` it receives. The
executor side sends each step to every worker and merges their outputs with vLLM's own
``KVOutputAggregator``, as ``MultiprocExecutor`` does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
from multiprocessing.connection import Connection
from typing import Any


def worker_main(rank: int, config_bytes: bytes, conn: Connection) -> None:
    """One worker process: serve steps until told to stop, then report leftover threads."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from stand_in_runner import StandInRunner
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
        OffloadingConnector,
    )

    vllm_config, kv_cache_config = pickle.loads(config_bytes)
    vllm_config.parallel_config.rank = rank
    connector = OffloadingConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    runner = StandInRunner(vllm_config, kv_cache_config, connector, salt=rank)
    conn.send("ready")
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            out, prompts = msg
            result = runner.execute(out, prompts)
            conn.send((result, runner.wrong_tokens, runner.checked_tokens, runner.wrong[:5]))
    finally:
        connector.shutdown()
        left = [t.name for t in threading.enumerate() if t.name.startswith("kvtier")]
        conn.send(("bye", left))


class SpawnedWorkers:
    """The executor side: one spawned process per rank; steps broadcast, outputs merged."""

    def __init__(self, vllm_config: Any, kv_cache_config: Any, world_size: int,
                 connector: Any, timeout_s: float = 120.0) -> None:
        from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator

        ctx = mp.get_context("spawn")
        blob = pickle.dumps((vllm_config, kv_cache_config))
        self.timeout_s = timeout_s
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(rank, blob, child), daemon=True,
                            name=f"tp-worker-{rank}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        for c in self.conns:
            if not c.poll(timeout_s):
                raise TimeoutError("a worker did not start")
            assert c.recv() == "ready"
        self.aggregator = KVOutputAggregator.from_connector(connector, world_size)
        self.wrong = [0] * world_size
        self.checked = [0] * world_size
        self.wrong_examples: list[str] = []
        self.leftover_threads: list[list[str]] = []

    @property
    def wrong_tokens(self) -> int:
        """Tokens with wrong bytes, over all ranks."""
        return sum(self.wrong)

    def send(self, out: Any, prompts: dict[str, list[int]]) -> None:
        """Hand a step to every worker."""
        for c in self.conns:
            c.send((out, prompts))

    def collect(self) -> Any:
        """Every worker's output of the step, merged (raises if a worker is gone)."""
        outputs = []
        for rank, c in enumerate(self.conns):
            if not c.poll(self.timeout_s):
                raise TimeoutError(f"worker {rank} did not answer")
            result, wrong, checked, examples = c.recv()
            self.wrong[rank], self.checked[rank] = wrong, checked
            self.wrong_examples.extend(examples)
            outputs.append(result)
        return self.aggregator.aggregate(outputs, 0)

    def execute(self, out: Any, prompts: dict[str, list[int]]) -> Any:
        """The runner interface ``RealEngine`` drives."""
        self.send(out, prompts)
        return self.collect()

    def stop(self, rank: int) -> None:
        """Ask one worker to shut down; record the kvtier threads it still had."""
        c = self.conns[rank]
        try:
            c.send(None)
            while c.poll(self.timeout_s):
                msg = c.recv()
                if isinstance(msg, tuple) and msg and msg[0] == "bye":
                    self.leftover_threads.append(msg[1])
                    break
        except (EOFError, BrokenPipeError, OSError):
            pass
        self.procs[rank].join(self.timeout_s)

    def close(self) -> None:
        """Stop every live worker; kill what does not exit."""
        for rank, p in enumerate(self.procs):
            if p.is_alive():
                self.stop(rank)
            if p.is_alive():
                p.kill()
                p.join(10)
        for c in self.conns:
            c.close()
