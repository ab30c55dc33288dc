"""Trace parsing and the synthetic generator."""

from __future__ import annotations

import json

import pytest

from kvtier.bench.workload import (
    SyntheticParams,
    TraceError,
    block_key,
    load_trace,
    parse_trace_lines,
    synthetic_workload,
)


def _line(ts: float = 0, n: int = 1000, out: int = 5, ids: list[int] | None = None) -> str:
    return json.dumps(
        {"timestamp": ts, "input_length": n, "output_length": out, "hash_ids": ids or [0, 1]}
    )


def test_parses_a_valid_trace_in_order() -> None:
    lines = [_line(0, 1000, ids=[0, 1]), "", _line(5, 512, ids=[0]), _line(5, 1500, ids=[0, 1, 2])]
    wl = parse_trace_lines(lines, block_tokens=512, path="t.jsonl")
    assert [r.input_length for r in wl.requests] == [1000, 512, 1500]
    assert wl.requests[1].arrival_s == pytest.approx(0.005)
    assert wl.requests[0].keys == [block_key(0), block_key(1)]
    assert wl.distinct_blocks == 3 and wl.block_refs == 6


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"input_length": 10, "output_length": 1, "hash_ids": [1]}), "'timestamp'"),
        (json.dumps({"timestamp": 9, "output_length": 1, "hash_ids": [1]}), "'input_length'"),
        (json.dumps({"timestamp": 9, "input_length": "x", "output_length": 1, "hash_ids": [1]}),
         "must be an integer"),
        (json.dumps({"timestamp": 9, "input_length": 10, "output_length": 1, "hash_ids": []}),
         "'hash_ids'"),
        (json.dumps({"timestamp": 9, "input_length": 10, "output_length": 1, "hash_ids": [-3]}),
         "hash_ids must be integers"),
        (_line(9, 2000, ids=[0, 1]), "expected 4"),
        (_line(1, 1000, ids=[0, 1]), "earlier than the previous line"),
    ],
)
def test_bad_line_names_its_line_number(bad: str, fragment: str) -> None:
    lines = [_line(0), _line(2), bad, _line(20)]
    with pytest.raises(TraceError) as ei:
        parse_trace_lines(lines, block_tokens=512, path="trace.jsonl")
    assert ei.value.line == 3
    assert str(ei.value).startswith("trace.jsonl:3: ")
    assert fragment in str(ei.value)


def test_load_trace_reports_missing_file_and_empty_file(tmp_path) -> None:
    with pytest.raises(TraceError, match="cannot read the trace"):
        load_trace(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(empty)


def test_load_trace_limit(tmp_path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(_line(i) for i in range(5)) + "\n")
    assert len(load_trace(p, limit=2).requests) == 2


def test_synthetic_is_deterministic_under_a_seed() -> None:
    a = synthetic_workload(SyntheticParams(seed=7, sessions=40))
    b = synthetic_workload(SyntheticParams(seed=7, sessions=40))
    c = synthetic_workload(SyntheticParams(seed=8, sessions=40))
    sig = [(r.arrival_s, r.input_length, r.output_length, r.hash_ids) for r in a.requests]
    assert sig == [(r.arrival_s, r.input_length, r.output_length, r.hash_ids) for r in b.requests]
    assert sig != [(r.arrival_s, r.input_length, r.output_length, r.hash_ids) for r in c.requests]


def test_synthetic_ids_are_prefix_chained_and_shared() -> None:
    wl = synthetic_workload(SyntheticParams(seed=1, sessions=60))
    arrivals = [r.arrival_s for r in wl.requests]
    assert arrivals == sorted(arrivals)
    parent: dict[int, int | None] = {}
    for r in wl.requests:
        assert len(r.hash_ids) == -(-r.input_length // wl.block_tokens)
        prev = None
        for h in r.hash_ids:
            assert parent.setdefault(h, prev) == prev, "an id must always have the same parent"
            prev = h
    # Shared system prompts and multi-turn sessions make blocks recur.
    assert wl.distinct_blocks < 0.6 * wl.block_refs
