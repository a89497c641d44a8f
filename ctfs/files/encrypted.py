"""Open a CryptoTensors file: validate its header, verify its signer, and decrypt chunks on demand."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from ctfs.crypto.aead import AEAD, StreamOpener, new_aead, open_, open_sealed_into
from ctfs.crypto.keywrap import WrappedKey, unwrap_dek
from ctfs.crypto.nonces import chunk_nonce
from ctfs.crypto.signing import verifies
from ctfs.errors import IntegrityError, PlainFileError, UntrustedSigner
from ctfs.files.fileio import DIRECT_ALIGN, FileIdentity, SourceReader, pread_exact, read_header
from ctfs.format.encryption import (
    DEFAULT_CHUNK_SIZE,
    TAG_SIZE,
    CryptoHeader,
    TensorCipher,
    parse_crypto_header,
)
from ctfs.format.header import Header, TensorInfo
from ctfs.format.serialize import signing_bytes
from ctfs.format.view import (
    PlainView,
    chunk_span,
    tensor_chunk_count,
)
from ctfs.keys.jwk import EncryptionKey
from ctfs.keys.store import KeySource


class _SealedBuffers:
    """Buffers for a chunk's ciphertext followed by its tag, made for direct reads (SourceReader.buffer) and
    reused across calls: fresh memory costs a page fault per 4 KiB on first touch, more than decrypting it.
    Shared, not thread-local, because FUSE worker threads get a new Python thread state (and so new
    thread-locals) on every callback."""

    KEEP_LIMIT = 16 * 1024 * 1024  # larger (v1 tensors) are allocated for the call only
    KEEP_COUNT = 16
    MIN_SIZE = DEFAULT_CHUNK_SIZE + TAG_SIZE  # so that a tail chunk's buffer serves a full one next

    def __init__(self) -> None:
        self._free: list[memoryview] = []
        self._mutex = threading.Lock()

    def take(self, size: int) -> memoryview:
        if size <= self.KEEP_LIMIT:
            with self._mutex:
                for i, buf in enumerate(self._free):
                    if len(buf) >= size + 2 * DIRECT_ALIGN:
                        return self._free.pop(i)
        return SourceReader.buffer(max(size, self.MIN_SIZE) if size <= self.KEEP_LIMIT else size)

    def give(self, buf: memoryview) -> None:
        if len(buf) <= self.KEEP_LIMIT:
            with self._mutex:
                if len(self._free) < self.KEEP_COUNT:
                    self._free.append(buf)


_sealed_buffers = _SealedBuffers()


def verify_signature(header: Header, crypto: CryptoHeader, keys: KeySource, source: str) -> None:
    """The header must be signed by a trusted key; the header's kid only narrows which trusted key."""
    candidates = keys.trusted_verify_keys(crypto.sign)
    if not candidates:
        signer = f"kid {crypto.sign.kid!r}" if crypto.sign.kid else "its signer"
        raise UntrustedSigner(f"{source}: signed by {signer}, which is not a trusted verify key")
    message = signing_bytes(header.metadata or {}, header.by_offset)
    if not any(verifies(public, crypto.signature, message) for public in candidates):
        raise IntegrityError(f"{source}: header signature verification failed (tampered header or wrong signer)")


class EncryptedFile:
    """A verified encrypted file. Data keys are unwrapped lazily, once each; methods are thread-safe."""

    def __init__(self, path: str | os.PathLike[str], keys: KeySource, *, label: str | None = None):
        self.path = os.fspath(path)
        self.label = label or self.path
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(self._fd)
            self.identity = FileIdentity.of(st)
            self.header = read_header(self._fd, st.st_size, self.label)
            crypto = parse_crypto_header(self.header, self.label)
            if crypto is None:
                raise PlainFileError(f"{self.label}: plain safetensors file, not encrypted")
            self.crypto = crypto
            verify_signature(self.header, crypto, keys, self.label)
            self.master_key: EncryptionKey = keys.encryption_key(crypto.enc)
        except BaseException:
            os.close(self._fd)
            raise
        self.view = PlainView(self.header, crypto)
        self._reader = SourceReader(self._fd, self.path)
        self._deks: dict[str, tuple[bytes, AEAD]] = {}
        self._lock = threading.Lock()

    # -- keys ------------------------------------------------------------------------------------
    def _dek(self, name: str) -> tuple[bytes, AEAD]:
        with self._lock:
            found = self._deks.get(name)
        if found is None:
            cipher = self.crypto.ciphers[name]
            wrapped = WrappedKey(cipher.wrapped_key, cipher.key_iv, cipher.key_tag)
            what = f"{self.label}: data key of tensor {name!r}"
            dek = unwrap_dek(self.crypto.enc.alg, self.master_key.key, wrapped, what)
            found = (dek, new_aead(self.crypto.enc.alg, dek))
            with self._lock:
                self._deks[name] = found
        return found

    def _aead(self, name: str) -> AEAD:
        return self._dek(name)[1]

    def unwrap_all(self) -> None:
        """Unwrap every data key now, so a wrong master key fails here rather than mid-read."""
        for name in self.crypto.ciphers:
            self._aead(name)

    def forget_keys(self) -> None:
        with self._lock:
            self._deks.clear()

    # -- chunks ----------------------------------------------------------------------------------
    def tensor(self, name: str) -> tuple[TensorInfo, TensorCipher]:
        return self.header.tensor(name), self.crypto.ciphers[name]

    def chunk_size(self, name: str, index: int) -> int:
        info, cipher = self.tensor(name)
        start, end = chunk_span(cipher, info, index)
        return end - start

    def decrypt_chunk_into(self, name: str, index: int, out: memoryview) -> None:
        """Decrypt and authenticate one chunk into `out`, which must be exactly the chunk's size."""
        info, cipher = self.tensor(name)
        start, end = chunk_span(cipher, info, index)
        length = end - start
        if len(out) != length:
            raise ValueError(f"chunk {index} of {name!r} is {length} bytes, the buffer {len(out)}")
        # The AEAD wants ciphertext and tag contiguous: read the ciphertext in front of room for the tag.
        buf = _sealed_buffers.take(length + TAG_SIZE)
        try:
            at = self._reader.read_into(buf, self.header.data_start + start, length, self.label)
            sealed = buf[at:at + length + TAG_SIZE]
            sealed[length:] = cipher.tags[index]
            open_sealed_into(self._aead(name), self._nonce(cipher, index), sealed, out,
                             f"{self.label}: tensor {name!r} chunk {index}")
        finally:
            _sealed_buffers.give(buf)

    def decrypt_chunk(self, name: str, index: int) -> bytes:
        out = bytearray(self.chunk_size(name, index))
        self.decrypt_chunk_into(name, index, memoryview(out))
        return bytes(out)

    @staticmethod
    def _nonce(cipher: TensorCipher, index: int) -> bytes:
        return chunk_nonce(cipher.iv, index) if cipher.chunk_size else cipher.iv

    def fileno(self) -> int:
        """The descriptor of the file version this object verified and reads."""
        return self._fd

    def read_stored(self, data_offset: int, length: int) -> bytes:
        return pread_exact(self._fd, length, self.header.data_start + data_offset, self.label)

    def open_tensor_stream(self, name: str) -> StreamOpener:
        """A streaming decryptor for a monolithic (v1) tensor too large to hold twice in memory."""
        cipher = self.crypto.ciphers[name]
        dek = self._dek(name)[0]
        return StreamOpener(self.crypto.enc.alg, dek, cipher.iv, cipher.tags[0], f"{self.label}: tensor {name!r}")

    # -- whole-file operations -------------------------------------------------------------------
    def verify_empty_tensors(self) -> None:
        """The tags of the encrypted tensors that hold no bytes, which no chunk read ever checks."""
        for info in self.header.by_offset:
            if info.name in self.crypto.ciphers and info.nbytes == 0:
                self.verify_empty_tensor(info.name)

    def verify_empty_tensor(self, name: str) -> None:
        """An empty tensor still carries one tag (unless v1 wrote none): check it."""
        cipher = self.crypto.ciphers[name]
        if cipher.tags:
            open_(self._aead(name), cipher.iv, b"", cipher.tags[0], f"{self.label}: tensor {name!r}")

    @property
    def encrypted_bytes(self) -> int:
        """Plaintext bytes held encrypted: what verifying every tag decrypts."""
        return sum(info.nbytes for info in self.header.tensors if info.name in self.crypto.ciphers)

    def chunks(self) -> list[tuple[str, int]]:
        """Every (tensor, chunk index) of the file, in data order."""
        return [
            (info.name, index)
            for info in self.header.by_offset if info.name in self.crypto.ciphers
            for index in range(tensor_chunk_count(self.crypto.ciphers[info.name], info))
        ]

    def verify_all(self, on_bytes=None) -> None:
        """Authenticate every tag of the file; `on_bytes(n)` reports progress."""
        self.verify_empty_tensors()
        scratch = memoryview(bytearray())  # one buffer for every chunk: the plaintext is only checked
        for name, index in self.chunks():
            size = self.chunk_size(name, index)
            if len(scratch) < size:
                scratch = memoryview(bytearray(size))
            self.decrypt_chunk_into(name, index, scratch[:size])
            if on_bytes:
                on_bytes(size)

    def close(self) -> None:
        self.forget_keys()
        self._reader.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EncryptedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify_files(files: list[Path], keys: KeySource, on_bytes: Callable[[int], None] | None = None) -> None:
    """Check the signature and every tag of each file; the first failure raises."""
    for file in files:
        with EncryptedFile(file, keys) as ef:
            ef.verify_all(on_bytes=on_bytes)
