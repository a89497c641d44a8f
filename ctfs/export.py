"""Decrypt an encrypted file into the plain safetensors file it stands for (`ctfs decrypt`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ctfs.atomic import atomic_output, write_all
from ctfs.keys.store import KeySource
from ctfs.reader import EncryptedFile

# Chunks decrypted together: bounds memory while keeping both cores busy.
BATCH_BYTES = 32 * 1024 * 1024
STREAM_BLOCK = 16 * 1024 * 1024


def decrypt_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keys: KeySource,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write the plain file; plaintext reaches `dst` only if every tag verified (the temp file is
    removed otherwise), and it is created mode 0600."""
    with EncryptedFile(src, keys) as ef, atomic_output(dst, 0o600) as out, ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        write_all(out, ef.view.prefix, 0)
        base = len(ef.view.prefix)
        for info in ef.header.by_offset:
            cipher = ef.crypto.ciphers.get(info.name)
            if cipher is None:
                _stream_tensor(ef, info, out, base)
            elif info.nbytes == 0:
                ef.verify_empty_tensor(info.name)
            elif cipher.chunk_size is None:
                opener = ef.open_tensor_stream(info.name)
                _stream_tensor(ef, info, out, base, opener.update)
                opener.finalize()  # raises on a bad tag: the temp file, plaintext and all, is removed
            else:
                _decrypt_chunked(ef, info, out, base, pool)
            if on_bytes:
                on_bytes(info.nbytes)


def _stream_tensor(ef: EncryptedFile, info, out: int, base: int,
                   transform: Callable[[bytes], bytes] = bytes) -> None:
    """Copy a tensor's stored bytes through `transform` (a stream decryptor, or none), block by block."""
    for rel in range(0, info.nbytes, STREAM_BLOCK):
        data = ef.read_stored(info.start + rel, min(STREAM_BLOCK, info.nbytes - rel))
        write_all(out, transform(data), base + info.start + rel)


def _decrypt_chunked(ef: EncryptedFile, info, out: int, base: int, pool: ThreadPoolExecutor) -> None:
    """Chunks are decrypted in parallel into one of two batch buffers while the other is written out,
    so disk writes overlap decryption."""
    size = ef.crypto.ciphers[info.name].chunk_size
    count = -(-info.nbytes // size)
    per_batch = max(1, BATCH_BYTES // size)
    buffers = [memoryview(bytearray(min(per_batch, count) * size)) for _ in range(2)]
    written = None  # the previous batch: (buffer, bytes, file offset), written while this one decrypts

    for number, first in enumerate(range(0, count, per_batch)):
        batch = buffers[number % 2]
        indices = range(first, min(count, first + per_batch))
        start = info.start + first * size
        length = min(info.end, start + len(indices) * size) - start
        jobs = [pool.submit(_decrypt_into, ef, info.name, i, batch[(i - first) * size:]) for i in indices]
        if written is not None:
            write_all(out, written[0][:written[1]], written[2])
        for job in jobs:
            job.result()
        written = (batch, length, base + start)
    if written is not None:
        write_all(out, written[0][:written[1]], written[2])


def _decrypt_into(ef: EncryptedFile, name: str, index: int, out: memoryview) -> None:
    ef.decrypt_chunk_into(name, index, out[:ef.chunk_size(name, index)])
