"""The shared Mooncake trace as token prompts for the real-scheduler engine.

Each ``hash_ids`` entry becomes one 16-token block of tokens derived from the id, so prompts
share prefixes exactly as the trace's requests do (often only a leading part of another
prompt), and each prompt ends with a partial block, as in the trace.
"""

from __future__ import annotations

import json
from pathlib import Path

from real_engine import Job
from vllm_layouts import BLOCK

TRACE = Path(__file__).resolve().parents[4] / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


def trace_jobs(n: int, max_blocks: int, trace: Path = TRACE) -> list[Job]:
    """The first ``n`` trace requests as token prompts (one 16-token block per hash id)."""
    jobs = []
    with open(trace) as f:
        for i, line in enumerate(f):
            if len(jobs) >= n:
                break
            rec = json.loads(line)
            ids = rec["hash_ids"][:max_blocks]
            tokens: list[int] = []
            for h in ids:
                base = (h * 2654435761) % 30000
                tokens.extend((base + k * 7) % 32000 for k in range(BLOCK))
            tokens.extend(range(1, 1 + (i % 9)))  # a partial last block, as in the trace
            jobs.append(Job(tokens, max_tokens=4, arrive_step=i))
    return jobs
