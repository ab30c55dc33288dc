"""The object tier against a real SeaweedFS S3 server, driven through the kvtier API."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator

import numpy as np
import obstore
import pytest
import xxhash
from helpers import block_bytes_for, load_and_check, lookup_until, make_key, settle, store_blocks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3_servers import (
    ACCESS_KEY,
    BUCKET,
    READER_KEY,
    READER_SECRET,
    SECRET_KEY,
    S3Server,
    ThrottlingProxy,
    make_tls_files,
)

import kvtier
from kvtier.format.record import namespace_fingerprint, pack_header

BLOCK = 64 * 1024  # bytes per offloaded block
SLOTS = 16


def make_manager(server: S3Server, namespace: str, *, slots: int = SLOTS, block: int = BLOCK,
                 **params: object) -> kvtier.TieringManager:
    """A manager with a CPU primary tier of ``slots`` blocks and one object tier."""
    # These tests check what the tier serves and what it costs, not how long a request may wait
    # for it: a generous promotion deadline keeps a loaded machine from turning hits into misses.
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": slots * block, "promotion_deadline_seconds": 60,
         "secondary_tiers": [server.tier_params(**{"threads": 4, **params})]},
        gpu_block_size=16, bytes_per_gpu_block=block, namespace=namespace,
    )
    manager = spec.get_manager()
    assert isinstance(manager, kvtier.TieringManager)
    return manager


def tier_stats(manager: kvtier.OffloadingManager) -> dict:
    """The object tier's counters from get_stats()."""
    return manager.get_stats()["tiers"]["object0"]


def object_path(manager: kvtier.OffloadingManager, key: bytes) -> str:
    """The object name the tier stores ``key`` under."""
    return tier_stats(manager)["prefix"] + key.hex()


def exists(server: S3Server, path: str) -> bool:
    try:
        obstore.head(server.client(), path)
        return True
    except FileNotFoundError:
        return False


def step_until(manager: kvtier.OffloadingManager, cond, timeout: float = 15.0) -> float:
    """Step the manager until ``cond()``; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not reached")
        manager.on_schedule_end()
        time.sleep(0.005)
    return time.monotonic() - t0


def wait_ready(manager: kvtier.OffloadingManager) -> None:
    """Wait for the tier's first probe and listing (an engine starts long before requests)."""
    step_until(manager, lambda: tier_stats(manager)["listings"] >= 1)


@pytest.fixture
def managers() -> Iterator[list[kvtier.OffloadingManager]]:
    """Managers made by a test; shut down at the end even when it fails."""
    made: list[kvtier.OffloadingManager] = []
    yield made
    for m in made:
        m.shutdown()


# -- round trips and sharing ----------------------------------------------------------------
def test_store_evict_load_back_intact(s3_server: S3Server, managers, namespace: str) -> None:
    m = make_manager(s3_server, namespace)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(3 * SLOTS)]
    store_blocks(m, keys)
    settle(m)
    st = tier_stats(m)
    assert st["blocks_written"] == len(keys) and st["store_failures"] == 0
    assert all(exists(s3_server, object_path(m, k)) for k in keys)
    # Most blocks left the CPU tier long ago: they can only come back from the bucket.
    assert load_and_check(m, keys) == len(keys)
    st = tier_stats(m)
    assert st["hits"] >= 2 * SLOTS
    assert st["corrupt"] == 0 and st["load_failures"] == 0
    stored = {k for ev in m.take_events() if ev.medium == "OBJECT" and not ev.removed
              for k in ev.keys}
    assert stored == set(keys)
    assert st["usage_bytes"] >= len(keys) * BLOCK


def test_alias_s3_and_credentials_from_environment(s3_server: S3Server, managers, namespace: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    params = s3_server.tier_params(type="s3", threads=2)
    del params["access_key_id"], params["secret_access_key"]
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": SLOTS * BLOCK, "secondary_tiers": [params]},
        gpu_block_size=16, bytes_per_gpu_block=BLOCK, namespace=namespace)
    m = spec.get_manager()
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(8)]
    store_blocks(m, keys)
    settle(m)
    assert load_and_check(m, keys) == len(keys)
    assert m.get_stats()["tiers"]["s30"]["blocks_written"] == len(keys)


def test_second_instance_finds_what_the_first_stored(s3_server: S3Server, managers,
                                                     namespace: str) -> None:
    first = make_manager(s3_server, namespace)
    managers.append(first)
    keys = [make_key(i, namespace) for i in range(24)]
    store_blocks(first, keys)
    settle(first)
    # Found by a HEAD wave (nothing listed yet) ...
    by_head = make_manager(s3_server, namespace, slots=32, list_interval_seconds=0)
    managers.append(by_head)
    assert lookup_until(by_head, keys) == len(keys)
    assert tier_stats(by_head)["lookup_keys_queried"] >= len(keys)
    # ... or from the listing, without a request per key.
    by_list = make_manager(s3_server, namespace, slots=32)
    managers.append(by_list)
    wait_ready(by_list)
    assert lookup_until(by_list, keys) == len(keys)
    assert tier_stats(by_list)["lookup_keys_queried"] == 0
    assert load_and_check(by_list, keys) == len(keys)


def test_another_namespace_never_sees_them(s3_server: S3Server, managers, namespace: str) -> None:
    a = make_manager(s3_server, namespace + "/a")
    managers.append(a)
    keys = [make_key(i, namespace) for i in range(8)]
    store_blocks(a, keys)
    settle(a)
    b = make_manager(s3_server, namespace + "/b")
    c = make_manager(s3_server, namespace + "/a", block=2 * BLOCK)  # other geometry
    managers.extend([b, c])
    for other in (b, c):
        wait_ready(other)
        assert lookup_until(other, keys) == 0
        assert tier_stats(other)["prefix"] != tier_stats(a)["prefix"]
    # Even under one explicit prefix the record's namespace is checked: a miss, left alone.
    shared = tier_stats(a)["prefix"]
    d = make_manager(s3_server, namespace + "/d", prefix=shared, list_interval_seconds=0)
    managers.append(d)
    assert load_and_check(d, keys[:2]) == 0
    assert tier_stats(d)["foreign"] == 2 and tier_stats(d)["corrupt"] == 0
    assert exists(s3_server, object_path(a, keys[0]))


def test_block_stored_later_by_another_instance_is_found(s3_server: S3Server, managers,
                                                          namespace: str) -> None:
    reader = make_manager(s3_server, namespace, negative_cache_seconds=0.5)
    writer = make_manager(s3_server, namespace)
    managers.extend([reader, writer])
    wait_ready(reader)
    key = make_key(0, namespace)
    assert lookup_until(reader, [key]) == 0  # absent, and now believed absent for 0.5 s
    store_blocks(writer, [key])
    settle(writer)
    step_until(reader, lambda: reader.lookup([key], kvtier.ReqContext("r")) == 1)
    assert load_and_check(reader, [key]) == 1


# -- verification ---------------------------------------------------------------------------
def test_corrupt_truncated_and_deleted_objects_are_misses(s3_server: S3Server, managers,
                                                         namespace: str) -> None:
    m = make_manager(s3_server, namespace)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(8)]
    store_blocks(m, keys)
    settle(m)
    m.take_events()
    store = s3_server.client()
    path = {k: object_path(m, k) for k in keys}
    good = bytes(obstore.get(store, path[keys[0]]).bytes())
    assert len(good) > BLOCK
    flipped = bytearray(good)
    flipped[-100] ^= 0xFF  # a payload byte
    obstore.put(store, path[keys[0]], bytes(flipped))
    header = bytearray(good)
    header[30] ^= 0x01  # inside the header
    obstore.put(store, path[keys[1]], bytes(header))
    obstore.put(store, path[keys[2]], good[: len(good) // 2])  # truncated
    obstore.put(store, path[keys[3]], good)  # a valid record, of another key
    obstore.put(store, path[keys[4]], b"")  # empty
    obstore.delete(store, path[keys[5]])  # deleted behind the tier's back
    m.reset_cache()
    assert load_and_check(m, keys) == 2
    st = tier_stats(m)
    assert st["corrupt"] == 5 and st["evicted_at_load"] == 1
    assert st["load_failures"] == 6
    removed = {k for ev in m.take_events() if ev.medium == "OBJECT" and ev.removed
               for k in ev.keys}
    assert removed == set(keys[:6])
    for key in keys[:6]:
        assert lookup_until(m, [key]) == 0
    for key in keys[:5]:
        assert not exists(s3_server, path[key]), "a corrupt object was left in the bucket"
    for key in keys[6:]:
        assert exists(s3_server, path[key])


def _header(fp: bytes, key: bytes, *, payload_len: int, key_len: int | None = None,
            payload_checksum: int = 0) -> bytes:
    """A record header with a valid header checksum whose fields say whatever they are told."""
    klen = len(key) if key_len is None else key_len
    hlen = 56 + len(key)
    fixed = struct.pack("<4sHHIIQ16sQ", b"KVTR", 1, 0, hlen, klen, payload_len, fp,
                        payload_checksum)
    return fixed + struct.pack("<Q", xxhash.xxh3_64_intdigest(fixed + key[:klen])) + key


def _hostile_objects(key: bytes, fp: bytes, other_fp: bytes) -> dict[str, bytes]:
    payload = block_bytes_for(key, BLOCK).tobytes()
    good = pack_header(fp, key, payload) + payload
    rng = np.random.default_rng(7)
    return {
        "random bytes": rng.integers(0, 256, len(good), dtype=np.uint8).tobytes(),
        "lying length": _header(fp, key, payload_len=1 << 40) + payload,
        "huge key length": _header(fp, key, payload_len=BLOCK, key_len=1 << 30) + payload,
        "another namespace": pack_header(other_fp, key, payload) + payload,
        "oversized": good + rng.integers(0, 256, 4 << 20, dtype=np.uint8).tobytes(),
        "short": good[:-1],
        "empty": b"",
    }


def _load_replaced(m: kvtier.TieringManager, server: S3Server, key: bytes, body: bytes) -> dict:
    """Store ``key`` through the tier, replace its object with ``body``, load it: stat deltas."""
    store_blocks(m, [key])
    settle(m)
    obstore.put(server.client(), object_path(m, key), body)
    m.reset_cache()
    before = tier_stats(m)
    assert lookup_until(m, [key]) == 0  # the tier believed in it; the load rejected it
    after = tier_stats(m)
    return {k: after[k] - before[k] for k in ("hits", "bytes_fetched", "load_failures",
                                                "corrupt", "foreign")}


def test_hostile_objects_are_misses_and_never_read_past_a_record(
        s3_server: S3Server, managers, namespace: str) -> None:
    m = make_manager(s3_server, namespace, list_interval_seconds=0)
    managers.append(m)
    fp = namespace_fingerprint(f"{namespace}\x00block_bytes={BLOCK}")
    key = make_key(0, namespace)
    record_len = 56 + len(key) + BLOCK
    for what, body in _hostile_objects(key, fp, namespace_fingerprint("other")).items():
        d = _load_replaced(m, s3_server, key, body)
        assert d["hits"] == 0, f"{what} was served"
        assert d["bytes_fetched"] <= record_len, what
        assert d["load_failures"] == 1 and d["corrupt"] + d["foreign"] == 1, (what, d)
    assert tier_stats(m)["foreign"] == 1


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_garbage_is_never_served(s3_server: S3Server, managers, namespace: str,
                                           data: st.DataObject) -> None:
    if not managers:
        managers.append(make_manager(s3_server, namespace, list_interval_seconds=0))
    m = managers[0]
    fp = namespace_fingerprint(f"{namespace}\x00block_bytes={BLOCK}")
    key = make_key(0, namespace)
    record_len = 56 + len(key) + BLOCK
    kind = data.draw(st.sampled_from(["bytes", "header", "flip"]))
    if kind == "bytes":
        body = data.draw(st.binary(max_size=4096)) * data.draw(st.integers(1, 40))
    elif kind == "header":
        body = _header(data.draw(st.sampled_from([fp, bytes(16)])), key,
                       payload_len=data.draw(st.integers(0, 1 << 62)),
                       key_len=data.draw(st.integers(0, 1 << 31)),
                       payload_checksum=data.draw(st.integers(0, (1 << 64) - 1)))
        body += data.draw(st.binary(max_size=64)) * data.draw(st.integers(0, 2 * BLOCK // 64))
    else:
        payload = block_bytes_for(key, BLOCK).tobytes()
        good = bytearray(pack_header(fp, key, payload) + payload)
        at = data.draw(st.integers(0, len(good) - 1))
        good[at] ^= data.draw(st.integers(1, 255))
        body = bytes(good)
    d = _load_replaced(m, s3_server, key, body)
    assert d["hits"] == 0 and d["bytes_fetched"] <= record_len


# -- capacity and expiry --------------------------------------------------------------------
def test_capacity_is_kept_by_evicting_the_least_recent(s3_server: S3Server, managers,
                                                       namespace: str) -> None:
    record = 56 + 32 + BLOCK
    m = make_manager(s3_server, namespace, capacity_bytes=10 * record)
    managers.append(m)
    wait_ready(m)
    keys = [make_key(i, namespace) for i in range(30)]
    for i in range(0, len(keys), 5):
        store_blocks(m, keys[i:i + 5])
        settle(m)
        assert tier_stats(m)["usage_bytes"] <= 10 * record
    listed = [o for page in obstore.list(s3_server.client(), tier_stats(m)["prefix"])
              for o in page]
    assert sum(o["size"] for o in listed) <= 10 * record
    names = {o["path"] for o in listed}
    assert {object_path(m, k) for k in keys[-10:]} == names  # the newest ten
    st = tier_stats(m)
    assert st["evictions"] == 20
    removed = {k for ev in m.take_events() if ev.medium == "OBJECT" and ev.removed
               for k in ev.keys}
    assert removed == set(keys[:20])


def test_ttl_turns_old_objects_into_misses(s3_server: S3Server, managers, namespace: str) -> None:
    m = make_manager(s3_server, namespace, ttl_seconds=1.5, list_interval_seconds=0.2)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(4)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()
    assert lookup_until(m, keys) == len(keys)
    m.reset_cache()
    time.sleep(1.6)
    assert lookup_until(m, keys) == 0
    step_until(m, lambda: not any(exists(s3_server, object_path(m, k)) for k in keys))
    assert tier_stats(m)["expired"] >= len(keys)


# -- failures -------------------------------------------------------------------------------
def test_server_killed_and_restarted(own_s3_server: S3Server, managers, namespace: str) -> None:
    server = own_s3_server
    m = make_manager(server, namespace)
    managers.append(m)
    before = [make_key(i, namespace) for i in range(8)]
    store_blocks(m, before[:4])
    settle(m)
    server.kill()
    store_blocks(m, before[4:])  # their uploads fail: counted, no exception
    settle(m)
    m.reset_cache()
    fresh = [make_key(100 + i, namespace) for i in range(4)]
    for _ in range(20):  # lookups keep answering, as misses, and nothing raises
        assert lookup_until(m, before, timeout=10) == 0
        assert lookup_until(m, fresh, timeout=10) == 0
        m.on_schedule_end()
    st = tier_stats(m)
    assert st["available"] is False and st["down_events"] >= 1
    assert m.get_stats()["manager"]["cascade_failures"] + st["store_failures"] >= 4

    server.start()  # same ports and data directory; ready once a signed PUT/GET succeeds
    back = step_until(m, lambda: tier_stats(m)["available"], timeout=10)
    assert back < 2.0, f"the tier took {back:.2f}s to serve again"
    after = [make_key(200 + i, namespace) for i in range(3 * SLOTS)]
    store_blocks(m, after)
    settle(m)
    assert load_and_check(m, after) == len(after)


def test_throttling_is_a_miss_then_backs_off_and_recovers(s3_server: S3Server, managers,
                                                          namespace: str) -> None:
    proxy = ThrottlingProxy(s3_server.port("s3"))
    try:
        m = make_manager(s3_server, namespace, endpoint=proxy.endpoint, max_retries=1)
        managers.append(m)
        keys = [make_key(i, namespace) for i in range(8)]
        store_blocks(m, keys[:4])
        settle(m)
        assert tier_stats(m)["blocks_written"] == 4
        m.reset_cache()
        proxy.throttle(True)
        store_blocks(m, keys[4:])  # 503 SlowDown: counted failures, no exception
        settle(m)
        assert lookup_until(m, keys) == 0
        st = tier_stats(m)
        assert st["throttled"] >= 1 and st["available"] is False
        assert "SlowDown" in st["last_error"]
        refused = proxy.requests_refused
        time.sleep(1.0)
        m.on_schedule_end()
        # Backing off: a probe at a growing interval, not a request per block per step.
        assert proxy.requests_refused - refused <= 2 * 5
        proxy.throttle(False)
        step_until(m, lambda: tier_stats(m)["available"])
        assert load_and_check(m, keys[:4]) == 4
        m.reset_cache()  # the throttled blocks are stored again, as an engine would
        store_blocks(m, keys[4:])
        settle(m)
        m.reset_cache()
        assert load_and_check(m, keys) == len(keys)
    finally:
        for mm in managers:
            mm.shutdown()
        proxy.close()


def _down_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("kvtier") and r.levelno >= logging.WARNING and name in r.getMessage()]


@pytest.mark.parametrize("problem", ["wrong credentials", "missing bucket"])
def test_wrong_credentials_or_missing_bucket_one_clear_line_and_down(
        s3_server: S3Server, managers, namespace: str, caplog: pytest.LogCaptureFixture,
        problem: str) -> None:
    caplog.set_level(logging.INFO)
    secret = "not-the-secret-xyz"
    params: dict[str, object] = (
        {"secret_access_key": secret} if problem == "wrong credentials"
        else {"bucket": "kvtier-no-such-bucket"})
    m = make_manager(s3_server, namespace, **params)
    managers.append(m)
    step_until(m, lambda: not tier_stats(m)["available"])
    keys = [make_key(i, namespace) for i in range(6)]
    store_blocks(m, keys)  # no exception; the cascades are refused
    settle(m)
    m.reset_cache()
    assert lookup_until(m, keys) == 0
    time.sleep(1.5)  # a few probes fail meanwhile, quietly
    m.on_schedule_end()
    lines = _down_lines(caplog, "object0")
    assert len(lines) == 1, lines
    expected = "rejected the credentials" if problem == "wrong credentials" else "does not exist"
    assert expected in lines[0]
    st = tier_stats(m)
    assert st["available"] is False and st["blocks_written"] == 0
    text = caplog.text + repr(m.get_stats())
    assert secret not in text and SECRET_KEY not in text


def test_read_only_credentials_pause_writes_only(s3_server: S3Server, managers, namespace: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    writer = make_manager(s3_server, namespace)
    managers.append(writer)
    keys = [make_key(i, namespace) for i in range(8)]
    store_blocks(writer, keys)
    settle(writer)
    caplog.set_level(logging.INFO)
    reader = make_manager(s3_server, namespace, access_key_id=READER_KEY,
                          secret_access_key=READER_SECRET)
    managers.append(reader)
    wait_ready(reader)
    assert load_and_check(reader, keys) == len(keys)  # reads work
    mine = [make_key(100 + i, namespace) for i in range(4)]
    store_blocks(reader, mine)  # AccessDenied: counted, no exception
    settle(reader)
    st = tier_stats(reader)
    assert st["writes_available"] is False and st["available"] is True
    assert st["store_failures"] >= 1 and st["blocks_written"] == 0
    lines = _down_lines(caplog, "object0")
    assert len(lines) == 1 and "writes refused" in lines[0] and "denied access" in lines[0]
    assert not exists(s3_server, object_path(reader, mine[0]))


def test_credentials_from_a_named_profile(s3_server: S3Server, managers, namespace: str,
                                          tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "credentials").write_text(
        f"[kvtier-test]\naws_access_key_id = {ACCESS_KEY}\n"
        f"aws_secret_access_key = {SECRET_KEY}\n")
    (tmp_path / "config").write_text("[profile kvtier-test]\nregion = us-east-1\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    params = s3_server.tier_params(threads=2, profile="kvtier-test")
    del params["access_key_id"], params["secret_access_key"]
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": SLOTS * BLOCK, "secondary_tiers": [params]},
        gpu_block_size=16, bytes_per_gpu_block=BLOCK, namespace=namespace)
    m = spec.get_manager()
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(2 * SLOTS)]
    store_blocks(m, keys)
    settle(m)
    assert load_and_check(m, keys) == len(keys)
    assert tier_stats(m)["blocks_written"] == len(keys)


def test_tls_with_a_custom_ca(tmp_path, managers, namespace: str) -> None:
    server = S3Server(tmp_path / "tls", tls=make_tls_files(tmp_path / "certs"))
    server.start()
    try:
        assert server.endpoint.startswith("https://")
        m = make_manager(server, namespace)
        managers.append(m)
        keys = [make_key(i, namespace) for i in range(2 * SLOTS)]
        store_blocks(m, keys)
        settle(m)
        assert load_and_check(m, keys) == len(keys)
        untrusted = server.tier_params(threads=2)
        del untrusted["ca_file"]
        spec = kvtier.TieringOffloadingSpec(
            {"cpu_bytes_to_use": SLOTS * BLOCK, "secondary_tiers": [untrusted]},
            gpu_block_size=16, bytes_per_gpu_block=BLOCK, namespace=namespace)
        plain = spec.get_manager()
        managers.append(plain)  # the server's certificate is not trusted: down, no exception
        step_until(plain, lambda: not tier_stats(plain)["available"])
        assert lookup_until(plain, keys) == 0
    finally:
        for mm in managers:
            mm.shutdown()
        server.stop()


def test_unreachable_endpoint_is_a_miss_not_an_error(s3_server: S3Server, managers,
                                                     namespace: str) -> None:
    m = make_manager(s3_server, namespace, endpoint="http://127.0.0.1:9", connect_timeout_seconds=0.5)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(4)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()
    assert lookup_until(m, keys) == 0
    step_until(m, lambda: not tier_stats(m)["available"])


# -- lookups ---------------------------------------------------------------------------------
def test_lookups_cost_few_requests(s3_server: S3Server, managers, namespace: str) -> None:
    block = 4096
    n = 1000
    keys = [make_key(i, namespace) for i in range(n)]
    writer = make_manager(s3_server, namespace, slots=64, block=block, threads=8)
    managers.append(writer)
    store_blocks(writer, keys)
    settle(writer)
    # Unknown keys: one wave of 16 HEADs says the run ends at the first.
    unknown = [make_key(i, namespace + "/none") for i in range(n)]
    reader = make_manager(s3_server, namespace, slots=n + 24, block=block, threads=8,
                          list_interval_seconds=0)
    managers.append(reader)
    assert lookup_until(reader, unknown) == 0
    settle(reader)
    assert tier_stats(reader)["lookup_keys_queried"] == 16
    assert tier_stats(reader)["requests_head"] == 16
    # Known to another instance, not listed: growing waves of HEADs, one per key, none twice.
    assert lookup_until(reader, keys) == n
    assert tier_stats(reader)["requests_head"] == 16 + n
    # Listed: no request per key at all.
    listed = make_manager(s3_server, namespace, slots=n + 24, block=block)
    managers.append(listed)
    wait_ready(listed)
    assert tier_stats(listed)["listed_objects"] == n
    assert lookup_until(listed, keys) == n
    assert tier_stats(listed)["requests_head"] == 0
    region = listed.primary_blocks()
    ctx = kvtier.ReqContext("check")
    spec = listed.prepare_load(keys[:5], ctx)
    for key, slot in zip(keys[:5], spec.block_ids):
        assert np.array_equal(region[slot], block_bytes_for(key, block))
    listed.complete_load(keys[:5], ctx)


# -- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"bogus": 1}, "secondary_tiers[0].bogus"),
        ({"bucket": None}, "secondary_tiers[0].bucket"),
        ({"bucket": "a/b"}, "secondary_tiers[0].bucket"),
        ({"endpoint": "ftp://127.0.0.1:1"}, "secondary_tiers[0].endpoint"),
        ({"endpoint": "http://127.0.0.1:99999"}, "secondary_tiers[0].endpoint"),
        ({"endpoint": "http://127.0.0.1:1/path"}, "secondary_tiers[0].endpoint"),
        ({"addressing": "dns"}, "secondary_tiers[0].addressing"),
        ({"secret_access_key": None}, "secondary_tiers[0].secret_access_key"),
        ({"capacity_bytes": 0}, "secondary_tiers[0].capacity_bytes"),
        ({"ttl_seconds": -1}, "secondary_tiers[0].ttl_seconds"),
        ({"threads": 0}, "secondary_tiers[0].threads"),
        ({"threads": True}, "secondary_tiers[0].threads"),
        ({"max_retries": 11}, "secondary_tiers[0].max_retries"),
        ({"timeout_seconds": 0}, "secondary_tiers[0].timeout_seconds"),
        ({"negative_cache_seconds": float("nan")}, "secondary_tiers[0].negative_cache_seconds"),
        ({"ca_file": "/nonexistent/ca.pem"}, "secondary_tiers[0].ca_file"),
        ({"sign_payload": "yes"}, "secondary_tiers[0].sign_payload"),
        ({"prefix": "/abs"}, "secondary_tiers[0].prefix"),
    ],
)
def test_config_errors_name_the_key(params: dict, where: str) -> None:
    tier: dict[str, object] = {"type": "object", "bucket": BUCKET, "endpoint": "http://127.0.0.1:1",
                               "access_key_id": "id", "secret_access_key": "sec", **params}
    for k in [k for k, v in tier.items() if v is None]:
        del tier[k]
    with pytest.raises(kvtier.ConfigError) as e:
        kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20, "secondary_tiers": [tier]})
    assert where in str(e.value)


def test_capacity_below_one_record_is_a_config_error(s3_server: S3Server) -> None:
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": SLOTS * BLOCK,
         "secondary_tiers": [s3_server.tier_params(capacity_bytes=BLOCK)]},
        gpu_block_size=16, bytes_per_gpu_block=BLOCK, namespace="tiny")
    with pytest.raises(kvtier.ConfigError) as e:
        spec.get_manager()
    assert "object0.capacity_bytes" in str(e.value)


def test_config_errors_never_show_credentials() -> None:
    for tier in (
        {"type": "object", "bucket": BUCKET, "endpoint": "http://id:s3cret@127.0.0.1:1"},
        {"type": "object", "bucket": BUCKET, "access_key_id": "id", "secret_access_key": " s3cret"},
        {"type": "object", "bucket": BUCKET, "access_key_id": "s3cret"},
        {"type": "object", "bucket": BUCKET, "session_token": "s3cret"},
    ):
        with pytest.raises(kvtier.ConfigError) as e:
            kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20, "secondary_tiers": [tier]})
        assert "s3cret" not in str(e.value)


def test_missing_client_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.tiers.object import tier as tier_module

    monkeypatch.setattr(tier_module, "client_available", lambda: False)  # as without the extra
    with pytest.raises(kvtier.ConfigError) as e:
        kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20, "secondary_tiers": [
            {"type": "object", "bucket": BUCKET}]})
    assert "kvtier[object]" in str(e.value) and "secondary_tiers[0]" in str(e.value)
