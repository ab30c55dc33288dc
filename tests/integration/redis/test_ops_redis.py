"""``kvtier inspect|fsck|gc|du`` against real Redis servers: standalone and a 3-node cluster,
holding blocks written by real managers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import load_and_check, make_key, settle, store_blocks
from redis_servers import free_port, start_server

import kvtier
from kvtier.cli import main
from kvtier.format.record import namespace_fingerprint, namespace_key
from kvtier.tiers.network.scan import Node, delete_if_unchanged, value_digest

pytestmark = pytest.mark.redis

BB = 64 << 10


def manager(url: str, ns: str, cluster: bool) -> kvtier.TieringManager:
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": 16 * BB,
         "secondary_tiers": [{"type": "network", "url": url, "cluster": cluster}]},
        gpu_block_size=16, bytes_per_gpu_block=BB, namespace=ns)
    m = spec.get_manager()
    assert isinstance(m, kvtier.TieringManager)
    return m


def prefix(ns: str) -> bytes:
    return b"kvtier:" + namespace_fingerprint(namespace_key(ns, BB)).hex().encode() + b":"


def kv(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if "--json" in args and out.strip() else out), err


def stored(url: str, ns: str, n: int, cluster: bool) -> tuple[list[bytes], dict]:
    """Store ``n`` blocks of ``ns`` through a manager; (keys, the tier's stats)."""
    m = manager(url, ns, cluster)
    try:
        keys = [make_key(i, ns) for i in range(n)]
        store_blocks(m, keys)
        settle(m)
        return keys, m.get_stats()["tiers"]["network0"]
    finally:
        m.shutdown()


@pytest.fixture(params=["standalone", "cluster"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, bool, redis.Redis]]:
    """(url, cluster?, a client that routes keys) for the session's server or cluster."""
    if request.param == "standalone":
        srv = request.getfixturevalue("redis_server")
        client = srv.client()
        yield srv.url, False, client
    else:
        nodes = request.getfixturevalue("redis_cluster")
        client = redis.RedisCluster.from_url(nodes.url)
        yield nodes.url, True, client
    client.close()


def test_inspect_and_du_agree_with_what_a_workload_stored(server, namespace: str,
                                                          capsys) -> None:
    url, cluster, _client = server
    _keys, st = stored(url, namespace, 24, cluster)
    rc, du, _ = kv(capsys, "du", url, "--json", "--namespace", namespace)
    assert rc == 0 and du["target"]["cluster"] is cluster
    assert len(du["target"]["nodes"]) == (3 if cluster else 1)
    (n,) = du["namespaces"]
    assert n["id"] == prefix(namespace).decode()
    assert n["blocks"] == st["blocks_written"] == 24
    assert n["data_bytes"] == st["bytes_written"]
    assert n["bytes"] >= n["data_bytes"]  # server memory: values plus the server's overhead
    rc, ins, _ = kv(capsys, "inspect", url, "--json", "--namespace", namespace)
    assert rc == 0
    (a,) = ins["namespaces"]
    assert a["namespace"] == namespace and a["block_bytes"] == BB
    assert a["blocks"] == 24 and a["bytes"] == n["bytes"]
    assert sum(b["blocks"] for b in a["age"]["buckets"]) == 24
    assert a["age"]["buckets"][0]["blocks"] == 24  # all idle for less than a minute
    assert {s["node"] for s in ins["medium"]["servers"]} == set(du["target"]["nodes"])
    rc, text, _ = kv(capsys, "inspect", url, "--namespace", namespace)
    assert rc == 0 and namespace in text


def test_fsck_finds_exactly_what_was_corrupted_and_repair_makes_the_tier_serve(
        server, namespace: str, capsys) -> None:
    url, cluster, client = server
    ns1, ns2 = namespace + "/1", namespace + "/2"
    keys, _ = stored(url, ns1, 16, cluster)
    keys2, _ = stored(url, ns2, 4, cluster)
    p1, p2 = prefix(ns1), prefix(ns2)
    before2 = {k: client.get(p2 + k) for k in keys2}
    flipped, header, sa, sb, cut, foreign, wrongtype = keys[:7]
    expected = {}
    v = client.get(p1 + flipped)
    client.setrange(p1 + flipped, 200, bytes([v[200] ^ 0x04]))
    expected[flipped] = "payload checksum mismatch"
    v = client.get(p1 + header)
    client.setrange(p1 + header, 60, bytes([v[60] ^ 0x01]))
    expected[header] = "header checksum mismatch"
    va, vb = client.get(p1 + sa), client.get(p1 + sb)
    client.set(p1 + sa, vb)
    client.set(p1 + sb, va)
    expected[sa] = expected[sb] = "key mismatch"
    v = client.get(p1 + cut)
    client.set(p1 + cut, v[: len(v) // 2])
    expected[cut] = "truncated record"
    client.set(p1 + foreign, client.get(p2 + keys2[0]))
    expected[foreign] = "namespace mismatch"
    client.delete(p1 + wrongtype)
    client.hset(p1 + wrongtype, "f", "v")
    expected[wrongtype] = "not a string value"

    args = ["--json", "--namespace", ns1, "--namespace", ns2]
    rc, r, err = kv(capsys, "fsck", url, *args)
    assert rc == 1, err
    assert r["records_checked"] == 20 and r["records_bad"] == len(expected) == 7
    found = {bytes.fromhex(b["key"]): b for b in r["bad"]}
    assert set(found) == set(expected)
    for k, reason in expected.items():
        assert found[k]["reason"].startswith(reason), found[k]
        assert found[k]["namespace"] == p1.decode()
    assert found[sa]["header_key"] == sb.hex() and found[sb]["header_key"] == sa.hex()
    assert client.exists(p1 + flipped)  # read-only without --repair

    rc, r, _ = kv(capsys, "fsck", url, *args, "--repair")
    assert rc == 1 and r["repaired"] == 7
    rc, r, _ = kv(capsys, "fsck", url, *args)
    assert rc == 0 and r["records_checked"] == 13 and r["records_bad"] == 0
    assert {k: client.get(p2 + k) for k in keys2} == before2
    m = manager(url, ns1, cluster)
    try:
        intact = [k for k in keys if k not in expected]
        assert load_and_check(m, intact) == len(intact) == 9
        assert load_and_check(m, sorted(expected)) == 0
        assert m.get_stats()["tiers"]["network0"]["corrupt"] == 0
    finally:
        m.shutdown()


def test_a_damaged_value_never_decides_a_namespace_block_size(redis_server, namespace: str,
                                                              capsys) -> None:
    """Whichever key SCAN meets first, a truncated or non-string value there must not hide the
    namespace from ``--namespace``: each key is damaged in turn, so one round damages the first."""
    url = redis_server.url
    client = redis_server.client()
    try:
        keys, _ = stored(url, namespace, 4, False)
        p = prefix(namespace)
        for bad in keys:
            good = client.get(p + bad)
            client.set(p + bad, good[: len(good) // 2])
            rc, r, err = kv(capsys, "fsck", url, "--json", "--namespace", namespace)
            assert rc == 1, err
            assert r["records_checked"] == 4 and r["records_bad"] == 1
            assert r["bad"][0]["key"] == bad.hex()
            rc, r, err = kv(capsys, "du", url, "--json", "--namespace", namespace)
            assert rc == 0, err
            assert r["namespaces"][0]["namespace"] == namespace
            client.delete(p + bad)
            client.hset(p + bad, "f", "v")
            rc, r, err = kv(capsys, "fsck", url, "--json", "--namespace", namespace)
            assert rc == 1 and r["records_bad"] == 1, err
            client.delete(p + bad)
            client.set(p + bad, good)
    finally:
        client.close()


def test_gc_drop_leaves_the_other_namespace_byte_for_byte(server, namespace: str,
                                                          capsys) -> None:
    url, cluster, client = server
    ns1, ns2 = namespace + "/1", namespace + "/2"
    keys1, _ = stored(url, ns1, 12, cluster)
    keys2, _ = stored(url, ns2, 8, cluster)
    before2 = {k: client.get(prefix(ns2) + k) for k in keys2}
    rc, du_before, _ = kv(capsys, "du", url, "--json", "--namespace", ns2)
    rc, r, _ = kv(capsys, "gc", url, "--json", "--namespace", ns1, "--drop", "--dry-run")
    assert rc == 0 and r["removed_blocks"] == 12 and client.exists(prefix(ns1) + keys1[0])
    rc, r, _ = kv(capsys, "gc", url, "--json", "--namespace", ns1, "--drop")
    assert rc == 0 and r["removed_blocks"] == 12 and r["freed_bytes"] > 12 * BB
    assert sum(client.exists(prefix(ns1) + k) for k in keys1) == 0
    assert {k: client.get(prefix(ns2) + k) for k in keys2} == before2
    rc, du_after, _ = kv(capsys, "du", url, "--json", "--namespace", ns2)
    assert du_after["namespaces"] == du_before["namespaces"]
    rc, _r, err = kv(capsys, "du", url, "--json", "--namespace", ns1)
    assert rc == 2 and "no such namespace" in err


def test_gc_by_idle_time_and_size_removes_the_least_recently_used(redis_server, namespace: str,
                                                                  capsys) -> None:
    url = redis_server.url
    m = manager(url, namespace, False)
    try:
        old = [make_key(i, namespace) for i in range(12)]
        new = [make_key(i, namespace) for i in range(12, 18)]
        store_blocks(m, old)
        settle(m)
        time.sleep(2.2)  # the server's LRU clock counts whole seconds
        store_blocks(m, new)
        settle(m)
    finally:
        m.shutdown()
    client = redis_server.client()
    # (a fingerprint names the namespace: gc reads no value, so no block counts as accessed)
    ns = prefix(namespace).decode()
    rc, r, _ = kv(capsys, "gc", url, "--json", "--namespace", ns, "--shrink-to", "0", "--dry-run")
    assert rc == 0 and r["removed_blocks"] == 18
    per_key = r["freed_bytes"] // 18
    # by size: room for the 6 new blocks and a half; the 12 idle ones go first
    size = str(6 * per_key + per_key // 2)
    rc, r, _ = kv(capsys, "gc", url, "--json", "--namespace", ns, "--shrink-to", size, "--dry-run")
    assert rc == 0 and r["removed_blocks"] == 12
    assert all(client.exists(prefix(namespace) + k) for k in old)
    # by idle time
    rc, r, _ = kv(capsys, "gc", url, "--json", "--namespace", ns, "--older-than", "2s")
    assert rc == 0 and r["removed_blocks"] == 12
    assert [client.exists(prefix(namespace) + k) for k in old] == [0] * 12
    assert [client.exists(prefix(namespace) + k) for k in new] == [1] * 6
    client.close()


def test_repair_never_deletes_a_value_rewritten_after_it_was_checked(redis_server,
                                                                     namespace: str) -> None:
    client = redis_server.client()
    rk = prefix(namespace) + b"k" * 32
    client.set(rk, b"bad record bytes")
    checked = value_digest(client.get(rk))
    client.set(rk, b"a record an engine wrote meanwhile")
    node = Node("n", client)
    assert delete_if_unchanged(node, rk, checked) is False
    assert client.get(rk) == b"a record an engine wrote meanwhile"
    assert delete_if_unchanged(node, rk, value_digest(client.get(rk))) is True
    assert not client.exists(rk)
    client.close()


def test_wrong_password_and_unreachable_server_are_one_line(tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    srv = start_server(tmp_path / "auth", extra=["--requirepass", "s3cret"])
    try:
        host = f"127.0.0.1:{srv.port}"
        for url in (f"redis://:wrong@{host}/0", f"redis://{host}/0"):
            for cmd in ("inspect", "fsck", "du"):
                rc, _out, err = kv(capsys, cmd, url, "--json")
                assert rc == 2 and "authentication failed" in err, err
                assert len(err.strip().splitlines()) == 1 and ":wrong@" not in err
        rc, r, _ = kv(capsys, "du", f"redis://:s3cret@{host}/0", "--json")
        assert rc == 0 and "s3cret" not in json.dumps(r)
        monkeypatch.setenv("REDISCLI_AUTH", "s3cret")
        rc, r, _ = kv(capsys, "du", f"redis://{host}/0", "--json")
        assert rc == 0
    finally:
        srv.stop()
    rc, _out, err = kv(capsys, "inspect", f"redis://127.0.0.1:{free_port()}/0", "--timeout", "1")
    assert rc == 2 and "cannot reach the server" in err and len(err.strip().splitlines()) == 1
