"""Decrypt an encrypted file into the plain safetensors file it stands for (`ctfs decrypt`)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ctfs.files.atomic import Output, atomic_output, write_all
from ctfs.files.encrypted import EncryptedFile
from ctfs.keys.store import KeySource

# Chunks decrypted together: bounds memory while keeping both cores busy.
BATCH_BYTES = 32 * 1024 * 1024
STREAM_BLOCK = 16 * 1024 * 1024


def decrypt_file(
    src: str | os.PathLike[str],
    dst: Output,
    keys: KeySource,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write the plain file; plaintext gets a name, `dst`, only once every tag verified (until then it is
    an unnamed file, freed on failure or death), and it is created mode 0600."""
    with EncryptedFile(src, keys) as ef, atomic_output(dst, 0o600) as out, ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        write_all(out, ef.view.prefix, 0)
        base = len(ef.view.prefix)
        batches = _BatchPipeline(out, pool)
        for info in ef.header.by_offset:
            cipher = ef.crypto.ciphers.get(info.name)
            if cipher is None:
                batches.flush()
                _stream_tensor(ef, info, out, base)
            elif info.nbytes == 0:
                ef.verify_empty_tensor(info.name)
            elif cipher.chunk_size is None:
                batches.flush()
                opener = ef.open_tensor_stream(info.name)
                _stream_tensor(ef, info, out, base, opener.update)
                opener.finalize()  # raises on a bad tag: the unnamed output, plaintext and all, is dropped
            else:
                batches.decrypt(ef, info, base)
            if on_bytes:
                on_bytes(info.nbytes)
        batches.flush()


def _stream_tensor(ef: EncryptedFile, info, out: int, base: int,
                   transform: Callable[[bytes], bytes] = bytes) -> None:
    """Copy a tensor's stored bytes through `transform` (a stream decryptor, or none), block by block."""
    for rel in range(0, info.nbytes, STREAM_BLOCK):
        data = ef.read_stored(info.start + rel, min(STREAM_BLOCK, info.nbytes - rel))
        write_all(out, transform(data), base + info.start + rel)


class _BatchPipeline:
    """Chunks are decrypted in parallel into one of two batch buffers while the previous batch, of this
    tensor or the one before, is written out, so writes overlap decryption from the first tensor to the
    last. The buffers live as long as the file: fresh memory costs a page fault per 4 KiB on first touch,
    which doubled the time of a decrypt that allocated them per tensor."""

    def __init__(self, out: int, pool: ThreadPoolExecutor):
        self._out = out
        self._pool = pool
        self._buffers: list[mmap.mmap] = []
        self._turn = 0
        self._pending: tuple[memoryview, int] | None = None  # (bytes, file offset) not yet written

    def decrypt(self, ef: EncryptedFile, info, base: int) -> None:
        size = ef.crypto.ciphers[info.name].chunk_size
        count = -(-info.nbytes // size)
        per_batch = max(1, BATCH_BYTES // size)
        for first in range(0, count, per_batch):
            batch = self._next_buffer(per_batch * size)
            indices = range(first, min(count, first + per_batch))
            start = info.start + first * size
            length = min(info.end, start + len(indices) * size) - start
            jobs = [self._pool.submit(_decrypt_into, ef, info.name, i, batch[(i - first) * size:]) for i in indices]
            self.flush()
            for job in jobs:
                job.result()
            self._pending = (batch[:length], base + start)

    def flush(self) -> None:
        """Write the pending batch, if any."""
        if self._pending is not None:
            view, offset = self._pending
            self._pending = None
            write_all(self._out, view, offset)

    def _next_buffer(self, size: int) -> memoryview:
        if not self._buffers or len(self._buffers[0]) < size:
            self.flush()  # the pending batch may live in a buffer about to be replaced
            # Anonymous memory comes zeroed on first touch; bytearray(n) would memset it first.
            self._buffers = [mmap.mmap(-1, size) for _ in range(2)]
        self._turn ^= 1
        return memoryview(self._buffers[self._turn])


def _decrypt_into(ef: EncryptedFile, name: str, index: int, out: memoryview) -> None:
    ef.decrypt_chunk_into(name, index, out[:ef.chunk_size(name, index)])
