"""The ``network`` tier: blocks in Redis or Valkey (standalone or cluster), shared by instances.

Every block is one Redis string under ``key_prefix + key`` whose value is the self-describing
block record (:mod:`kvtier.format.record`): header, then the payload exactly as in a primary slot.
Any instance with the same namespace and block geometry computes the same prefix and so shares
the blocks; a record is verified on every load (magic, namespace, key, length, checksum) and a
record that fails is a miss, is deleted from the server and is counted.

How the work is spread:

* ``lookup`` answers from a local presence cache (:mod:`.presence`) when it knows every key it
  needs. Otherwise it queues one query for the unknown keys and answers None; a query thread
  sends one ``EXISTS`` per key, all of them in one write per server (one round trip per server
  touched), and the answer is ready by the next step. Negative answers expire after
  ``negative_cache_seconds`` so that blocks another instance stores later are found again.
* Load and store jobs are cut into batches of at most ``max_batch_bytes`` and spread over
  ``pool_size`` I/O threads (:mod:`.io`), each with its own connection per server. A batch is
  one pipelined write per server followed by the replies. Stores build each record in a reusable
  per-thread buffer (one copy out of the slot, needed for the checksummed snapshot) and hand it
  to the socket as a memoryview, without joining it into the command; loads copy each verified
  payload once, from the reply into its slot.
* Failures never raise into the caller: a connection error or timeout fails the batch and marks
  the tier down (lookups answer 0, the manager skips it); the query thread probes the server with
  a growing interval (at most 0.5 s) and the tier serves again as soon as a probe succeeds. An
  out-of-memory reply fails the stores and pauses writes (with the same backoff) while reads go
  on.

All commands go through redis-py (hiredis parses replies, :mod:`.client`); in cluster mode keys
are routed by hash slot with redis-py's slot table, and a ``MOVED`` reply refreshes it.

Modules: :mod:`.config` (parameters), :mod:`.presence` (what the scheduler knows), :mod:`.client`
(redis-py glue), :mod:`.io` (the threads' work), :mod:`.stats` (counters), :mod:`.tier` (the
:class:`NetworkTier` itself).
"""

from kvtier.tiers.network.tier import NetworkTier

__all__ = ["NetworkTier"]
