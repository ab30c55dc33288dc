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
from collections import OrderedDict
from collections.abc import Sequence

from kvtier.config import ConfigError
from kvtier.plugins import load_class
from kvtier.policies.reuse import ReusePredictor


class AdmissionPolicy(ABC):
    """Decides which blocks a tier of ``capacity`` blocks (None: unknown) should be written."""

    name: str = "base"

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity

    def observe(self, keys: Sequence[bytes], request: str | None = None, upper: int = 0) -> None:
        """Request ``request`` references ``keys`` (prefix order, its end last), of which the
        CPU tier holds the first ``upper``; called on each of its lookups (again when a lookup
        answered None); O(len(keys))."""
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


class ReuseAdmission(AdmissionPolicy):
    """Declines blocks the reuse predictor calls cold, unless a shadow of the tier says that
    declining costs hits.

    The prediction (:class:`kvtier.policies.reuse.ReusePredictor`): a block seen in a single
    request so far, among the last ``tail_blocks`` blocks of that request, is the request's
    own suffix and is rarely asked for again; a block seen twice or more, or deep inside a
    longer prompt, is written. Two metadata-only LRU shadows of the tier's capacity replay
    what the tier would hold if it wrote everything offered and if it wrote only what this
    policy admits. Every ``window`` lookups their hits (the run of a request's blocks each would
    serve after those the CPU tier serves; a count that decays by ``decay`` per window) are
    compared; while the filtered shadow holds less than
    ``1 - slack`` times the other one, every block is admitted, and so it is until the shadow of
    all writes is full and a first window after that has been compared.
    History is bounded (``history`` keys; the shadows hold at most the tier's capacity each).
    """

    name = "reuse"
    tail_blocks = 32
    window = 64
    decay = 0.75
    slack = 0.01

    def __init__(self, capacity: int | None = None, *, history: int | None = None) -> None:
        super().__init__(capacity)
        self.predictor = ReusePredictor(history or max(4 * (capacity or 0), 1 << 16),
                                        self.tail_blocks)
        self.fallback = capacity is not None and capacity > 0  # until the shadows have spoken
        self.shadow_all: OrderedDict[bytes, None] | None = None
        self.shadow_filtered: OrderedDict[bytes, None] | None = None
        if capacity:
            self.shadow_all = OrderedDict()
            self.shadow_filtered = OrderedDict()
        self._hits = [0.0, 0.0]
        self._lookups = 0
        self._warm = False
        self.declined = 0

    def observe(self, keys: Sequence[bytes], request: str | None = None, upper: int = 0) -> None:
        if not self.predictor.observe(keys, request):
            return
        if self.shadow_all is None or self.shadow_filtered is None:
            return
        # A shadow's hits: the run it would serve after what the CPU tier serves.
        for j, shadow in enumerate((self.shadow_all, self.shadow_filtered)):
            run = True
            for i, k in enumerate(keys):
                if k in shadow:
                    shadow.move_to_end(k)
                    if run and i >= upper:
                        self._hits[j] += 1
                elif i >= upper:
                    run = False
        self._lookups += 1
        if self._lookups >= self.window:
            h_all, h_filt = self._hits
            if not self._warm:  # a tier that is not full yet loses nothing to writes:
                # compare only once the shadows are full, from then on
                self._warm = len(self.shadow_all) >= (self.capacity or 0)
                self._hits = [0.0, 0.0]
                self._lookups = 0
                return
            self.fallback = h_filt < (1.0 - self.slack) * h_all
            self._hits = [h_all * self.decay, h_filt * self.decay]
            self._lookups = 0

    def _shadow_put(self, shadow: OrderedDict[bytes, None], key: bytes) -> None:
        shadow[key] = None
        shadow.move_to_end(key)
        if len(shadow) > (self.capacity or 0):
            shadow.popitem(last=False)

    def admit(self, key: bytes) -> bool:
        ok = not self.predictor.cold(key)
        if self.shadow_all is not None and self.shadow_filtered is not None:
            self._shadow_put(self.shadow_all, key)
            if ok:
                self._shadow_put(self.shadow_filtered, key)
        if ok or self.fallback:
            return True
        self.declined += 1
        return False


_ADMISSION["reuse"] = ReuseAdmission
