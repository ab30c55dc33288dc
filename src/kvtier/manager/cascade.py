"""Cascade (write) policies: which freshly resident primary blocks go to which secondary tier."""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.config import ConfigError
from kvtier.plugins import load_class
from kvtier.tiers.base import SecondaryTier


class CascadePolicy:
    """Write-through: every block goes to every tier (the default, ``"all"``)."""

    name = "all"

    def select(self, keys: Sequence[bytes], tier_index: int, tier: SecondaryTier) -> Sequence[bytes]:
        """The subset of ``keys`` to write to ``tier`` now."""
        return keys


class FirstTierPolicy(CascadePolicy):
    """Write only to the first secondary tier (the others are filled by promotion's write-back)."""

    name = "first"

    def select(self, keys: Sequence[bytes], tier_index: int, tier: SecondaryTier) -> Sequence[bytes]:
        return keys if tier_index == 0 else ()


_CASCADE: dict[str, type[CascadePolicy]] = {"all": CascadePolicy, "first": FirstTierPolicy}


def register_cascade_policy(name: str, cls: type[CascadePolicy]) -> None:
    """Make ``cls`` available as ``cascade_policy: name``."""
    _CASCADE[name] = cls


def resolve_cascade_policy(name: str, module_path: str | None) -> type[CascadePolicy]:
    """The class for a ``cascade_policy`` value; raises ConfigError."""
    if module_path is not None:
        return load_class(module_path, name, CascadePolicy,
                          path_key="cascade_policy_module_path", name_key="cascade_policy")
    if name not in _CASCADE:
        raise ConfigError(
            "cascade_policy", "one of " + ", ".join(repr(n) for n in sorted(_CASCADE)), name
        )
    return _CASCADE[name]
