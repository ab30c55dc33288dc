"""Admission policies: whether a block is worth writing to a secondary tier.

A tier's admission policy is asked once per block at the moment the block would be written (at
store time for a write-through tier, at eviction from the CPU tier for a write-back tier). It
learns online from what the manager shows it: every request's blocks, in prefix order, as they
are looked up (:meth:`AdmissionPolicy.observe`). A declined block is simply not written; the
manager counts it in ``admission_declined_blocks``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence

from kvtier.config import ConfigError
from kvtier.plugins import load_class


class AdmissionPolicy(ABC):
    """Decides which blocks a tier of ``capacity`` blocks (None: unknown) should be written."""

    name: str = "base"

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity

    def observe(self, keys: Sequence[bytes]) -> None:
        """A request references ``keys`` (prefix order, its end last); O(len(keys))."""
        return None

    @abstractmethod
    def admit(self, key: bytes) -> bool:
        """True when ``key`` should be written now; O(1)."""


class AdmitAll(AdmissionPolicy):
    """Write every block (the default)."""

    name = "all"

    def admit(self, key: bytes) -> bool:
        return True


_ADMISSION: dict[str, type[AdmissionPolicy]] = {"all": AdmitAll}


def register_admission_policy(name: str, cls: type[AdmissionPolicy]) -> None:
    """Make ``cls`` available as a tier's ``admission_policy: name``."""
    if not (inspect.isclass(cls) and issubclass(cls, AdmissionPolicy)):
        raise TypeError(f"{cls!r} is not an AdmissionPolicy subclass")
    _ADMISSION[name] = cls


def admission_policy_names() -> list[str]:
    """Registered admission policy names."""
    return sorted(_ADMISSION)


def resolve_admission_policy(
    name: str, module_path: str | None, label: str
) -> type[AdmissionPolicy]:
    """The class for a tier's ``admission_policy``; raises ConfigError naming ``label``'s key."""
    key = f"{label}.admission_policy"
    if module_path is not None:
        return load_class(module_path, name, AdmissionPolicy,  # type: ignore[type-abstract]
                          path_key=f"{label}.admission_policy_module_path", name_key=key)
    cls = _ADMISSION.get(name)
    if cls is None:
        raise ConfigError(
            key, "one of " + ", ".join(repr(n) for n in admission_policy_names())
            + " (or a class name with admission_policy_module_path)", name,
        )
    return cls
