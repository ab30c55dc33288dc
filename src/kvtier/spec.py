"""TieringOffloadingSpec: builds the primary region, the secondary tiers, the manager and workers."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from kvtier.config import ConfigError, KVTierConfig, parse_config
from kvtier.format.record import namespace_fingerprint, namespace_key
from kvtier.manager.backpressure import TierBackpressure
from kvtier.manager.cascade import resolve_cascade_policy
from kvtier.manager.primary import PrimaryTier
from kvtier.manager.tiering import TieringManager
from kvtier.memory.region import BlockRegion
from kvtier.policies import resolve_policy
from kvtier.policies.admission import AdmissionPolicy, resolve_admission_policy
from kvtier.tiers.base import SecondaryTier, TierContext
from kvtier.tiers.registry import resolve_tier

log = logging.getLogger("kvtier")


class TieringOffloadingSpec:
    """A kvtier configuration for one engine instance (see API.md)."""

    def __init__(
        self,
        extra_config: Mapping[str, Any],
        gpu_block_size: int = 16,
        bytes_per_gpu_block: int = 65536,
        namespace: str = "default",
        instance_id: str | None = None,
    ) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ConfigError("namespace", "a non-empty string", namespace)
        if instance_id is not None and (
            not isinstance(instance_id, str) or not instance_id or "/" in instance_id
        ):
            raise ConfigError("instance_id", "a non-empty string without '/'", instance_id)
        self.extra_config = dict(extra_config) if isinstance(extra_config, Mapping) else extra_config
        self.gpu_block_size = gpu_block_size
        self.bytes_per_gpu_block = bytes_per_gpu_block
        self.namespace = namespace
        self.instance_id = instance_id or uuid.uuid4().hex[:20]
        self._validate()
        self._manager: TieringManager | None = None

    def _validate(self) -> None:
        """Check every key and every tier's parameters; nothing is allocated here."""
        self.config: KVTierConfig = parse_config(
            self.extra_config,
            gpu_block_size=self.gpu_block_size,
            bytes_per_gpu_block=self.bytes_per_gpu_block,
        )
        cfg = self.config
        self._policy_cls = resolve_policy(cfg.eviction_policy, cfg.cache_policy_module_path)
        self._cascade_cls = resolve_cascade_policy(
            cfg.cascade_policy, cfg.cascade_policy_module_path
        )
        self._tier_plan: list[tuple[type[SecondaryTier], dict[str, Any], str]] = []
        self._write_policies: list[str] = []
        self._admission_plan: list[type[AdmissionPolicy]] = []
        for t in cfg.secondary_tiers:
            label = f"secondary_tiers[{t.index}]"
            cls = resolve_tier(t.type, t.module_path, label)
            params = cls.validate_params(t.params, label)
            self._tier_plan.append((cls, params, f"{t.type.lower()}{t.index}"))
            self._write_policies.append(t.write_policy or cls.DEFAULT_WRITE_POLICY)
            self._admission_plan.append(resolve_admission_policy(
                t.admission_policy, t.admission_policy_module_path, label))

    # -- pickling: a worker process rebuilds from the same arguments -----------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "extra_config": self.extra_config,
            "gpu_block_size": self.gpu_block_size,
            "bytes_per_gpu_block": self.bytes_per_gpu_block,
            "namespace": self.namespace,
            "instance_id": self.instance_id,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    # -- geometry --------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        """Tokens per offloaded block."""
        return self.config.block_size

    @property
    def block_bytes(self) -> int:
        """Bytes per offloaded block (one primary slot)."""
        return self.config.block_bytes

    @property
    def num_slots(self) -> int:
        """Slots of the CPU primary tier."""
        return self.config.num_slots

    @property
    def region_name(self) -> str:
        """Name of the primary region's shared-memory segment."""
        return f"kvtier-{self.instance_id}"

    @property
    def namespace_key(self) -> str:
        """What persistent tiers fingerprint: the namespace and the block geometry."""
        return namespace_key(self.namespace, self.block_bytes)

    # -- building --------------------------------------------------------------------------
    def get_manager(self) -> TieringManager:
        """The tiering manager (built once per spec)."""
        if self._manager is not None:
            return self._manager
        cfg = self.config
        region = BlockRegion(self.region_name, cfg.num_slots, cfg.block_bytes, owner=True)
        tiers: list[SecondaryTier] = []
        try:
            fp = namespace_fingerprint(self.namespace_key)
            for i, (cls, params, name) in enumerate(self._tier_plan):
                ctx = TierContext(
                    namespace=self.namespace,
                    namespace_fp=fp,
                    block_bytes=cfg.block_bytes,
                    primary=region.array,
                    name=name,
                    index=i,
                )
                tiers.append(cls(ctx, **params))
        except BaseException:
            for t in tiers:
                t.shutdown()
            region.close()
            raise
        primary = PrimaryTier(cfg.num_slots, self._policy_cls(cfg.num_slots))
        admissions: list[AdmissionPolicy | None] = []
        for tier, adm_cls in zip(tiers, self._admission_plan):
            admissions.append(None if adm_cls.name == "all" else adm_cls(tier.block_capacity()))
        pressure = [
            TierBackpressure(name, cfg.num_slots, t.max_pinned_share, t.slow_store_factor)
            for (_, _, name), t in zip(self._tier_plan, cfg.secondary_tiers)
        ]
        self._manager = TieringManager(
            primary, region.array, tiers, self._cascade_cls(), on_shutdown=region.close,
            backpressure=pressure, promotion_deadline_s=cfg.promotion_deadline_seconds,
            write_policies=self._write_policies, admissions=admissions,
        )
        log.info(
            "kvtier: %d primary slots of %d bytes, tiers: %s",
            cfg.num_slots, cfg.block_bytes, ", ".join(n for _, _, n in self._tier_plan) or "none",
        )
        return self._manager

    def get_worker(self, kv_caches: Sequence[Any]) -> Any:
        """A worker copying between ``kv_caches`` and this instance's primary region."""
        from kvtier.transfer.worker import OffloadingWorker

        cfg = self.config
        region = BlockRegion(self.region_name, cfg.num_slots, cfg.block_bytes, owner=False)
        try:
            return OffloadingWorker(
                kv_caches, region, cfg.block_size // cfg.gpu_block_size, self.bytes_per_gpu_block
            )
        except BaseException:
            region.close()
            raise
