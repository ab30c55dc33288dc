"""Eviction policies and their registry."""

from __future__ import annotations

import inspect

from kvtier.config import ConfigError
from kvtier.plugins import load_class
from kvtier.policies.adaptive import AdaptivePolicy
from kvtier.policies.arc import ARCPolicy
from kvtier.policies.base import EvictionPolicy
from kvtier.policies.chain import ChainPolicy
from kvtier.policies.lru import LRUPolicy

_POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy, "arc": ARCPolicy, "chain": ChainPolicy, "adaptive": AdaptivePolicy,
}


def register_policy(name: str, cls: type[EvictionPolicy]) -> None:
    """Make ``cls`` available as ``eviction_policy: name``."""
    if not (inspect.isclass(cls) and issubclass(cls, EvictionPolicy)):
        raise TypeError(f"{cls!r} is not an EvictionPolicy subclass")
    _POLICIES[name] = cls


def policy_names() -> list[str]:
    """Registered policy names."""
    return sorted(_POLICIES)


def resolve_policy(
    name: str, module_path: str | None = None, *, key: str = "eviction_policy"
) -> type[EvictionPolicy]:
    """The policy class for a config value; raises ConfigError naming ``key``."""
    if module_path is not None:
        return load_class(module_path, name, EvictionPolicy,  # type: ignore[type-abstract]
                          path_key="cache_policy_module_path", name_key=key)
    cls = _POLICIES.get(name)
    if cls is None:
        raise ConfigError(
            key,
            "one of " + ", ".join(repr(n) for n in policy_names())
            + " (or a class name with cache_policy_module_path)",
            name,
        )
    return cls


__all__ = [
    "ARCPolicy",
    "AdaptivePolicy",
    "ChainPolicy",
    "EvictionPolicy",
    "LRUPolicy",
    "policy_names",
    "register_policy",
    "resolve_policy",
]
