"""Encrypt a safetensors file into CryptoTensors (v2 chunked or v1 monolithic), streaming and atomically."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from ctfs.crypto.aead import StreamSealer, new_aead
from ctfs.crypto.keywrap import new_dek, wrap_dek
from ctfs.crypto.nonces import chunk_nonce, fresh_base_iv
from ctfs.crypto.signing import sign
from ctfs.errors import CtfsError, FormatError
from ctfs.files.atomic import Output, atomic_output, write_all, write_all_vectored
from ctfs.files.fileio import pread_exact, read_header
from ctfs.format.encryption import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_POLICY,
    NONCE_SIZE,
    RESERVED_KEYS,
    SIGNATURE_KEY,
    TAG_SIZE,
    CryptoHeader,
    TensorCipher,
    encode_crypto_metadata,
    encode_signature,
    parse_crypto_header,
)
from ctfs.format.header import Header, TensorInfo
from ctfs.format.layout import tie_free_layout
from ctfs.format.serialize import file_prefix, header_json, signing_bytes
from ctfs.format.view import tensor_chunk_count
from ctfs.keys.jwk import EncryptionKey, SigningKey, key_ref

# Source bytes are read in blocks of about this size: memory stays bounded whatever the file size.
BLOCK_SIZE = 16 * 1024 * 1024
# Below this chunk size, handing chunks to threads costs more than it saves.
PARALLEL_MIN_CHUNK = 64 * 1024
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class EncryptOptions:
    version: str = "2"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    tensors: Collection[str] | None = None  # None: every tensor
    policy: str | None = None  # the `local` Rego module; None: upstream's allow-all default


def signed_header(metadata: dict[str, str], tensors_by_offset: list[TensorInfo], signer: SigningKey) -> bytes:
    """The on-disk header JSON: `metadata` plus a signature over the canonical form."""
    unsigned = {k: v for k, v in metadata.items() if k != SIGNATURE_KEY}
    signature = sign(signer.seed, signing_bytes(unsigned, tensors_by_offset))
    return header_json({**unsigned, SIGNATURE_KEY: encode_signature(signature)}, tensors_by_offset)


def user_metadata(header: Header) -> dict[str, str]:
    return {k: v for k, v in (header.metadata or {}).items() if k not in RESERVED_KEYS}


@dataclass
class _TensorPlan:
    dek: bytes
    cipher: TensorCipher  # tags are placeholders until the data is encrypted


def _plan(info: TensorInfo, enc_key: EncryptionKey, chunk_size: int | None) -> _TensorPlan:
    dek = new_dek(enc_key.alg)
    wrapped = wrap_dek(enc_key.alg, enc_key.key, dek)
    if chunk_size is None:
        iv = os.urandom(NONCE_SIZE)
    else:
        iv = fresh_base_iv(os.urandom(8))
    cipher = TensorCipher(wrapped.wrapped_key, wrapped.key_iv, wrapped.key_tag, chunk_size, iv, ())
    # v1 and v2 alike: every tensor, empty ones included, gets at least one (authenticated) tag.
    count = max(1, tensor_chunk_count(cipher, info))
    return _TensorPlan(dek, replace(cipher, tags=(bytes(TAG_SIZE),) * count))


class _Encryptor:
    """Streams one source file's tensors into the output: encrypted blocks are written by a writer
    thread while the next block is read and encrypted, at most one write outstanding."""

    def __init__(self, src_fd: int, out_fd: int, src_data_start: int, out_data_start: int,
                 alg: str, pool: ThreadPoolExecutor, on_bytes: ProgressFn | None, label: str):
        self.src_fd, self.out_fd = src_fd, out_fd
        self.src_data_start, self.out_data_start = src_data_start, out_data_start
        self.alg, self.pool, self.on_bytes, self.label = alg, pool, on_bytes, label
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ctfs-writer")
        self._pending: Future | None = None

    def _write_later(self, buffers: list, offset: int) -> None:
        """Queue a write of `buffers` (not to be modified until the next call or `finish`)."""
        if self._pending is not None:
            self._pending.result()
        self._pending = self._writer.submit(write_all_vectored, self.out_fd, buffers, offset)

    def finish(self) -> None:
        """Wait for the last write; a failed write raises here."""
        try:
            if self._pending is not None:
                self._pending.result()
        finally:
            self._writer.shutdown(wait=True)

    def _blocks(self, src: TensorInfo, block: int):
        """(offset within tensor, bytes) of the source tensor, `block` bytes at a time."""
        for rel in range(0, src.nbytes, block):
            length = min(block, src.nbytes - rel)
            data = pread_exact(self.src_fd, length, self.src_data_start + src.start + rel, self.label)
            yield rel, data
            if self.on_bytes:
                self.on_bytes(length)

    def copy(self, src: TensorInfo, dst: TensorInfo) -> None:
        for rel, data in self._blocks(src, BLOCK_SIZE):
            self._write_later([data], self.out_data_start + dst.start + rel)

    def encrypt_chunked(self, src: TensorInfo, dst: TensorInfo, plan: _TensorPlan) -> tuple[bytes, ...]:
        aead, cipher = new_aead(self.alg, plan.dek), plan.cipher
        size = cipher.chunk_size
        if src.nbytes == 0:
            return (aead.encrypt(cipher.iv, b"", None),)
        if size < PARALLEL_MIN_CHUNK:
            return self._encrypt_small_chunks(src, dst, aead, cipher)
        # Each chunk is sealed (ciphertext then tag) into its own slot of a staging buffer; the write
        # gathers the ciphertexts, so nothing is copied. Two buffers: one filling, one being written.
        stride = size + TAG_SIZE
        per_block = max(1, BLOCK_SIZE // size)
        staging = [memoryview(bytearray(min(per_block, -(-src.nbytes // size)) * stride)) for _ in range(2)]
        tags: list[bytes] = []
        for number, (rel, data) in enumerate(self._blocks(src, per_block * size)):
            buf, view, first = staging[number % 2], memoryview(data), rel // size
            lengths = [min(size, len(data) - off) for off in range(0, len(data), size)]

            def seal(i: int) -> None:
                plain = view[i * size:i * size + lengths[i]]
                aead.encrypt_into(chunk_nonce(cipher.iv, first + i), plain, None,
                                  buf[i * stride:i * stride + lengths[i] + TAG_SIZE])

            for _ in self.pool.map(seal, range(len(lengths))):
                pass
            tags += [bytes(buf[i * stride + n:i * stride + n + TAG_SIZE]) for i, n in enumerate(lengths)]
            self._write_later([buf[i * stride:i * stride + n] for i, n in enumerate(lengths)],
                              self.out_data_start + dst.start + rel)
        return tuple(tags)

    def _encrypt_small_chunks(self, src: TensorInfo, dst: TensorInfo, aead, cipher) -> tuple[bytes, ...]:
        """Chunks too small to be worth a thread each, or an iovec each."""
        size, tags = cipher.chunk_size, []
        for rel, data in self._blocks(src, max(size, BLOCK_SIZE // size * size)):
            view, out = memoryview(data), bytearray()
            for off in range(0, len(data), size):
                sealed = aead.encrypt(chunk_nonce(cipher.iv, (rel + off) // size), view[off:off + size], None)
                out += memoryview(sealed)[:-TAG_SIZE]
                tags.append(sealed[-TAG_SIZE:])
            self._write_later([out], self.out_data_start + dst.start + rel)
        return tuple(tags)

    def encrypt_monolithic(self, src: TensorInfo, dst: TensorInfo, plan: _TensorPlan) -> tuple[bytes, ...]:
        sealer = StreamSealer(self.alg, plan.dek, plan.cipher.iv)
        for rel, data in self._blocks(src, BLOCK_SIZE):
            self._write_later([sealer.update(data)], self.out_data_start + dst.start + rel)
        return (sealer.finalize(),)


def encrypt_file(
    src: str | os.PathLike[str],
    dst: Output,
    enc_key: EncryptionKey,
    sign_key: SigningKey,
    options: EncryptOptions = EncryptOptions(),
    on_bytes: ProgressFn | None = None,
) -> None:
    """Encrypt plain safetensors `src` into `dst`; `dst` appears complete or not at all."""
    src, label = os.fspath(src), os.fspath(src)
    if options.version not in ("1", "2"):
        raise CtfsError(f"format version must be 1 or 2, not {options.version!r}")
    if options.version == "2" and options.chunk_size <= 0:
        raise CtfsError("chunk size must be positive")
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(src_fd)
        header = read_header(src_fd, st.st_size, label)
        if parse_crypto_header(header, label) is not None:
            raise FormatError(f"{label}: already encrypted")
        _encrypt(src_fd, header, dst, enc_key, sign_key, options, on_bytes, label, st.st_mode & 0o777)
    finally:
        os.close(src_fd)


def _encrypt(src_fd, header, dst, enc_key, sign_key, options, on_bytes, label, mode) -> None:
    layout = tie_free_layout(header.by_offset)
    wanted = set(options.tensors) if options.tensors is not None else None
    selected = [t for t in layout if wanted is None or t.name in wanted]
    if not selected and layout:
        raise CtfsError(f"{label}: no tensor matches the tensor filter; nothing to encrypt")
    chunk_size = options.chunk_size if options.version == "2" else None
    plans = {t.name: _plan(t, enc_key, chunk_size) for t in selected}
    crypto = CryptoHeader(
        version=options.version, chunk_size=chunk_size, enc=key_ref(enc_key), sign=key_ref(sign_key),
        ciphers={name: plan.cipher for name, plan in plans.items()},
        policy_local=options.policy if options.policy is not None else DEFAULT_POLICY,
        policy_remote=DEFAULT_POLICY, signature=bytes(64),
    )
    metadata = {**user_metadata(header), **encode_crypto_metadata(crypto)}
    # Every field's encoded length is known before encryption, so the placeholder header has the
    # final length and the data can be written in one pass straight to its final offset.
    prefix_len = len(file_prefix(signed_header(metadata, layout, sign_key)))
    source = {t.name: t for t in header.tensors}
    with atomic_output(dst, mode) as out_fd, ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        enc = _Encryptor(src_fd, out_fd, header.data_start, prefix_len, enc_key.alg, pool, on_bytes, label)
        tags = {}
        try:
            for info in layout:
                plan = plans.get(info.name)
                if plan is None:
                    enc.copy(source[info.name], info)
                elif chunk_size is None:
                    tags[info.name] = enc.encrypt_monolithic(source[info.name], info, plan)
                else:
                    tags[info.name] = enc.encrypt_chunked(source[info.name], info, plan)
        finally:
            enc.finish()
        crypto = replace(crypto, ciphers={n: replace(p.cipher, tags=tags[n]) for n, p in plans.items()})
        metadata = {**user_metadata(header), **encode_crypto_metadata(crypto)}
        prefix = file_prefix(signed_header(metadata, layout, sign_key))
        assert len(prefix) == prefix_len, "header length changed between planning and writing"
        write_all(out_fd, prefix, 0)
