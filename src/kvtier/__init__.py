"""kvtier: multi-tier KV cache offloading for LLM inference engines."""

from kvtier.config import ConfigError
from kvtier.manager.base import OffloadingManager
from kvtier.manager.cascade import CascadePolicy, register_cascade_policy
from kvtier.manager.tiering import TieringManager
from kvtier.policies import EvictionPolicy, register_policy
from kvtier.spec import TieringOffloadingSpec
from kvtier.tiers.base import SecondaryTier, TierContext, TierEvent, TierJobResult
from kvtier.tiers.registry import register_tier
from kvtier.transfer.worker import OffloadingWorker
from kvtier.types import (
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingEvent,
    PrepareStoreOutput,
    ReqContext,
    TransferResult,
)

__version__ = "0.1.0"

__all__ = [
    "CascadePolicy",
    "ConfigError",
    "EvictionPolicy",
    "GPULoadStoreSpec",
    "LoadStoreSpec",
    "OffloadingEvent",
    "OffloadingManager",
    "OffloadingWorker",
    "PrepareStoreOutput",
    "ReqContext",
    "SecondaryTier",
    "TierContext",
    "TierEvent",
    "TierJobResult",
    "TieringManager",
    "TieringOffloadingSpec",
    "TransferResult",
    "__version__",
    "register_cascade_policy",
    "register_policy",
    "register_tier",
]
