"""Tier registry: built-in names, registered names, and ``module_path`` loading."""

from __future__ import annotations

import importlib
import inspect

from kvtier.config import ConfigError
from kvtier.plugins import load_class
from kvtier.tiers.base import SecondaryTier

# name -> "module:Class"; imported lazily so that an unused tier's dependencies are not needed.
_BUILTIN: dict[str, str] = {
    "example": "kvtier.tiers.example:ExampleTier",
    "storage": "kvtier.tiers.storage:StorageTier",
    "fs": "kvtier.tiers.storage:FsTier",
    "network": "kvtier.tiers.network:NetworkTier",
    "object": "kvtier.tiers.object:ObjectTier",
    "s3": "kvtier.tiers.object:ObjectTier",
}
_REGISTERED: dict[str, type[SecondaryTier]] = {}


def register_tier(name: str, cls: type[SecondaryTier]) -> None:
    """Make ``cls`` available as ``{"type": name}``."""
    if not (inspect.isclass(cls) and issubclass(cls, SecondaryTier)):
        raise TypeError(f"{cls!r} is not a SecondaryTier subclass")
    _REGISTERED[name] = cls


def tier_names() -> list[str]:
    """All names usable as a tier ``type`` without ``module_path``."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def resolve_tier(type_name: str, module_path: str | None, label: str) -> type[SecondaryTier]:
    """The class for a ``secondary_tiers`` entry; raises ConfigError naming ``label``."""
    if module_path is not None:
        return load_class(module_path, type_name, SecondaryTier,  # type: ignore[type-abstract]
                          path_key=f"{label}.module_path", name_key=f"{label}.type")
    if type_name in _REGISTERED:
        return _REGISTERED[type_name]
    target = _BUILTIN.get(type_name)
    if target is None:
        raise ConfigError(
            f"{label}.type",
            "one of " + ", ".join(repr(n) for n in tier_names()) + " (or a class with module_path)",
            type_name,
        )
    mod_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{label}.type", f"an available tier ({e})", type_name) from e
    cls = getattr(module, cls_name)
    return cls
