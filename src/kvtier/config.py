"""Parsing and validation of ``extra_config`` (vLLM's ``kv_connector_extra_config``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Keys vLLM 0.33's OffloadingConnector, its spec factory or its own offloading specs read from
# kv_connector_extra_config; accepted and ignored here, so one config dict serves both.
VLLM_CONNECTOR_KEYS = frozenset(
    {
        "spec_name",
        "spec_module_path",
        "offload_prompt_only",
        "self_describing_kv_events",
        "blocks_per_chunk",
        "kv_bytes_per_rank",
        "num_cpu_blocks",
        "sync_load_budget_bytes",
        "enable_telemetry",
        "canonical_layout",
        "tier_poll_interval_s",
        "backpressure",
        "store_threshold",
        "max_tracker_size",
    }
)

KNOWN_KEYS = frozenset(
    {
        "cpu_bytes_to_use",
        "block_size",
        "eviction_policy",
        "cache_policy_module_path",
        "secondary_tiers",
        "cascade_policy",
        "cascade_policy_module_path",
        "promotion_deadline_seconds",
    }
)

# Keys every secondary tier's dict accepts besides its own parameters: the manager reads them.
MANAGER_TIER_KEYS = ("type", "module_path", "max_pinned_share", "slow_store_factor",
                     "write_policy", "admission_policy", "admission_policy_module_path")
DEFAULT_PROMOTION_DEADLINE_S = 0.5


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key and what is expected."""

    def __init__(self, key: str, expected: str, got: Any = None, *, show_got: bool = True) -> None:
        self.key = key
        self.expected = expected
        msg = f"kvtier config: {key!s}: expected {expected}"
        if show_got:
            msg += f", got {got!r}"
        super().__init__(msg)


def require_int(
    params: Mapping[str, Any], key: str, *, default: int | None = None, minimum: int = 1,
    label: str | None = None,
) -> int:
    """Read an integer parameter (bools rejected) that must be >= ``minimum``."""
    name = label or key
    if key not in params:
        if default is None:
            raise ConfigError(name, f"an integer >= {minimum} (required)", show_got=False)
        return default
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(name, f"an integer >= {minimum}", value)
    if value < minimum:
        raise ConfigError(name, f"an integer >= {minimum}", value)
    return int(value)


def optional_float(
    params: Mapping[str, Any], key: str, default: float | None, *, minimum: float = 0.0,
    label: str | None = None,
) -> float | None:
    """Read an optional positive number."""
    name = label or key
    if key not in params or params[key] is None:
        return default
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
        raise ConfigError(name, f"a number > {minimum}", value)
    return float(value)


def require_str(
    params: Mapping[str, Any], key: str, *, default: str | None = None, label: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> str:
    """Read a non-empty string parameter, optionally from a fixed set of choices."""
    name = label or key
    if key not in params or params[key] is None:
        if default is None:
            raise ConfigError(name, "a non-empty string (required)", show_got=False)
        return default
    value = params[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(name, "a non-empty string", value)
    if choices is not None and value not in choices:
        raise ConfigError(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def require_bool(params: Mapping[str, Any], key: str, default: bool, label: str | None = None) -> bool:
    """Read a boolean parameter."""
    if key not in params or params[key] is None:
        return default
    value = params[key]
    if not isinstance(value, bool):
        raise ConfigError(label or key, "true or false", value)
    return value


def machine_memory_bytes() -> int:
    """Physical memory of this machine, in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def shm_free_bytes() -> int:
    """Free space of /dev/shm (0 when it does not exist)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class TierConfig:
    """One validated ``secondary_tiers`` entry."""

    type: str
    module_path: str | None
    params: dict[str, Any]
    index: int
    max_pinned_share: float = 0.25
    slow_store_factor: float = 8.0
    write_policy: str | None = None  # "through" or "back"; None: the tier type's default
    admission_policy: str = "all"
    admission_policy_module_path: str | None = None


@dataclass(frozen=True)
class KVTierConfig:
    """The validated extra_config."""

    cpu_bytes_to_use: int
    block_size: int
    gpu_block_size: int
    block_bytes: int
    num_slots: int
    eviction_policy: str
    cache_policy_module_path: str | None
    cascade_policy: str
    cascade_policy_module_path: str | None
    secondary_tiers: tuple[TierConfig, ...] = field(default_factory=tuple)
    promotion_deadline_seconds: float = DEFAULT_PROMOTION_DEADLINE_S


def parse_config(
    extra_config: Mapping[str, Any], *, gpu_block_size: int, bytes_per_gpu_block: int
) -> KVTierConfig:
    """Validate ``extra_config`` and derive the primary tier's geometry; raises ConfigError."""
    if not isinstance(extra_config, Mapping):
        raise ConfigError("extra_config", "a dict", extra_config)
    if isinstance(gpu_block_size, bool) or not isinstance(gpu_block_size, int) or gpu_block_size <= 0:
        raise ConfigError("gpu_block_size", "a positive integer", gpu_block_size)
    if (
        isinstance(bytes_per_gpu_block, bool)
        or not isinstance(bytes_per_gpu_block, int)
        or bytes_per_gpu_block <= 0
    ):
        raise ConfigError("bytes_per_gpu_block", "a positive integer", bytes_per_gpu_block)
    unknown = set(extra_config) - KNOWN_KEYS - VLLM_CONNECTOR_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            key, "one of the known keys: " + ", ".join(sorted(KNOWN_KEYS)), extra_config[key]
        )

    cpu_bytes = require_int(extra_config, "cpu_bytes_to_use")
    block_size = require_int(extra_config, "block_size", default=gpu_block_size)
    if block_size % gpu_block_size:
        raise ConfigError(
            "block_size", f"a multiple of the GPU block size ({gpu_block_size} tokens)", block_size
        )
    block_bytes = bytes_per_gpu_block * (block_size // gpu_block_size)
    mem = machine_memory_bytes()
    if mem and cpu_bytes > mem:
        raise ConfigError(
            "cpu_bytes_to_use", f"at most this machine's memory ({mem} bytes)", cpu_bytes
        )
    shm = shm_free_bytes()
    if shm and cpu_bytes > shm:
        raise ConfigError(
            "cpu_bytes_to_use", f"at most the free space of /dev/shm ({shm} bytes)", cpu_bytes
        )
    num_slots = cpu_bytes // block_bytes
    if num_slots < 1:
        raise ConfigError(
            "cpu_bytes_to_use", f"at least one offloaded block ({block_bytes} bytes)", cpu_bytes
        )

    policy = require_str(extra_config, "eviction_policy", default="lru")
    policy_path = extra_config.get("cache_policy_module_path")
    if policy_path is not None and (not isinstance(policy_path, str) or not policy_path):
        raise ConfigError("cache_policy_module_path", "an importable module path", policy_path)
    cascade = require_str(extra_config, "cascade_policy", default="all")
    cascade_path = extra_config.get("cascade_policy_module_path")
    if cascade_path is not None and (not isinstance(cascade_path, str) or not cascade_path):
        raise ConfigError("cascade_policy_module_path", "an importable module path", cascade_path)

    tiers_raw = extra_config.get("secondary_tiers", [])
    if tiers_raw is None:
        tiers_raw = []
    if not isinstance(tiers_raw, list):
        raise ConfigError("secondary_tiers", "a list of tier dicts", tiers_raw)
    tiers: list[TierConfig] = []
    for i, entry in enumerate(tiers_raw):
        key = f"secondary_tiers[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(key, "a dict with a 'type' key", entry)
        ttype = entry.get("type")
        if not isinstance(ttype, str) or not ttype:
            raise ConfigError(f"{key}.type", "a tier type name (string)", ttype)
        module_path = entry.get("module_path")
        if module_path is not None and (not isinstance(module_path, str) or not module_path):
            raise ConfigError(f"{key}.module_path", "an importable module path", module_path)
        share = optional_float(entry, "max_pinned_share", 0.25, label=f"{key}.max_pinned_share")
        assert share is not None
        if share > 1:
            raise ConfigError(f"{key}.max_pinned_share", "a share of the CPU tier in (0, 1]", share)
        factor = optional_float(entry, "slow_store_factor", 8.0, minimum=1.0,
                                label=f"{key}.slow_store_factor")
        assert factor is not None
        write_policy = None
        if entry.get("write_policy") is not None:
            write_policy = require_str(entry, "write_policy", label=f"{key}.write_policy",
                                       choices=("through", "back"))
        admission = require_str(entry, "admission_policy", default="all",
                                label=f"{key}.admission_policy")
        adm_path = entry.get("admission_policy_module_path")
        if adm_path is not None and (not isinstance(adm_path, str) or not adm_path):
            raise ConfigError(f"{key}.admission_policy_module_path", "an importable module path",
                              adm_path)
        params = {k: v for k, v in entry.items() if k not in MANAGER_TIER_KEYS}
        tiers.append(TierConfig(type=ttype, module_path=module_path, params=params, index=i,
                                max_pinned_share=share, slow_store_factor=factor,
                                write_policy=write_policy, admission_policy=admission,
                                admission_policy_module_path=adm_path))
    deadline = optional_float(extra_config, "promotion_deadline_seconds",
                              DEFAULT_PROMOTION_DEADLINE_S)
    assert deadline is not None

    return KVTierConfig(
        cpu_bytes_to_use=cpu_bytes,
        block_size=block_size,
        gpu_block_size=gpu_block_size,
        block_bytes=block_bytes,
        num_slots=num_slots,
        eviction_policy=policy,
        cache_policy_module_path=policy_path,
        cascade_policy=cascade,
        cascade_policy_module_path=cascade_path,
        secondary_tiers=tuple(tiers),
        promotion_deadline_seconds=deadline,
    )
