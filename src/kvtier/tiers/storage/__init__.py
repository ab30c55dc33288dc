"""The ``storage`` secondary tier (and vLLM's ``fs`` alias): checksummed block records in slab files."""

from kvtier.tiers.storage.fs import FsTier
from kvtier.tiers.storage.tier import StorageTier

__all__ = ["FsTier", "StorageTier"]
