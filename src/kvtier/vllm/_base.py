"""vLLM's names that the adapter uses, the version check, and the slot spec type.

Importing this module is the one place that fails when vLLM is missing, with a message that
says which version to install.
"""

from __future__ import annotations

import importlib.metadata
import os

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
        OffloadingConnectorStats,
    )
    from vllm.v1.kv_offload.base import (
        BlockIDsLoadStoreSpec,
        CanonicalKVCaches,
        GPULoadStoreSpec,
        LoadStoreSpec,
        Locality,
        LookupResult,
        Medium,
        OffloadingCounterMetadata,
        OffloadingEvent,
        OffloadingGaugeMetadata,
        OffloadingManager,
        OffloadingMetricMetadata,
        OffloadingSpec,
        OffloadingWorker,
        OffloadKey,
        PrepareStoreOutput,
        ReqContext,
        RequestOffloadingContext,
        ScheduleEndContext,
        TransferResult,
    )
    from vllm.v1.kv_offload.config import OffloadingConfig, OffloadingGroupConfig
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"kvtier.vllm needs vLLM 0.33.0 (pip install 'kvtier[vllm]'): {_e}"
    ) from _e

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "BlockIDsLoadStoreSpec",
    "CacheHitSource",
    "CanonicalKVCaches",
    "GPULoadStoreSpec",
    "HIT",
    "KVTierLoadStoreSpec",
    "LoadStoreSpec",
    "Locality",
    "LookupResult",
    "MISS",
    "Medium",
    "OffloadKey",
    "OffloadingConfig",
    "OffloadingConnectorStats",
    "OffloadingCounterMetadata",
    "OffloadingEvent",
    "OffloadingGaugeMetadata",
    "OffloadingGroupConfig",
    "OffloadingManager",
    "OffloadingMetricMetadata",
    "OffloadingSpec",
    "OffloadingWorker",
    "PrepareStoreOutput",
    "RETRY",
    "ReqContext",
    "RequestOffloadingContext",
    "ScheduleEndContext",
    "TESTED_VLLM_VERSIONS",
    "TransferResult",
    "check_vllm_version",
]

TESTED_VLLM_VERSIONS = ("0.33.0",)
ALLOW_UNTESTED_ENV = "KVTIER_ALLOW_UNTESTED_VLLM"

HIT, MISS, RETRY = LookupResult.HIT, LookupResult.MISS, LookupResult.RETRY


def check_vllm_version() -> str:
    """The installed vLLM version; raises RuntimeError when kvtier was not tested with it."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vllm imported above
        version = "unknown"
    if version not in TESTED_VLLM_VERSIONS and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise RuntimeError(
            f"kvtier.vllm: vLLM {version} is not a tested version (tested: "
            f"{', '.join(TESTED_VLLM_VERSIONS)}). Install a tested version "
            f"(pip install 'kvtier[vllm]'), or set {ALLOW_UNTESTED_ENV}=1 to try it anyway."
        )
    return version


class KVTierLoadStoreSpec(BlockIDsLoadStoreSpec):
    """kvtier primary slots (``block_ids`` are slot ids)."""

    medium = "CPU"
