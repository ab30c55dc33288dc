"""What a TARGET names (a storage tier's path, one of its namespace directories, a Redis URL, or
/dev/shm) and which namespaces ``--namespace`` selects."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

from kvtier.format.record import namespace_fingerprint, namespace_key
from kvtier.memory.scan import SHM_DIR
from kvtier.ops.units import UsageError
from kvtier.tiers.storage.scan import looks_like_lane


@dataclass(frozen=True)
class Target:
    """A resolved TARGET."""

    kind: str  # "storage", "redis" or "shm"
    text: str
    path: str | None = None  # storage: the tier root; shm: the directory
    lane: str | None = None  # storage: the one lane directory named, if TARGET was one
    url: str | None = None


def redact(url: str) -> str:
    """A URL with its password hidden."""
    p = urlparse(url)
    if p.password is None:
        return url
    host = p.netloc.rsplit("@", 1)[1]
    return p._replace(netloc=f"{p.username or ''}:***@{host}").geturl()


def resolve_target(text: str) -> Target:
    """Resolve TARGET; raises UsageError with a one-line reason."""
    if not text:
        raise UsageError("TARGET: expected a storage tier's path or a redis:// URL")
    low = text.lower()
    if low.startswith(("redis://", "rediss://")):
        try:
            p = urlparse(text)
            _ = p.port
        except ValueError:
            raise UsageError(f"{redact(text)}: not a valid URL (bad port?)") from None
        if not p.hostname:
            raise UsageError(f"{redact(text)}: no host in the URL (redis://host:port)")
        return Target("redis", text, url=text)
    if "://" in text:
        raise UsageError(f"{redact(text)}: unsupported URL scheme (use redis:// or rediss://, "
                         "or a storage tier's path)")
    path = os.path.abspath(text)
    if not os.path.exists(path):
        raise UsageError(f"{text}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(f"{text}: not a directory (give a storage tier's path)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"{text}: permission denied")
    if os.path.realpath(path) == os.path.realpath(SHM_DIR):
        return Target("shm", text, path=path)
    if looks_like_lane(path):
        return Target("storage", text, path=os.path.dirname(path), lane=os.path.basename(path))
    return Target("storage", text, path=path)


@dataclass
class Selection:
    """The namespaces ``--namespace`` names: a directory name (``<fingerprint>.1``), a
    fingerprint or a unique start of one (6+ hex digits), or a namespace string as engines pass
    it (matched against NAMESPACE files, and against fingerprints for every block size seen)."""

    values: list[str] = field(default_factory=list)
    _hits: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.values)

    def matches(self, *, id: str, fingerprint: str, namespace: str | None = None,
                block_bytes: int | None = None) -> bool:
        """True when no selection was given or one of its values names this namespace."""
        if not self.values:
            return True
        hit = False
        for v in self.values:
            if (
                v in (id, fingerprint)
                or len(v) >= 6 and fingerprint.startswith(v.lower())
                or namespace is not None and v == namespace
                or block_bytes is not None
                and namespace_fingerprint(namespace_key(v, block_bytes)).hex() == fingerprint
            ):
                self._hits.add(v)
                hit = True
        return hit

    def namespace_for(self, fingerprint: str, block_bytes: int | None) -> str | None:
        """The namespace string among the values whose fingerprint (at ``block_bytes``) is this."""
        if block_bytes is None:
            return None
        for v in self.values:
            if namespace_fingerprint(namespace_key(v, block_bytes)).hex() == fingerprint:
                return v
        return None

    def check_all_matched(self, found: list[str]) -> None:
        """Raise UsageError for a value that named no namespace."""
        for v in self.values:
            if v not in self._hits:
                seen = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "")
                raise UsageError(f"--namespace {v}: no such namespace here"
                                 + (f" (found: {seen})" if found else " (none found)"))
