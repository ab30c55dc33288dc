"""The reference replay: a plain prefix-cache LRU over block ids, no engine, no kvtier.

Each request, in arrival order, looks up its blocks in order; the leading run of present blocks
counts as hits; then all its blocks are inserted (refreshing the ones present). This is the model
behind the numbers in the trace's README, and what a CPU-only kvtier run is checked against.
"""

from __future__ import annotations

from collections import OrderedDict

from kvtier.bench.workload import Workload, full_block_count, tokens_in_prefix


def reference_lru(
    workload: Workload, capacity_blocks: int, *, full_blocks_only: bool = False,
    leaf_first: bool = False,
) -> dict[str, float]:
    """Replay ``workload`` through an LRU prefix cache of ``capacity_blocks`` blocks.

    ``full_blocks_only`` drops each request's partial last block (as an engine does);
    ``leaf_first`` inserts a request's blocks deepest first, so that its leaves are evicted
    before its prefix. Rates are over all block references and all prompt tokens.
    """
    if capacity_blocks <= 0:
        raise ValueError("capacity_blocks must be positive")
    bt = workload.block_tokens
    cache: OrderedDict[int, None] = OrderedDict()
    hits = refs = hit_tokens = tokens = 0
    for req in workload.requests:
        ids = req.hash_ids
        refs += len(ids)
        tokens += req.input_length
        if full_blocks_only:
            ids = ids[: full_block_count(req, bt)]
        h = 0
        for k in ids:
            if k not in cache:
                break
            h += 1
        hits += h
        hit_tokens += tokens_in_prefix(req, h, bt)
        for k in reversed(ids) if leaf_first else ids:
            cache[k] = None
            cache.move_to_end(k)
            if len(cache) > capacity_blocks:
                cache.popitem(last=False)
    return _rates(hits, refs, hit_tokens, tokens)


def reference_policy(
    workload: Workload, capacity_blocks: int, policy: str, *, full_blocks_only: bool = False,
) -> dict[str, float]:
    """Replay ``workload`` through a prefix cache ordered by the registered eviction ``policy``,
    driven as the manager drives it: each request's keys are observed, its leading run of
    present blocks counts as hits, all its keys are used, then the missing ones are admitted in
    one batch after evicting room for them. With ``"lru"`` this is :func:`reference_lru`."""
    from kvtier.policies import resolve_policy

    if capacity_blocks <= 0:
        raise ValueError("capacity_blocks must be positive")
    bt = workload.block_tokens
    p = resolve_policy(policy)(capacity_blocks)
    hits = refs = hit_tokens = tokens = 0
    for req in workload.requests:
        refs += len(req.hash_ids)
        tokens += req.input_length
        ids = req.hash_ids[: full_block_count(req, bt)] if full_blocks_only else req.hash_ids
        p.observe(ids, req.req_id)
        h = 0
        for k in ids:
            if k not in p:
                break
            h += 1
        hits += h
        hit_tokens += tokens_in_prefix(req, h, bt)
        p.access_many(ids)
        new = [k for k in dict.fromkeys(ids) if k not in p][-capacity_blocks:]
        over = len(p) + len(new) - capacity_blocks
        if over > 0:
            p.evict_many(over, _always, new)
        p.insert_many(new)
    return _rates(hits, refs, hit_tokens, tokens)


def _rates(hits: int, refs: int, hit_tokens: int, tokens: int) -> dict[str, float]:
    """A reference replay's result: hits and hit rates by block and by token."""
    return {
        "block_hits": hits,
        "block_refs": refs,
        "block_hit_rate": hits / refs if refs else 0.0,
        "token_hits": hit_tokens,
        "input_tokens": tokens,
        "token_hit_rate": hit_tokens / tokens if tokens else 0.0,
    }


def _always(key: object) -> bool:
    return True
