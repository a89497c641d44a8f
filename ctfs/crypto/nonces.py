"""Chunk nonces of format v2: a big-endian 32-bit counter in the last four bytes of `base_iv`."""

from __future__ import annotations

from ctfs.crypto.constants import MAX_COUNTER
from ctfs.errors import FormatError


def chunk_nonce(base_iv: bytes, index: int) -> bytes:
    """Nonce of chunk `index`: the counter is added, and overflow is an error, never a wrap-around."""
    counter = int.from_bytes(base_iv[8:12], "big") + index
    if counter > MAX_COUNTER:
        raise FormatError(f"chunk {index} overflows the nonce counter")
    return base_iv[:8] + counter.to_bytes(4, "big")


def fresh_base_iv(random_prefix: bytes) -> bytes:
    """A base_iv whose counter starts at 0, so no tensor below 2**32 chunks can overflow it."""
    return random_prefix[:8] + b"\x00\x00\x00\x00"
