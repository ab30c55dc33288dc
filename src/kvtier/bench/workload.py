"""Workloads for the bench: Mooncake JSONL traces and a seeded synthetic multi-turn generator.

A workload is a list of :class:`Request` in arrival order. Each request names its prompt's blocks
by prefix-chained ids (``hash_ids``): the same id always stands for the same prefix, so ids map
one-to-one onto kvtier block keys.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY_TAG = b"kvtb"


def block_key(hash_id: int) -> bytes:
    """The kvtier key of a trace block id (12 bytes: a tag and the id, big-endian)."""
    return KEY_TAG + int(hash_id).to_bytes(8, "big", signed=False)


@dataclass
class Request:
    """One prefill request of a workload."""

    req_id: str
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: list[int]
    keys: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [block_key(h) for h in self.hash_ids]


@dataclass
class Workload:
    """Requests in arrival order plus where they came from."""

    name: str
    block_tokens: int
    requests: list[Request]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def distinct_blocks(self) -> int:
        """Number of distinct block ids referenced."""
        return len({h for r in self.requests for h in r.hash_ids})

    @property
    def block_refs(self) -> int:
        """Total block references (the denominator of the block hit rate)."""
        return sum(len(r.hash_ids) for r in self.requests)

    @property
    def input_tokens(self) -> int:
        """Total prompt tokens."""
        return sum(r.input_length for r in self.requests)

    def head(self, n: int) -> Workload:
        """The first ``n`` requests."""
        return Workload(self.name, self.block_tokens, self.requests[:n], dict(self.params))


class TraceError(ValueError):
    """A trace line that cannot be used; the message names the file and line number."""

    def __init__(self, path: str, line: int, what: str) -> None:
        self.path = path
        self.line = line
        super().__init__(f"{path}:{line}: {what}")


def _int_field(obj: dict[str, Any], name: str, path: str, lineno: int, minimum: int) -> int:
    if name not in obj:
        raise TraceError(path, lineno, f"missing field {name!r}")
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
        isinstance(v, float) and not v.is_integer()
    ):
        raise TraceError(path, lineno, f"field {name!r} must be an integer, got {v!r}")
    if v < minimum:
        raise TraceError(path, lineno, f"field {name!r} must be >= {minimum}, got {v!r}")
    return int(v)


def parse_trace_lines(
    lines: Iterable[str], *, block_tokens: int = 512, path: str = "<trace>"
) -> Workload:
    """Parse Mooncake JSONL lines (``timestamp`` ms, ``input_length``, ``output_length``,
    ``hash_ids``); raises TraceError naming the line of the first bad record."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    reqs: list[Request] = []
    last_ts = -math.inf
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TraceError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
        if "timestamp" not in obj:
            raise TraceError(path, lineno, "missing field 'timestamp'")
        ts = obj["timestamp"]
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
            raise TraceError(path, lineno, f"field 'timestamp' must be a number >= 0, got {ts!r}")
        if ts < last_ts:
            raise TraceError(
                path, lineno, f"timestamp {ts!r} is earlier than the previous line's {last_ts!r}"
            )
        last_ts = ts
        input_length = _int_field(obj, "input_length", path, lineno, 1)
        output_length = _int_field(obj, "output_length", path, lineno, 0)
        ids = obj.get("hash_ids")
        if not isinstance(ids, list) or not ids:
            raise TraceError(path, lineno, f"field 'hash_ids' must be a non-empty list, got {ids!r}")
        for h in ids:
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise TraceError(path, lineno, f"hash_ids must be integers >= 0, got {h!r}")
        need = -(-input_length // block_tokens)
        if len(ids) != need:
            raise TraceError(
                path,
                lineno,
                f"{len(ids)} hash_ids for input_length {input_length} with {block_tokens}-token "
                f"blocks (expected {need}; is --block-tokens right?)",
            )
        reqs.append(Request(f"r{lineno}", float(ts) / 1000.0, input_length, output_length, ids))
    if not reqs:
        raise TraceError(path, 0, "the trace has no requests")
    return Workload(Path(path).name, block_tokens, reqs, {"path": path})


def load_trace(path: str | Path, *, block_tokens: int = 512, limit: int | None = None) -> Workload:
    """Read a Mooncake JSONL trace file (optionally only its first ``limit`` requests)."""
    p = Path(path)
    try:
        with p.open("r", encoding="utf-8") as f:
            wl = parse_trace_lines(f, block_tokens=block_tokens, path=str(p))
    except OSError as e:
        raise TraceError(str(p), 0, f"cannot read the trace: {e.strerror or e}") from None
    if limit is not None:
        wl = wl.head(limit)
    return wl


@dataclass(frozen=True)
class SyntheticParams:
    """Knobs of the synthetic multi-turn workload."""

    seed: int = 0
    sessions: int = 400
    system_prompts: int = 6
    system_tokens: tuple[int, int] = (1024, 4096)
    zipf_s: float = 1.2
    turns_mean: float = 4.0
    user_tokens: tuple[int, int] = (64, 768)
    output_tokens: tuple[int, int] = (32, 384)
    session_rate: float = 4.0  # new sessions per second (Poisson)
    think_s: float = 8.0  # mean pause between a reply and the next turn
    block_tokens: int = 512


def synthetic_workload(params: SyntheticParams | None = None) -> Workload:
    """A seeded multi-turn chat workload: shared system prompts with Zipf popularity, sessions
    arriving as a Poisson process, each turn re-sending the whole conversation so far."""
    p = params or SyntheticParams()
    rng = random.Random(p.seed)
    bt = p.block_tokens
    sys_len = [rng.randint(*p.system_tokens) for _ in range(p.system_prompts)]
    weights = [1.0 / (i + 1) ** p.zipf_s for i in range(p.system_prompts)]
    ids: dict[tuple[Any, ...], int] = {}

    def block_id(ident: tuple[Any, ...]) -> int:
        v = ids.get(ident)
        if v is None:
            v = ids[ident] = len(ids)
        return v

    pending: list[tuple[float, int, int, list[int]]] = []  # (arrival, session, turn, lengths)
    t = 0.0
    for s in range(p.sessions):
        t += rng.expovariate(p.session_rate)
        sp = rng.choices(range(p.system_prompts), weights)[0]
        turns = max(1, min(64, int(round(rng.expovariate(1.0 / p.turns_mean))) + 1))
        hist = sys_len[sp]
        at = t
        for k in range(turns):
            user = rng.randint(*p.user_tokens)
            out = rng.randint(*p.output_tokens)
            prompt = hist + user
            pending.append((at, s, k, [sp, sys_len[sp], prompt, out]))
            hist = prompt + out
            at += rng.expovariate(1.0 / p.think_s) + out * 0.02
    pending.sort(key=lambda x: (x[0], x[1], x[2]))
    reqs: list[Request] = []
    for n, (at, s, k, (sp, slen, prompt, out)) in enumerate(pending):
        hids = []
        nblocks = -(-prompt // bt)
        for i in range(nblocks):
            end = min((i + 1) * bt, prompt)
            full = end - i * bt == bt
            if end <= slen:  # inside the shared system prompt
                ident: tuple[Any, ...] = ("sys", sp, i, end)
            else:  # the session's own conversation (append-only)
                ident = ("sess", s, i) if full else ("sess", s, i, end)
            hids.append(block_id(ident))
        reqs.append(Request(f"s{s}t{k}n{n}", at, prompt, out, hids))
    return Workload("synthetic", bt, reqs, {"synthetic": _params_dict(p)})


def _params_dict(p: SyntheticParams) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in p.__dict__.items()}


def full_block_count(req: Request, block_tokens: int) -> int:
    """Blocks of ``req`` that hold a full ``block_tokens`` tokens."""
    return min(len(req.hash_ids), req.input_length // block_tokens)


def block_tokens_of(req: Request, index: int, block_tokens: int) -> int:
    """Prompt tokens in block ``index`` of ``req``."""
    return max(0, min(block_tokens, req.input_length - index * block_tokens))


def tokens_in_prefix(req: Request, nblocks: int, block_tokens: int) -> int:
    """Prompt tokens covered by the first ``nblocks`` blocks."""
    return min(req.input_length, nblocks * block_tokens)


def keys_of(reqs: Sequence[Request]) -> set[bytes]:
    """All distinct keys of some requests."""
    return {k for r in reqs for k in r.keys}
