"""``KVTierOffloadingSpec``: kvtier as an ``OffloadingSpec`` for vLLM's ``OffloadingConnector``.

Geometry comes from vLLM's ``OffloadingConfig``: the GPU block size is the KV cache group's
``tokens_per_block``, an offloaded block is ``blocks_per_chunk`` GPU blocks (vLLM derives it from
``block_size`` or ``blocks_per_chunk``), and a primary slot holds that chunk for every worker of
the engine: ``[rank 0 pages][rank 1 pages]...``. The namespace names the model, the KV dtype, the
block geometry and the parallel layout, so persistent tiers only share blocks between compatible
engines. The scheduler and its workers find the same shared-memory primary region through an
``instance_id`` derived from vLLM's ``engine_id`` (unique per engine and data-parallel rank, and
the same in the scheduler and in every worker of that engine).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import kvtier
from kvtier.config import ConfigError
from kvtier.vllm._base import (
    CanonicalKVCaches,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingMetricMetadata,
    OffloadingSpec,
    check_vllm_version,
)
from kvtier.vllm.events import metric_definitions
from kvtier.vllm.manager import GroupGeometry, KVTierManager
from kvtier.vllm.worker import KVTierWorker, _RankRegion

log = logging.getLogger("kvtier.vllm")

# Keys of vLLM's own offloading specs that have no meaning for kvtier: accepted, logged, dropped.
VLLM_ONLY_KEYS = frozenset(
    {
        "tier_poll_interval_s",
        "backpressure",
        "store_threshold",
        "max_tracker_size",
        "sync_load_budget_bytes",
    }
)


def derive_instance_id(config: OffloadingConfig) -> str:
    """The primary region's id: the same in the scheduler and every worker of one engine."""
    p = config.parallel
    raw = f"{config.engine_id}|dp{p.data_parallel_index}"
    return "vllm-" + hashlib.sha256(raw.encode()).hexdigest()[:20]


def derive_namespace(config: OffloadingConfig, block_size: int) -> str:
    """Identity of the KV layout: model, dtype, block geometry, parallel layout, KV cache groups.

    A model with one KV cache group keeps the name it had before hybrid models were supported,
    so blocks stored by earlier versions stay valid. With several groups, the name also lists
    each group's geometry (see ``group_tag``): two engines share blocks only when every group
    matches, and within one namespace each group is its own key space (vLLM's keys end with
    the group index).
    """
    p = config.parallel
    g = config.groups[0]
    name = (
        f"{config.model.name}/{config.model.dtype}/tokens{g.tokens_per_block}x"
        f"{block_size // g.tokens_per_block}/kv{config.worker_kv_bytes_per_block}/"
        f"tp{p.tp_size}-pp{p.pp_size}-pcp{p.pcp_size}-dcp{p.dcp_size}-ws{p.world_size}/"
        f"layout-{config.kv_cache_layout or 'default'}"
    )
    if len(config.groups) > 1:
        name += "/groups-" + "+".join(group_tag(group) for group in config.groups)
    return name


def group_tag(group: OffloadingGroupConfig) -> str:
    """One KV cache group's geometry: index, tokens per block, attention span, layers.

    The span is ``full`` or ``win<N>`` (the chunks a sliding-window, chunked-local or Mamba
    layer keeps); the layers are counted and fingerprinted by name, which tells a Mamba group
    from an attention group of the same shape.
    """
    window = group.sliding_window_size_in_chunks
    span = "full" if window is None else f"win{window}"
    layers = hashlib.sha256("\x00".join(group.layer_names).encode()).hexdigest()[:8]
    return (
        f"g{group.group_id}-t{group.tokens_per_block}-{span}-"
        f"{len(group.layer_names)}L{layers}"
    )


def group_geometry(config: OffloadingConfig) -> tuple[GroupGeometry, ...]:
    """What the scheduler-side adapter needs to know about each offloaded group."""
    f = config.cache.blocks_per_chunk
    return tuple(
        GroupGeometry(
            group_id=g.group_id,
            tokens_per_chunk=g.tokens_per_block * f,
            window_chunks=g.sliding_window_size_in_chunks,
        )
        for g in config.groups
    )


class KVTierOffloadingSpec(OffloadingSpec):
    """kvtier as an ``OffloadingSpec`` for vLLM's ``OffloadingConnector``."""

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        """Prometheus metrics that ``get_stats`` reports."""
        return metric_definitions()

    def __init__(self, config: OffloadingConfig) -> None:
        self.vllm_version = check_vllm_version()
        super().__init__(config)
        if not config.groups:
            raise ConfigError("kv_cache_groups", "at least one KV cache group to offload", 0)
        if config.canonical_layout:
            raise ConfigError("canonical_layout", "false (kvtier stores each worker's pages)",
                              True)
        if config.worker_kv_bytes_per_block <= 0:
            raise ConfigError(
                "worker_kv_bytes_per_block",
                "a positive KV size per block (vLLM reported none for this model)",
                config.worker_kv_bytes_per_block,
            )
        self.groups = group_geometry(config)
        self.gpu_block_size = config.groups[0].tokens_per_block
        self.block_size = self.gpu_block_size * self.blocks_per_chunk
        self.world_size = max(1, config.parallel.world_size)
        self.bytes_per_gpu_block = config.worker_kv_bytes_per_block * self.world_size
        self.namespace = derive_namespace(config, self.block_size)
        self.instance_id = derive_instance_id(config)
        extra = {k: v for k, v in self.extra_config.items() if k not in VLLM_ONLY_KEYS}
        ignored = sorted(set(self.extra_config) & VLLM_ONLY_KEYS)
        if ignored:
            log.info("kvtier: ignoring vLLM-only keys: %s", ", ".join(ignored))
        extra.pop("blocks_per_chunk", None)
        extra["block_size"] = self.block_size
        self.kvtier_spec = kvtier.TieringOffloadingSpec(
            extra,
            gpu_block_size=self.gpu_block_size,
            bytes_per_gpu_block=self.bytes_per_gpu_block,
            namespace=self.namespace,
            instance_id=self.instance_id,
        )
        self._manager: KVTierManager | None = None
        self._worker: KVTierWorker | None = None

    def get_manager(self) -> KVTierManager:
        """The scheduler-side manager (built once)."""
        if self._manager is None:
            self._manager = KVTierManager(self.kvtier_spec.get_manager(), self.groups)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> KVTierWorker:
        """The worker for this rank's canonical KV tensors (built once)."""
        if self._worker is None:
            tensors = [t.tensor for t in kv_caches.tensors]
            self._worker = KVTierWorker(self._make_worker(tensors), self.blocks_per_chunk)
        return self._worker

    def _make_worker(self, tensors: Sequence[Any]) -> kvtier.OffloadingWorker:
        if self.world_size == 1:
            return self.kvtier_spec.get_worker(tensors)
        from kvtier.memory.region import BlockRegion

        cfg = self.kvtier_spec.config
        region = BlockRegion(
            self.kvtier_spec.region_name, cfg.num_slots, cfg.block_bytes, owner=False
        )
        try:
            view = _RankRegion(region, self.config.parallel.rank, self.world_size)
            return kvtier.OffloadingWorker(
                tensors, view, self.blocks_per_chunk, self.config.worker_kv_bytes_per_block
            )
        except BaseException:
            region.close()
            raise
