"""``kvtier bench``: replay workloads through an engine simulator and kvtier, with baselines."""

from kvtier.bench.engine import BenchError, EngineOptions, EngineSim
from kvtier.bench.offload import KVTierOffload, Offload
from kvtier.bench.reference import reference_lru
from kvtier.bench.runner import SCHEMA, BenchRunner, Plan
from kvtier.bench.workload import (
    Request,
    SyntheticParams,
    TraceError,
    Workload,
    load_trace,
    parse_trace_lines,
    synthetic_workload,
)

__all__ = [
    "SCHEMA",
    "BenchError",
    "BenchRunner",
    "EngineOptions",
    "EngineSim",
    "KVTierOffload",
    "Offload",
    "Plan",
    "Request",
    "SyntheticParams",
    "TraceError",
    "Workload",
    "load_trace",
    "parse_trace_lines",
    "reference_lru",
    "synthetic_workload",
]
