"""Scheduler side: the manager contract, the CPU primary tier and the tiering orchestrator."""

from kvtier.manager.base import OffloadingManager
from kvtier.manager.cascade import CascadePolicy, register_cascade_policy
from kvtier.manager.primary import PrimaryTier
from kvtier.manager.tiering import TieringManager

__all__ = [
    "CascadePolicy",
    "OffloadingManager",
    "PrimaryTier",
    "TieringManager",
    "register_cascade_policy",
]
