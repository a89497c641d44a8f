"""The three AEADs of the format, one-shot and streaming; tags travel separately from ciphertext."""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import constant_time
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.poly1305 import Poly1305

from ctfs.crypto.constants import ENC_KEY_LENGTHS, TAG_SIZE
from ctfs.errors import IntegrityError

AEAD = AESGCM | ChaCha20Poly1305


def new_aead(alg: str, key: bytes) -> AEAD:
    """An AEAD for a normalised algorithm name; the key length must match the algorithm."""
    if len(key) != ENC_KEY_LENGTHS[alg]:
        raise ValueError(f"{alg} needs a {ENC_KEY_LENGTHS[alg]}-byte key")
    return ChaCha20Poly1305(key) if alg == "chacha20poly1305" else AESGCM(key)


def seal(aead: AEAD, nonce: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """Encrypt with no associated data (the format uses none); returns (ciphertext, tag)."""
    sealed = aead.encrypt(nonce, plaintext, None)
    return sealed[:-TAG_SIZE], sealed[-TAG_SIZE:]


def open_sealed_into(aead: AEAD, nonce: bytes, sealed: memoryview, out: memoryview, what: str) -> None:
    """Decrypt `sealed` (ciphertext followed by its tag) into `out`, without copying the input.
    On a bad tag raise IntegrityError; `out` then holds nothing the caller may use."""
    try:
        aead.decrypt_into(nonce, sealed, None, out)
    except InvalidTag:
        raise _tag_mismatch(what) from None


def open_(aead: AEAD, nonce: bytes, ciphertext: bytes, tag: bytes, what: str) -> bytes:
    """Decrypt a small message whose tag is stored apart from it (wrapped keys, empty tensors)."""
    out = bytearray(len(ciphertext))
    open_sealed_into(aead, nonce, memoryview(ciphertext + tag), memoryview(out), what)
    return bytes(out)


def _tag_mismatch(what: str) -> IntegrityError:
    return IntegrityError(f"{what}: authentication tag mismatch (tampered data or wrong key)")


class _ChaCha20Poly1305Stream:
    """RFC 8439 §2.8 with no associated data, incrementally: `cryptography` only offers it one-shot."""

    def __init__(self, key: bytes, nonce: bytes, *, encrypt: bool):
        block0 = Cipher(algorithms.ChaCha20(key, b"\x00" * 4 + nonce), None).encryptor()
        self._mac = Poly1305(block0.update(b"\x00" * 32))
        self._stream = Cipher(algorithms.ChaCha20(key, struct.pack("<I", 1) + nonce), None).encryptor()
        self._encrypt = encrypt
        self._length = 0

    def update(self, data: bytes) -> bytes:
        out = self._stream.update(data)
        self._mac.update(out if self._encrypt else data)
        self._length += len(data)
        return out

    def tag(self) -> bytes:
        self._mac.update(b"\x00" * (-self._length % 16) + struct.pack("<QQ", 0, self._length))
        return self._mac.finalize()


class StreamSealer:
    """Encrypt a message too large for memory (a monolithic v1 tensor) piece by piece."""

    def __init__(self, alg: str, key: bytes, nonce: bytes):
        if alg == "chacha20poly1305":
            self._ctx = _ChaCha20Poly1305Stream(key, nonce, encrypt=True)
        else:
            self._ctx = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()

    def update(self, plaintext: bytes) -> bytes:
        return self._ctx.update(plaintext)

    def finalize(self) -> bytes:
        """The tag of everything sealed."""
        if isinstance(self._ctx, _ChaCha20Poly1305Stream):
            return self._ctx.tag()
        self._ctx.finalize()
        return self._ctx.tag


class StreamOpener:
    """Decrypt piece by piece. Output is unauthenticated until `finalize` returns: never release it before."""

    def __init__(self, alg: str, key: bytes, nonce: bytes, tag: bytes, what: str):
        self._tag, self._what = tag, what
        if alg == "chacha20poly1305":
            self._ctx = _ChaCha20Poly1305Stream(key, nonce, encrypt=False)
        else:
            self._ctx = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()

    def update(self, ciphertext: bytes) -> bytes:
        return self._ctx.update(ciphertext)

    def finalize(self) -> None:
        """Raise IntegrityError unless the tag authenticates everything opened."""
        if isinstance(self._ctx, _ChaCha20Poly1305Stream):
            if not constant_time.bytes_eq(self._ctx.tag(), self._tag):
                raise _tag_mismatch(self._what)
            return
        try:
            self._ctx.finalize()
        except InvalidTag:
            raise _tag_mismatch(self._what) from None
