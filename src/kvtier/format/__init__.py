"""The self-describing, checksummed block record that persistent and network tiers store."""

from kvtier.format.record import (
    FORMAT_VERSION,
    MAGIC,
    RecordError,
    RecordHeader,
    namespace_fingerprint,
    pack_header,
    parse_header,
    payload_checksum,
)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "RecordError",
    "RecordHeader",
    "namespace_fingerprint",
    "pack_header",
    "parse_header",
    "payload_checksum",
]
