"""The ``object`` secondary tier (alias ``s3``): block records as objects in an S3-compatible bucket."""

from kvtier.tiers.object.tier import ObjectTier

__all__ = ["ObjectTier"]
