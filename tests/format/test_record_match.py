"""``match_header``: the quick check of an expected header agrees with the full parse."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
from hypothesis import given, settings

from kvtier.format.record import (
    RecordError,
    check_header,
    header_from_prefix,
    header_prefix,
    match_header,
    namespace_fingerprint,
    pack_header,
    parse_header,
    payload_checksum,
)

FP = namespace_fingerprint("match")
PAYLOAD = np.arange(4096, dtype=np.uint32).view(np.uint8)[:4096]


def _full_check(buf: bytes, key: bytes) -> int | None:
    try:
        h = parse_header(buf)
    except RecordError:
        return None
    if check_header(h, namespace_fp=FP, key=key, payload_len=PAYLOAD.nbytes) is not None:
        return None
    return h.payload_checksum


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=1, max_size=64), pos=st.integers(min_value=0),
       flip=st.integers(min_value=1, max_value=255))
def test_a_changed_byte_never_passes_the_quick_check(key: bytes, pos: int, flip: int) -> None:
    header = bytearray(pack_header(FP, key, memoryview(PAYLOAD)))
    prefix = header_prefix(FP, len(key), PAYLOAD.nbytes)
    good = match_header(header, prefix, key)
    assert good is not None and good == _full_check(bytes(header), key)
    header[pos % len(header)] ^= flip
    quick = match_header(header, prefix, key)
    assert quick is None  # every byte of the header is covered by a comparison or a checksum
    assert _full_check(bytes(header), key) is None  # and the full parse agrees


def test_another_key_namespace_or_size_fails_the_quick_check() -> None:
    key = b"k" * 32
    header = pack_header(FP, key, memoryview(PAYLOAD))
    assert match_header(header, header_prefix(FP, 32, PAYLOAD.nbytes), key) is not None
    assert match_header(header, header_prefix(FP, 32, PAYLOAD.nbytes), b"j" * 32) is None
    assert match_header(header, header_prefix(namespace_fingerprint("x"), 32, PAYLOAD.nbytes),
                        key) is None
    assert match_header(header, header_prefix(FP, 32, 2 * PAYLOAD.nbytes), key) is None
    assert match_header(header[:-1], header_prefix(FP, 32, PAYLOAD.nbytes), key) is None


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=0, max_size=80), plen=st.integers(min_value=1, max_value=4096))
def test_header_from_prefix_builds_exactly_what_pack_header_builds(key: bytes, plen: int) -> None:
    payload = memoryview(PAYLOAD)[:plen]
    checksum = payload_checksum(payload)
    got = header_from_prefix(header_prefix(FP, len(key), plen), key, checksum)
    assert got == pack_header(FP, key, payload)
    assert match_header(got, header_prefix(FP, len(key), plen), key) == checksum
