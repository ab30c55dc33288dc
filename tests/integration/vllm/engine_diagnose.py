"""What a real-scheduler engine that did not finish waits for, for a failing test's message."""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any


def diagnose(engine: Any) -> str:
    """The unfinished requests of a ``RealEngine``, their connector jobs and kvtier's lookup
    answers, kvtier's tier jobs and queues, and where kvtier's threads are."""
    lines = []
    cs = engine.connector.connector_scheduler if engine.connector is not None else None
    for r in list(engine.scheduler.requests.values())[:6]:
        lines.append(f"{r.request_id} {r.status.name} computed {r.num_computed_tokens}"
                     f" of {r.num_tokens}")
        st = cs._req_status.get(r.request_id) if cs is not None else None
        if st is None:
            continue
        lines.append(f"  jobs {sorted(st.transfer_jobs)} being loaded "
                     f"{len(cs._chunks_being_loaded or ())}")
        for gi, g in enumerate(st.group_states):
            answers = [engine.manager.lookup(k, st.req_context).name[0] for k in g.offload_keys]
            lines.append(f"  group {gi}: {''.join(answers)}")
    if cs is not None:
        kv = engine.manager.kv
        lines.append(f"connector jobs {len(cs._jobs)}; kvtier promoting {len(kv._promoting)}"
                     f", tier jobs {len(kv._jobs)}, free {len(kv.primary.free)}, evictable "
                     f"{kv.primary.evictable}")
        for job_id, job in kv._jobs.items():
            lines.append(f"  tier job {job_id}: {job.kind} tier {job.tier} {len(job.keys)} keys"
                         f" since step {job.step} (now {kv._step})")
        for tier in kv.tiers:
            q = (len(getattr(tier, "_load_q", ())), len(getattr(tier, "_store_q", ())))
            lines.append(f"  {tier.name}: queues {q} in flight "
                         f"{getattr(tier, '_in_flight', '?')}")
        frames = sys._current_frames()
        for t in threading.enumerate():
            if t.name.startswith("kvtier") and t.ident in frames:
                top = traceback.extract_stack(frames[t.ident])[-3:]
                lines.append(f"  {t.name}: " + " <- ".join(
                    f"{f.name}:{f.lineno}" for f in reversed(top)))
    return "\n".join(lines)
