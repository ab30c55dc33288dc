"""Secondary tiers: the contract, the registry and the built-in tiers."""

from kvtier.tiers.base import (
    Completions,
    Health,
    SecondaryTier,
    TierContext,
    TierEvent,
    TierJobResult,
)
from kvtier.tiers.registry import register_tier, resolve_tier, tier_names

__all__ = [
    "Completions",
    "Health",
    "SecondaryTier",
    "TierContext",
    "TierEvent",
    "TierJobResult",
    "register_tier",
    "resolve_tier",
    "tier_names",
]
