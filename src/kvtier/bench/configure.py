"""The configuration a ``kvtier bench`` run replays: the embedded default or ``--config``, merged,
validated as the library validates it, with what the flags override said out loud."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from typing import Any

from kvtier.bench.engine import EngineOptions
from kvtier.bench.runner import default_secondary_tier, parse_config_arg, with_capacities

DEFAULT_CPU_FRACTION = 0.1  # CPU tier: this share of the workload's distinct blocks
DEFAULT_TIER_FRACTION = 1.0  # the embedded default's storage tier: room for every block


@dataclass
class SizeFlags:
    """The flags that size tiers (None: not given)."""

    cpu_blocks: int | None = None
    cpu_fraction: float | None = None
    tier_blocks: int | None = None
    tier_fraction: float | None = None
    sweep: bool = False


@dataclass
class BenchConfig:
    """What one run replays, and what to tell the user about it first."""

    config: dict[str, Any]
    cpu_blocks: int
    tier_blocks: int | None
    notes: list[str] = field(default_factory=list)
    tmpdir: str | None = None  # the default storage tier's directory (removed after the run)


def _default_tiers(tmp: str) -> list[dict[str, Any]]:
    ttype = default_secondary_tier()
    tier: dict[str, Any] = {"type": ttype}
    if ttype == "storage":
        tier["path"] = tmp
    return [tier]


def _validate(config: dict[str, Any], opts: EngineOptions) -> None:
    """Validate as ``TieringOffloadingSpec`` does (raises ConfigError naming the key)."""
    from kvtier.spec import TieringOffloadingSpec

    TieringOffloadingSpec(config, gpu_block_size=opts.gpu_block_tokens,
                          bytes_per_gpu_block=opts.bytes_per_gpu_block, namespace="bench/check")


def build(config_arg: str | None, opts: EngineOptions, distinct: int,
          flags: SizeFlags) -> BenchConfig:
    """Merge ``--config`` over the embedded default, size the tiers, validate the whole config.

    A config without ``secondary_tiers`` keeps the default's storage tier (and says so); an empty
    list means the CPU tier alone. ``block_size`` always follows ``--block-tokens`` (the
    workload's block size). Raises ValueError (bad JSON or file) or ConfigError (a bad value, as
    the library reports it).
    """
    user = parse_config_arg(config_arg) if config_arg else None
    notes: list[str] = []
    tmp = None
    config = copy.deepcopy(user) if user is not None else {}
    default_tiers = user is None or "secondary_tiers" not in user
    if default_tiers:
        tmp = tempfile.mkdtemp(prefix="kvtier-bench-")
        config["secondary_tiers"] = _default_tiers(tmp)
        if user is not None:
            notes.append(f"--config sets no secondary_tiers: the default "
                         f"{config['secondary_tiers'][0]['type']} tier is replayed, in a temporary "
                         "directory (\"secondary_tiers\": [] replays the CPU tier alone)")
    try:
        if user is not None and user.get("block_size", opts.block_tokens) != opts.block_tokens:
            notes.append(f"--block-tokens overrides block_size: {user['block_size']!r} -> "
                         f"{opts.block_tokens} (the workload's block size)")
        config["block_size"] = opts.block_tokens

        # the user's values as given, with what the bench supplies where the config is silent
        cpu_given = user is not None and "cpu_bytes_to_use" in user
        fallback_cpu = max(1, int(round(DEFAULT_CPU_FRACTION * distinct)))
        check = copy.deepcopy(config)
        check.setdefault("cpu_bytes_to_use", fallback_cpu * opts.bytes_per_block)
        tier_blocks = None
        if default_tiers:
            tier_blocks = max(1, int(DEFAULT_TIER_FRACTION * distinct))
        if flags.tier_blocks:
            tier_blocks = flags.tier_blocks
        elif flags.tier_fraction:
            tier_blocks = max(1, int(round(flags.tier_fraction * distinct)))
        tiers = check.get("secondary_tiers")
        if tier_blocks is not None and isinstance(tiers, list) \
                and all(isinstance(t, dict) for t in tiers):
            sized = with_capacities(check, opts.bytes_per_block, 1, tier_blocks)
            for t, s in zip(check.get("secondary_tiers") or [], sized.get("secondary_tiers") or []):
                if isinstance(t, dict) and "capacity_bytes" not in t and "capacity_bytes" in s:
                    t["capacity_bytes"] = s["capacity_bytes"]
        _validate(check, opts)

        if flags.cpu_blocks:
            cpu_blocks = flags.cpu_blocks
        elif flags.cpu_fraction:
            cpu_blocks = max(1, int(round(flags.cpu_fraction * distinct)))
        elif cpu_given:
            cpu_blocks = max(1, int(config["cpu_bytes_to_use"]) // opts.bytes_per_block)
        else:
            cpu_blocks = fallback_cpu
        if cpu_given and (flags.cpu_blocks or flags.cpu_fraction):
            flag = "--cpu-blocks" if flags.cpu_blocks else "--cpu-fraction"
            notes.append(f"{flag} overrides cpu_bytes_to_use: {config['cpu_bytes_to_use']} -> "
                         f"{cpu_blocks * opts.bytes_per_block}")
        if cpu_given and flags.sweep:
            notes.append("--sweep overrides cpu_bytes_to_use in its extra replays")
        if user is not None and "secondary_tiers" in user and (flags.tier_blocks
                                                               or flags.tier_fraction):
            flag = "--tier-blocks" if flags.tier_blocks else "--tier-fraction"
            sized = with_capacities(config, opts.bytes_per_block, cpu_blocks, tier_blocks)
            for i, (t, s) in enumerate(zip(config["secondary_tiers"], sized["secondary_tiers"])):
                if isinstance(t, dict) and "capacity_bytes" in t \
                        and t["capacity_bytes"] != s.get("capacity_bytes"):
                    notes.append(f"{flag} overrides secondary_tiers[{i}].capacity_bytes: "
                                 f"{t['capacity_bytes']} -> {s['capacity_bytes']}")
        # and the whole config as it will be replayed
        _validate(with_capacities(config, opts.bytes_per_block, cpu_blocks, tier_blocks), opts)
    except BaseException:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BenchConfig(config, cpu_blocks, tier_blocks, notes, tmp)
