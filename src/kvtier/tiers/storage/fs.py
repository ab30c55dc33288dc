"""vLLM's ``fs`` tier configuration on kvtier's storage tier (``type: "fs"``)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from kvtier.tiers.base import TierContext
from kvtier.tiers.storage.tier import StorageTier

log = logging.getLogger("kvtier.tiers.storage")


class FsTier(StorageTier):
    """vLLM's ``fs`` tier configuration (``root_dir``, ``n_read_threads``, ``n_write_threads``).

    ``capacity_bytes`` is optional: by default 90% of the file system's free space, plus what the
    directory already holds, measured by the engine that sets the directory up. vLLM's
    ``enable_kv_events`` and ``locality`` are accepted and ignored (events are always on).
    """

    PARAMS: ClassVar[Mapping[str, str] | None] = {
        **(StorageTier.PARAMS or {}),
        "enable_kv_events": "accepted for vLLM compatibility (events are always produced)",
        "locality": "accepted for vLLM compatibility (ignored)",
    }
    capacity_required = False

    def __init__(
        self,
        ctx: TierContext,
        path: str,
        capacity_bytes: int | None = None,
        enable_kv_events: Any = None,
        locality: Any = None,
        **params: Any,
    ) -> None:
        super().__init__(ctx, path, capacity_bytes, **params)

    def _resolve_capacity(self, capacity_bytes: int | None) -> int:
        self._auto_capacity = capacity_bytes is None
        return capacity_bytes if capacity_bytes is not None else self._free_space_share(self.root, 0)

    def _capacity_alone(self) -> int:
        if not self._auto_capacity:
            return self.capacity_bytes
        held = 0  # what the directory already holds is space it may keep using
        with contextlib.suppress(OSError):
            for name in os.listdir(self.directory):
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(self.directory, name))
                    held += max(st.st_size, st.st_blocks * 512)
        self.capacity_bytes = self._free_space_share(self.directory, held)
        return self.capacity_bytes

    def _free_space_share(self, path: str, held: int) -> int:
        """90% of the free space of ``path``'s file system, plus ``held`` bytes already used."""
        probe = path
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        try:
            st = os.statvfs(probe)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        cap = max(int((free + held) * 0.9), 1)
        log.info(
            "tier %s: capacity_bytes not set; using 90%% of the free space of %s%s: %d bytes",
            self.name, probe, f" (including {held} bytes it holds)" if held else "", cap,
        )
        return cap
