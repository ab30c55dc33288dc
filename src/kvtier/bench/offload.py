"""The offloading side of the simulated engine: an offloading manager plus its worker, called
as an engine calls them (:class:`Offload` is the base, no offloading; :class:`KVTierOffload` is
kvtier's spec, manager and worker). :class:`kvtier.bench.engine.EngineSim` drives one of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvtier.types import LoadStoreSpec, PrepareStoreOutput, ReqContext

if TYPE_CHECKING:
    from kvtier.bench.engine import EngineOptions


# -- the offloading side as the engine sees it ---------------------------------------------------
class Offload:
    """An offloading manager plus its worker, as called by the engine (base: no offloading)."""

    name = "none"
    media: tuple[str, ...] = ()
    stores = False  # whether the engine offers its blocks to this side at all

    def attach(self, kv_caches: list[Any], opts: EngineOptions) -> None:
        """Build the manager and the worker on the engine's KV tensors."""

    def new_request(self, ctx: ReqContext) -> None:
        """A request was first seen."""

    def lookup(self, keys: Sequence[bytes], ctx: ReqContext) -> int | None:
        """Leading run of ``keys`` loadable now, or None (ask again next step)."""
        return 0

    def prepare_load(self, keys: Sequence[bytes], ctx: ReqContext) -> LoadStoreSpec:
        """Pin ``keys`` and say where they are."""
        raise NotImplementedError

    def complete_load(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        """Unpin ``keys``."""

    def touch(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        """Recency hint."""

    def prepare_store(self, keys: Sequence[bytes], ctx: ReqContext) -> PrepareStoreOutput | None:
        """Reserve slots for the keys not stored yet."""
        return None

    def complete_store(self, keys: Sequence[bytes], ctx: ReqContext, success: bool = True) -> None:
        """The keys' bytes are in their slots (or, ``success=False``, will never be)."""

    def request_finished(self, ctx: ReqContext) -> None:
        """A request finished."""

    def end_step(self) -> None:
        """Once per engine step."""

    def take_events(self) -> list[tuple[str, list[bytes], bool]]:
        """(medium, keys, removed) since the last call."""
        return []

    def transfer(self, job_id: int, src: LoadStoreSpec, dst: LoadStoreSpec) -> bool:
        """Start a copy between engine blocks and slots."""
        return False

    def finished(self) -> list[tuple[int, bool]]:
        """Copies finished since the last call: (job id, success)."""
        return []

    def wait(self, job_ids: Sequence[int]) -> None:
        """Block until these copies are done (the engine has nothing else to do)."""

    def pending(self) -> bool:
        """Tier work still in flight."""
        return False

    def stats(self) -> dict[str, Any]:
        """The manager's counters."""
        return {}

    def shutdown(self) -> None:
        """Release everything."""


class KVTierOffload(Offload):
    """kvtier's TieringOffloadingSpec: manager plus worker, in-process."""

    def __init__(self, extra_config: dict[str, Any], namespace: str = "bench") -> None:
        self.extra_config = extra_config
        self.namespace = namespace
        self.name = "kvtier"
        self.stores = True
        self.manager: Any = None
        self.worker: Any = None

    def attach(self, kv_caches: list[Any], opts: EngineOptions) -> None:
        from kvtier.spec import TieringOffloadingSpec

        cfg = dict(self.extra_config)
        cfg.setdefault("block_size", opts.block_tokens)
        spec = TieringOffloadingSpec(
            cfg,
            gpu_block_size=opts.gpu_block_tokens,
            bytes_per_gpu_block=opts.bytes_per_gpu_block,
            namespace=self.namespace,
        )
        self.spec = spec
        self.manager = spec.get_manager()
        try:
            self.worker = spec.get_worker(kv_caches)
        except BaseException:
            self.manager.shutdown()
            raise
        self.media = tuple(
            st.get("medium", name) for name, st in self.manager.get_stats()["tiers"].items()
        )
        self.num_slots = spec.num_slots

    def new_request(self, ctx: ReqContext) -> None:
        fn = getattr(self.manager, "on_new_request", None)
        if fn is not None:
            fn(ctx)

    def lookup(self, keys: Sequence[bytes], ctx: ReqContext) -> int | None:
        return self.manager.lookup(keys, ctx)  # type: ignore[no-any-return]

    def prepare_load(self, keys: Sequence[bytes], ctx: ReqContext) -> LoadStoreSpec:
        return self.manager.prepare_load(keys, ctx)  # type: ignore[no-any-return]

    def complete_load(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        self.manager.complete_load(keys, ctx)

    def touch(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        self.manager.touch(keys, ctx)

    def prepare_store(self, keys: Sequence[bytes], ctx: ReqContext) -> PrepareStoreOutput | None:
        return self.manager.prepare_store(keys, ctx)  # type: ignore[no-any-return]

    def complete_store(self, keys: Sequence[bytes], ctx: ReqContext, success: bool = True) -> None:
        self.manager.complete_store(keys, ctx, success)

    def request_finished(self, ctx: ReqContext) -> None:
        fn = getattr(self.manager, "on_request_finished", None)
        if fn is not None:
            fn(ctx)

    def end_step(self) -> None:
        self.manager.on_schedule_end()

    def take_events(self) -> list[tuple[str, list[bytes], bool]]:
        return [(e.medium, e.keys, e.removed) for e in self.manager.take_events()]

    def transfer(self, job_id: int, src: LoadStoreSpec, dst: LoadStoreSpec) -> bool:
        return bool(self.worker.transfer_async(job_id, src, dst))

    def finished(self) -> list[tuple[int, bool]]:
        return [(r.job_id, r.success) for r in self.worker.get_finished()]

    def wait(self, job_ids: Sequence[int]) -> None:
        self.worker.wait(job_ids)

    def pending(self) -> bool:
        return bool(self.manager.has_pending_work())

    def stats(self) -> dict[str, Any]:
        return self.manager.get_stats()  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.manager is not None:
            self.manager.shutdown()
