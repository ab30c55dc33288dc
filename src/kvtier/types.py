"""Data types shared by the scheduler side, the worker side and the adapters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ReqContext:
    """Per-request context passed to every manager call."""

    req_id: str
    kv_transfer_params: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _as_ids(block_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(block_ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("block_ids must be one-dimensional")
    return arr


class LoadStoreSpec:
    """Primary slots to load from or store to (``block_ids`` are slot ids)."""

    medium = "CPU"

    def __init__(self, block_ids: Sequence[int] | np.ndarray) -> None:
        self.block_ids: np.ndarray = _as_ids(block_ids)

    def __len__(self) -> int:
        return len(self.block_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.block_ids.tolist()!r})"


class GPULoadStoreSpec(LoadStoreSpec):
    """Engine (GPU) KV blocks; an offloaded block covers ``block_size // gpu_block_size`` of them."""

    medium = "GPU"


@dataclass
class PrepareStoreOutput:
    """What ``prepare_store`` reserved."""

    keys_to_store: list[bytes]
    store_spec: LoadStoreSpec
    evicted_keys: list[bytes]


@dataclass
class OffloadingEvent:
    """Blocks stored in (``removed=False``) or removed from a medium."""

    keys: list[bytes]
    medium: str
    removed: bool


@dataclass
class TransferResult:
    """A finished worker transfer."""

    job_id: int
    success: bool
    transfer_size: int | None = None
    transfer_time: float | None = None
