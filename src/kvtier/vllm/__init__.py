"""kvtier behind vLLM's ``OffloadingConnector``: ``KVTierOffloadingSpec`` and its two adapters.

Select it with ``"spec_name": "KVTierOffloadingSpec", "spec_module_path": "kvtier.vllm"`` in
``kv_connector_extra_config``; the other keys are kvtier's (see API.md). Tested with vLLM 0.33.0.

The package: ``spec`` (the spec: geometry, namespace, building both sides), ``manager`` (the
scheduler-side adapter: per-key lookups answered from batched verdicts), ``worker`` (the
worker-side adapter: KV tensors <-> primary slots), ``events`` (events, hit sources and
Prometheus metrics in vLLM's terms). ``_base`` holds the vLLM names they share and is the one
import that fails, with a clear message, when vLLM is missing.
"""

from __future__ import annotations

import importlib  # noqa: F401  (kept reachable as kvtier.vllm.importlib for callers and tests)
import importlib.metadata  # noqa: F401

from kvtier.vllm._base import (
    ALLOW_UNTESTED_ENV,
    TESTED_VLLM_VERSIONS,
    KVTierLoadStoreSpec,
    Locality,
    LookupResult,
    Medium,
    ScheduleEndContext,
    check_vllm_version,
)
from kvtier.vllm.events import METRIC_PREFIX
from kvtier.vllm.manager import KVTierManager
from kvtier.vllm.spec import (
    VLLM_ONLY_KEYS,
    KVTierOffloadingSpec,
    derive_instance_id,
    derive_namespace,
)
from kvtier.vllm.worker import KVTierWorker

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "KVTierLoadStoreSpec",
    "KVTierManager",
    "KVTierOffloadingSpec",
    "KVTierWorker",
    "Locality",
    "LookupResult",
    "METRIC_PREFIX",
    "Medium",
    "ScheduleEndContext",
    "TESTED_VLLM_VERSIONS",
    "VLLM_ONLY_KEYS",
    "check_vllm_version",
    "derive_instance_id",
    "derive_namespace",
]
