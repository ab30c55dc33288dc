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
* Load and store jobs are spread over ``pool_size`` I/O threads (:mod:`.io`), each with its own
  connection per server. A thread streams its share in windows of ``max_batch_bytes``, at most
  two in flight per connection. ``GET`` and ``SET`` of records take the bulk path
  (:mod:`.wire`): a store sends the record header and then the primary slot itself (no copy); a
  load verifies the record header before it receives the payload straight into the slot, then
  checks the payload checksum there. A record that fails never counts as loaded.
* Failures never raise into the caller: a connection error or timeout fails the batch and marks
  the tier down (lookups answer 0, the manager skips it); the query thread probes the server with
  a growing interval (at most 0.5 s) and the tier serves again as soon as a probe succeeds. An
  out-of-memory reply fails the stores and pauses writes (with the same backoff) while reads go
  on.

redis-py sets up every connection (TLS, auth, database) and keeps the cluster's slot table
(:mod:`.client`); lookups, deletes and touches go through its own parser. In cluster mode keys are
routed by hash slot; ``MOVED`` refreshes the table and ``ASK`` is followed, once per block.

Modules: :mod:`.config` (parameters), :mod:`.presence` (what the scheduler knows), :mod:`.client`
(redis-py glue), :mod:`.wire` (the bulk GET/SET path), :mod:`.io` (the threads' work),
:mod:`.stats` (counters), :mod:`.tier` (the :class:`NetworkTier` itself); :mod:`.scan` is the
tools' reader of the tier's keys (``kvtier inspect|fsck|gc|du``).
"""

from kvtier.tiers.network.tier import NetworkTier

__all__ = ["NetworkTier"]
