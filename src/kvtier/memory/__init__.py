"""The primary tier's block region in shared memory."""

from kvtier.memory.region import BlockRegion

__all__ = ["BlockRegion"]
