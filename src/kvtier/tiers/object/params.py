"""The ``object`` tier's parameters: names, meanings, defaults and validation."""

from __future__ import annotations

import math
import os
from typing import Any
from urllib.parse import urlparse

from kvtier.config import ConfigError

# Parameter name -> meaning (the README's table says the same).
PARAMS: dict[str, str] = {
    "bucket": "bucket name (required; the tier never creates it)",
    "prefix": "key prefix of the tier's objects (default kvtier/<namespace fingerprint>/)",
    "endpoint": "http:// or https:// URL of an S3-compatible service (default: AWS S3)",
    "region": "region the requests are signed for (default us-east-1)",
    "access_key_id": "access key id (default: AWS_* environment, then the instance's role)",
    "secret_access_key": "secret access key (with access_key_id)",
    "session_token": "session token of temporary credentials",
    "profile": "named AWS profile from ~/.aws (needs boto3)",
    "addressing": '"path" or "virtual" (bucket in the host name)',
    "ca_file": "PEM file of CA certificates to trust in addition to the system's",
    "sign_payload": "sign each upload's SHA-256 (default: only over http://)",
    "capacity_bytes": "most bytes of objects the tier keeps under its prefix (default: no bound)",
    "ttl_seconds": "objects older than this are misses and are deleted (default: never)",
    "threads": "I/O threads for loads and stores (each keeps one request in flight)",
    "lookup_concurrency": "HEAD requests in flight at once for lookups (on one thread)",
    "timeout_seconds": "longest a GET or PUT may take, retries included",
    "connect_timeout_seconds": "TCP and TLS connect timeout",
    "lookup_timeout_seconds": "longest a HEAD, LIST or probe may take",
    "max_retries": "retries of a failed request (5xx, throttling, connection errors)",
    "negative_cache_seconds": "how long 'not in the bucket' is believed",
    "list_interval_seconds": "how often the prefix is listed to learn other instances' objects (0: never)",
    "presence_cache_keys": "most keys remembered as present (without capacity_bytes)",
}

DEFAULTS: dict[str, Any] = {
    "region": "us-east-1",
    "threads": 8,
    "lookup_concurrency": 64,
    "timeout_seconds": 10.0,
    "connect_timeout_seconds": 2.0,
    "lookup_timeout_seconds": 2.0,
    "max_retries": 2,
    "negative_cache_seconds": 2.0,
    "list_interval_seconds": 60.0,
    "presence_cache_keys": 1 << 20,
}

SECRET = frozenset({"access_key_id", "secret_access_key", "session_token"})


def _number(out: dict[str, Any], key: str, label: str, *, minimum: float, allow_zero: bool = False,
            optional: bool = False) -> None:
    value = out.get(key, None if optional else DEFAULTS[key])
    if value is None and optional:
        return
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > minimum or allow_zero and value == 0))
    if not ok:
        raise ConfigError(f"{label}.{key}", f"a number > {minimum}" + (" or 0" if allow_zero else ""),
                          value)
    out[key] = float(value)  # type: ignore[arg-type]


def _integer(out: dict[str, Any], key: str, label: str, lo: int, hi: int,
             optional: bool = False) -> None:
    value = out.get(key, None if optional else DEFAULTS[key])
    if value is None and optional:
        return
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{label}.{key}", f"an integer from {lo} to {hi}", value)
    out[key] = int(value)


def _string(out: dict[str, Any], key: str, label: str, *, secret: bool = False) -> str | None:
    value = out.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or value != value.strip():
        raise ConfigError(f"{label}.{key}", "a non-empty string without surrounding spaces",
                          value, show_got=not secret)
    return value


def validate(params: dict[str, Any], label: str) -> dict[str, Any]:
    """Check and normalise names already resolved by the base class; raises ConfigError."""
    out = dict(params)
    bucket = out.get("bucket")
    if not isinstance(bucket, str) or not 3 <= len(bucket) <= 255 or "/" in bucket \
            or bucket != bucket.strip():
        raise ConfigError(f"{label}.bucket", "a bucket name of 3 to 255 characters without '/' "
                          "(required)", bucket)
    prefix = out.get("prefix")
    if prefix is not None:
        if not isinstance(prefix, str) or not prefix.strip("/") or prefix.startswith("/"):
            raise ConfigError(f"{label}.prefix", "a non-empty key prefix not starting with '/'",
                              prefix)
        out["prefix"] = prefix if prefix.endswith("/") else prefix + "/"
    endpoint = out.get("endpoint")
    if endpoint is not None:
        if not isinstance(endpoint, str):
            raise ConfigError(f"{label}.endpoint", "an http:// or https:// URL", endpoint)
        try:
            p = urlparse(endpoint)
            _ = p.port
        except ValueError:
            raise ConfigError(f"{label}.endpoint", "an http(s)://host[:port] URL with a valid port",
                              endpoint, show_got="@" not in endpoint) from None
        if "@" in p.netloc:
            raise ConfigError(f"{label}.endpoint", "a URL without credentials in it (use "
                              "access_key_id / secret_access_key)", show_got=False)
        if p.scheme not in ("http", "https") or not p.hostname or p.query or p.fragment \
                or p.path not in ("", "/"):
            raise ConfigError(f"{label}.endpoint", "an http(s)://host[:port] URL (no path or query)",
                              endpoint)
        out["endpoint"] = f"{p.scheme}://{p.netloc}"
    region = _string(out, "region", label)
    out["region"] = region or DEFAULTS["region"]
    key_id = _string(out, "access_key_id", label, secret=True)
    secret = _string(out, "secret_access_key", label, secret=True)
    token = _string(out, "session_token", label, secret=True)
    profile = _string(out, "profile", label)
    if (key_id is None) != (secret is None):
        missing = "secret_access_key" if secret is None else "access_key_id"
        raise ConfigError(f"{label}.{missing}", "access_key_id and secret_access_key together",
                          show_got=False)
    if token is not None and key_id is None:
        raise ConfigError(f"{label}.session_token", "access_key_id and secret_access_key with it",
                          show_got=False)
    if profile is not None and key_id is not None:
        raise ConfigError(f"{label}.profile", "a profile or access keys, not both", profile)
    addressing = out.get("addressing", "path" if endpoint is not None else "virtual")
    if addressing not in ("path", "virtual"):
        raise ConfigError(f"{label}.addressing", "'path' or 'virtual'", addressing)
    out["addressing"] = addressing
    ca = out.get("ca_file")
    if ca is not None:
        if not isinstance(ca, (str, os.PathLike)) or not os.path.isfile(ca) \
                or not os.access(ca, os.R_OK):
            raise ConfigError(f"{label}.ca_file", "a readable PEM file", ca)
        out["ca_file"] = os.fspath(ca)
    sign = out.get("sign_payload", out.get("endpoint", "").startswith("http://")
                   if out.get("endpoint") else False)
    if not isinstance(sign, bool):
        raise ConfigError(f"{label}.sign_payload", "true or false", sign)
    out["sign_payload"] = sign
    _integer(out, "capacity_bytes", label, 1, 1 << 62, optional=True)
    _number(out, "ttl_seconds", label, minimum=0.0, optional=True)
    _integer(out, "threads", label, 1, 256)
    _integer(out, "lookup_concurrency", label, 1, 1024)
    _number(out, "timeout_seconds", label, minimum=0.0)
    _number(out, "connect_timeout_seconds", label, minimum=0.0)
    _number(out, "lookup_timeout_seconds", label, minimum=0.0)
    _integer(out, "max_retries", label, 0, 10)
    _number(out, "negative_cache_seconds", label, minimum=0.0)
    _number(out, "list_interval_seconds", label, minimum=0.0, allow_zero=True)
    _integer(out, "presence_cache_keys", label, 1024, 1 << 27)
    return out
