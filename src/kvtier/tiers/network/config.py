"""The network tier's parameters: names, meanings, defaults and value checks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from kvtier.config import ConfigError

MIB = 1 << 20
DEFAULT_BATCH_BYTES = 2 * MIB  # records per round trip; two round trips in flight at most
# I/O threads. More threads contend for one interpreter lock: on 2 cores, 4 threads stored 256 KiB
# blocks about 20% slower than 2 and spent more CPU per GB (docs/BENCHMARKS.md, network section).
DEFAULT_POOL_SIZE = 2

# Parameter name -> meaning (the README's table says the same).
PARAMS: dict[str, str] = {
    "url": "redis://[user:password@]host:port[/db] or rediss:// for TLS (required)",
    "cluster": "True for Redis Cluster (the url names any node)",
    "username": "ACL user name (instead of putting it in the url)",
    "password": "password (instead of putting it in the url)",
    "key_prefix": "prefix of every Redis key (default kvtier:<namespace fingerprint>:)",
    "ttl_seconds": "expire blocks this long after they are stored (default: never)",
    "connect_timeout_seconds": "TCP connect timeout",
    "socket_timeout_seconds": "timeout of one socket read or write of a load or store",
    "lookup_timeout_seconds": "longest wait for the server's answer to a lookup query",
    "pool_size": "I/O threads for loads and stores (each holds one connection per server)",
    "max_batch_bytes": "records per round trip on one connection (at most two in flight)",
    "negative_cache_seconds": "how long a 'not on the server' answer is trusted",
    "presence_cache_keys": "how many known-present keys are remembered",
}


def require_number(params: Mapping[str, Any], key: str, label: str, default: float | None,
                   *, minimum: float = 0.0, optional: bool = False) -> float | None:
    """``params[key]`` (or ``default``) as a finite number above ``minimum``; else ConfigError."""
    value = params.get(key, default)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > minimum \
            or not math.isfinite(value):
        raise ConfigError(f"{label}.{key}", f"a number > {minimum}", value)
    return float(value)


def batch_bytes(configured: int | None, block_bytes: int) -> int:
    """Bytes of records per round trip: ``max_batch_bytes`` when it is set, else
    ``DEFAULT_BATCH_BYTES`` or two blocks, whichever is more. Two records per window keep a
    reply queued behind the one being read when blocks are large: 2 MiB blocks loaded about
    1.2x faster in windows of two than of one (docs/BENCHMARKS.md, network section)."""
    if configured is not None:
        return int(configured)
    return max(DEFAULT_BATCH_BYTES, 2 * block_bytes)


def require_int(params: Mapping[str, Any], key: str, label: str, default: int,
                lo: int, hi: int) -> int:
    """``params[key]`` (or ``default``) as an integer in [lo, hi]; else ConfigError."""
    value = params.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{label}.{key}", f"an integer from {lo} to {hi}", value)
    return int(value)


def redact(url: str) -> str:
    """The url with its password replaced (for messages and logs)."""
    p = urlparse(url)
    if p.password is None:
        return url
    netloc = p.netloc.rsplit("@", 1)[1]
    user = p.username or ""
    return p._replace(netloc=f"{user}:***@{netloc}").geturl()


def validate(out: dict[str, Any], label: str) -> dict[str, Any]:
    """Check the values of already name-checked parameters; the url's password never shows."""
    url = out.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{label}.url", "a redis:// or rediss:// url (required)",
                          url, show_got=isinstance(url, str) or url is None)
    try:
        p = urlparse(url)
        _ = p.port
    except ValueError:
        raise ConfigError(f"{label}.url", "a redis://host:port[/db] url with a valid port",
                          url, show_got="@" not in url) from None
    if p.scheme not in ("redis", "rediss") or not p.hostname:
        raise ConfigError(f"{label}.url", "a redis://host:port[/db] or rediss:// url",
                          redact(url))
    db_text = p.path.lstrip("/")
    if db_text and not db_text.isdigit():
        raise ConfigError(f"{label}.url", "a database number after the host (/0)",
                          redact(url))
    cluster = out.get("cluster", False)
    if not isinstance(cluster, bool):
        raise ConfigError(f"{label}.cluster", "true or false", cluster)
    if cluster and db_text not in ("", "0"):
        raise ConfigError(f"{label}.url", "database 0 (Redis Cluster has only one)",
                          redact(url))
    for key in ("username", "password"):
        v = out.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise ConfigError(f"{label}.{key}", "a non-empty string", v,
                              show_got=key != "password")
    if out.get("password") is not None and p.password is not None:
        raise ConfigError(f"{label}.password", "a password in the url or in 'password', "
                          "not both", show_got=False)
    prefix = out.get("key_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise ConfigError(f"{label}.key_prefix", "a non-empty string", prefix)
    require_number(out, "ttl_seconds", label, None, minimum=0.0, optional=True)
    if out.get("ttl_seconds") is not None and out["ttl_seconds"] < 0.001:
        raise ConfigError(f"{label}.ttl_seconds", "at least 0.001 (a millisecond)",
                          out["ttl_seconds"])
    require_number(out, "connect_timeout_seconds", label, 2.0)
    require_number(out, "socket_timeout_seconds", label, 2.0)
    require_number(out, "lookup_timeout_seconds", label, 1.0)
    require_number(out, "negative_cache_seconds", label, 1.0)
    require_int(out, "pool_size", label, DEFAULT_POOL_SIZE, 1, 64)
    if out.get("max_batch_bytes") is not None:  # unset: batch_bytes() picks it by block size
        require_int(out, "max_batch_bytes", label, DEFAULT_BATCH_BYTES, 64 * 1024, 1 << 31)
    require_int(out, "presence_cache_keys", label, 262144, 1024, 1 << 26)
    return out
