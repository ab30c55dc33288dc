"""The S3 client the ``object`` tier drives, and how its errors are read.

The tier talks to the service through obstore (Rust ``object_store`` under a thin Python layer):
its calls release the GIL while they wait, accept any buffer (a memoryview of a primary slot) as
an upload body without copying it, and hand downloads back as a buffer that is copied once, into
the slot. This module is the only one that imports obstore; the tier sees plain values and
:class:`S3Failure`.
"""

from __future__ import annotations

import enum
import importlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

obstore: Any
S3Store: Any
try:
    obstore = importlib.import_module("obstore")
    S3Store = importlib.import_module("obstore.store").S3Store
except ImportError:  # the optional extra is not installed: validate_params says what to do
    obstore = None
    S3Store = None

INSTALL_HINT = "pip install 'kvtier[object]' (obstore; Python >= 3.11)"


def client_available() -> bool:
    """True when obstore can be imported."""
    return obstore is not None


class Kind(enum.Enum):
    """What a failed request means to the tier."""

    NOT_FOUND = "not found"  # no such key: a miss, not a failure
    NO_BUCKET = "no bucket"  # the bucket does not exist
    AUTH = "credentials rejected"  # wrong key id or secret, expired token, clock skew
    DENIED = "access denied"  # valid credentials without the needed permission
    RANGE = "range not satisfiable"  # the object is empty: not a record
    THROTTLED = "throttled"  # 503 SlowDown / 429 after the client's own retries
    FAILED = "failed"  # connection refused, timeout, 5xx, anything else


@dataclass(frozen=True)
class S3Failure(Exception):
    """A classified request failure; ``reason`` is short and never holds credentials."""

    kind: Kind
    reason: str

    def __str__(self) -> str:
        return self.reason


_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_AUTH_CODES = frozenset({
    "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken",
    "RequestTimeTooSkewed", "TokenRefreshRequired", "InvalidSecurity", "AuthorizationHeaderMalformed",
})


_OS_MESSAGE = re.compile(r'message: "([^"]+)"')
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_TLS = re.compile(r"InvalidCertificate\(\s*(\w+)")


def _short(text: str, limit: int = 160) -> str:
    """The cause of a transport error in a few words (obstore's own text is a long dump)."""
    kind = _HTTP_KIND.search(text)
    os_msg = _OS_MESSAGE.findall(text)
    tls = _TLS.search(text)
    parts = []
    if kind:
        parts.append(f"{kind.group(1).lower()} error")
    if os_msg:
        parts.append(os_msg[-1])
    elif tls:
        parts.append(f"server certificate not trusted ({tls.group(1)}); see ca_file")
    if parts:
        out = ": ".join(parts)
    else:
        out = text.strip().splitlines()[0] if text.strip() else type(text).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


def classify(exc: BaseException) -> S3Failure:
    """Turn an obstore (or OS) exception into an :class:`S3Failure`."""
    if isinstance(exc, S3Failure):
        return exc
    text = str(exc)
    m = _STATUS.search(text)
    status = int(m.group(1)) if m else None
    c = _CODE.search(text)
    code = c.group(1) if c else None
    what = f"HTTP {status}" + (f" {code}" if code else "") if status else _short(text)
    if code == "NoSuchBucket":
        return S3Failure(Kind.NO_BUCKET, what)
    if isinstance(exc, FileNotFoundError) or status == 404:
        return S3Failure(Kind.NOT_FOUND, what)
    if status == 416 or code == "InvalidRange":
        return S3Failure(Kind.RANGE, what)
    if code in _AUTH_CODES or status == 401:
        return S3Failure(Kind.AUTH, what)
    if status == 403 or type(exc).__name__ in ("PermissionDeniedError", "UnauthenticatedError"):
        # A body-less 403 (HEAD) cannot say which: treat it as rejected credentials.
        return S3Failure(Kind.AUTH if code is None else Kind.DENIED, what)
    if status in (429, 503) or code in ("SlowDown", "Throttling", "RequestLimitExceeded"):
        return S3Failure(Kind.THROTTLED, what)
    return S3Failure(Kind.FAILED, what)


@dataclass(frozen=True)
class ClientSettings:
    """Everything needed to build the client (credentials stay in here, never in logs)."""

    bucket: str
    endpoint: str | None
    region: str
    addressing: str
    access_key_id: str | None
    secret_access_key: str | None
    session_token: str | None
    profile: str | None
    ca_file: str | None
    sign_payload: bool
    timeout_seconds: float
    connect_timeout_seconds: float
    lookup_timeout_seconds: float
    max_retries: int
    threads: int

    def __repr__(self) -> str:  # never show the secret
        return f"ClientSettings(bucket={self.bucket!r}, endpoint={self.endpoint!r})"


def _credential_provider(profile: str | None) -> Any:
    """A botocore-chain provider for a named profile (needs boto3), else None."""
    if profile is None:
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError as e:
        raise S3Failure(Kind.AUTH, f"profile {profile!r} needs boto3 installed ({e})") from None
    return Boto3CredentialProvider(boto3.Session(profile_name=profile))


class S3Client:
    """Two obstore stores on one bucket: one for transfers, one for small metadata requests.

    They differ in timeouts and retries: a lookup must not wait behind the patience a 2 MiB
    upload deserves, and a probe of a server that is down must answer at once.
    """

    def __init__(self, s: ClientSettings) -> None:
        if obstore is None:
            raise S3Failure(Kind.FAILED, f"obstore is not installed: {INSTALL_HINT}")
        config: dict[str, Any] = {
            "region": s.region,
            "virtual_hosted_style_request": s.addressing == "virtual",
            "unsigned_payload": not s.sign_payload,
        }
        if s.endpoint is not None:
            config["endpoint"] = s.endpoint
        if s.access_key_id is not None and s.secret_access_key is not None:
            config["access_key_id"] = s.access_key_id
            config["secret_access_key"] = s.secret_access_key
            if s.session_token is not None:
                config["session_token"] = s.session_token
        provider = _credential_provider(s.profile) if s.access_key_id is None else None
        opts: dict[str, Any] = {
            "connect_timeout": timedelta(seconds=s.connect_timeout_seconds),
            "pool_max_idle_per_host": str(max(8, 2 * s.threads)),
        }
        if s.endpoint is not None and s.endpoint.startswith("http://"):
            opts["allow_http"] = True
        if s.ca_file is not None:
            with open(s.ca_file, "rb") as f:
                opts["root_certificate"] = f.read()

        def build(timeout: float, retries: int) -> Any:
            retry = {
                "max_retries": retries,
                "retry_timeout": timedelta(seconds=timeout),
                "backoff": {"init_backoff": timedelta(milliseconds=50),
                            "max_backoff": timedelta(seconds=1), "base": 2},
            }
            kw: dict[str, Any] = {}
            if provider is not None:
                kw["credential_provider"] = provider
            return S3Store(s.bucket, config=config, client_options={**opts, "timeout": timedelta(
                seconds=timeout)}, retry_config=retry, **kw)

        self.data = build(s.timeout_seconds, s.max_retries)
        self.meta = build(s.lookup_timeout_seconds, min(1, s.max_retries))

    # Every method raises S3Failure (classified) on failure.
    def get_record(self, path: str, length: int) -> tuple[Any, int, float]:
        """At most ``length`` bytes from the start of the object: (buffer, object size, mtime)."""
        try:
            res = obstore.get(self.data, path, options={"range": (0, length)})
            meta = res.meta
            buf = res.bytes()
        except Exception as e:
            raise classify(e) from None
        return buf, int(meta["size"]), meta["last_modified"].timestamp()

    def put(self, path: str, parts: Sequence[Any]) -> None:
        """One PUT whose body is ``parts`` (buffers) in order, without joining them first."""
        try:
            obstore.put(self.data, path, list(parts), use_multipart=False)
        except Exception as e:
            raise classify(e) from None

    def head(self, path: str) -> tuple[int, float] | None:
        """(size, mtime) of the object, or None when there is none."""
        try:
            meta = obstore.head(self.meta, path)
        except Exception as e:
            f = classify(e)
            if f.kind is Kind.NOT_FOUND:
                return None
            raise f from None
        return int(meta["size"]), meta["last_modified"].timestamp()

    async def head_async(self, path: str) -> tuple[int, float] | None:
        """:meth:`head` on the caller's asyncio loop (many in flight on one thread)."""
        try:
            meta = await obstore.head_async(self.meta, path)
        except Exception as e:
            f = classify(e)
            if f.kind is Kind.NOT_FOUND:
                return None
            raise f from None
        return int(meta["size"]), meta["last_modified"].timestamp()

    def probe(self, path: str) -> None:
        """One GET of a key that need not exist: proves the endpoint, credentials and bucket."""
        try:
            obstore.get(self.meta, path, options={"range": (0, 1)}).bytes()
        except Exception as e:
            f = classify(e)
            if f.kind in (Kind.NOT_FOUND, Kind.RANGE):
                return
            raise f from None

    def list_pages(self, prefix: str) -> Iterator[list[tuple[str, int, float]]]:
        """The objects under ``prefix``, a page at a time: (path, size, mtime)."""
        try:
            stream = obstore.list(self.meta, prefix, chunk_size=1000)
            for chunk in stream:
                yield [(m["path"], int(m["size"]), m["last_modified"].timestamp()) for m in chunk]
        except S3Failure:
            raise
        except Exception as e:
            raise classify(e) from None

    def delete(self, paths: Sequence[str]) -> None:
        """Delete objects (bulk requests where the service has them); absent ones are fine."""
        if not paths:
            return
        try:
            obstore.delete(self.data, list(paths))
        except Exception as e:
            f = classify(e)
            if f.kind is not Kind.NOT_FOUND:
                raise f from None
