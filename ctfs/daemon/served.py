"""One open version of a served file: the bytes the mount serves for any range of it, decrypted through the
shared chunk cache or held whole in a memory image (encrypted files), or read as they are (everything else)."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import threading
from collections.abc import Callable

from ctfs.daemon.chunk_cache import Chunk, ChunkCache
from ctfs.daemon.images import ImageStore, MemoryImage
from ctfs.files.encrypted import EncryptedFile
from ctfs.files.fileio import FileIdentity
from ctfs.format.view import ChunkPiece, HeaderPiece

# v1 tensors have no chunk size; read-ahead looks this far for the next ones.
READAHEAD_V1_SPAN = 4 * 1024 * 1024
# --verify full checks a file in ranges of at least this much, several at once.
VERIFY_PART_MIN = 16 * 1024 * 1024


class Segments:
    """The bytes of one read, as (address, length) spans in order, for the kernel to copy straight from;
    `close` unpins the cached chunks among them once it has, and lets the other buffers go."""

    __slots__ = ("spans", "size", "_exports", "_pinned", "_cache")

    def __init__(self, cache: ChunkCache | None = None):
        self.spans: list[tuple[int, int]] = []
        self.size = 0
        self._exports: list[ctypes.Array] = []  # keep the buffers that are not chunks alive and unresized
        self._pinned: list[tuple[Chunk, int]] = []
        self._cache = cache

    def add_chunk(self, chunk: Chunk, skip: int, length: int) -> None:
        """Bytes of a chunk pinned for this read (its buffer's address is known: no export per read)."""
        self._pinned.append((chunk, length))
        self.spans.append((chunk.address + skip, length))
        self.size += length

    def add_buffer(self, buffer: memoryview) -> None:
        """Bytes of a writable buffer."""
        if len(buffer):
            export = (ctypes.c_char * len(buffer)).from_buffer(buffer)
            self._exports.append(export)
            self.spans.append((ctypes.addressof(export), len(buffer)))
            self.size += len(buffer)

    def close(self) -> None:
        for chunk, served in self._pinned:
            self._cache.release(chunk, served)
        self._pinned = []
        self._exports = []


class OpenVersion:
    """A reference-counted open file: its descriptor closes when the last user lets go, never under a read
    (the kernel releases a file only once its reads are answered) or a read-ahead job (which holds a
    reference until it is done)."""

    # Set when the kernel serves this open itself from a registered backing file (FUSE passthrough).
    backing_id: int | None = None

    def __init__(self, identity: FileIdentity):
        self.identity = identity
        self._refs = 1  # the handle's own
        self._refs_mutex = threading.Lock()

    def hold(self) -> bool:
        """Take a reference for a job; False once the file has closed."""
        with self._refs_mutex:
            if self._refs == 0:
                return False
            self._refs += 1
            return True

    def let_go(self) -> None:
        with self._refs_mutex:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._close()

    def read(self, offset: int, size: int) -> Segments:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class PassthroughFile(OpenVersion):
    """A file served as it is in the source (config, tokenizer, index; plain safetensors with --allow-plain)."""

    def __init__(self, fd: int, identity: FileIdentity):
        super().__init__(identity)
        self._fd = fd

    def read(self, offset: int, size: int) -> Segments:
        return _pread(self._fd, offset, size)

    def _close(self) -> None:
        os.close(self._fd)


class ImageView(OpenVersion):
    """An encrypted file served from its memory image. The kernel reads the image itself (passthrough):
    read() is only the content model's own way to the same bytes."""

    def __init__(self, image: MemoryImage, store: ImageStore):
        super().__init__(image.identity)
        self.image = image
        self.backing_id = image.backing_id
        self._store = store

    def read(self, offset: int, size: int) -> Segments:
        return _pread(self.image.fd, offset, size)

    def _close(self) -> None:
        self._store.release(self.image)


def _pread(fd: int, offset: int, size: int) -> Segments:
    buf = bytearray(size)
    count = os.preadv(fd, [buf], offset)
    segments = Segments()
    segments.add_buffer(memoryview(buf)[:count])
    return segments


def verify_and_publish(encrypted: EncryptedFile, publish: Callable[[int, memoryview], object],
                       run_all: Callable[[list[Callable[[], _Checked]]], list[_Checked]], parts: int) -> int:
    """Authenticate every tag of the file while handing its plain bytes, in whole pages, to
    `publish(offset, bytes)`: --verify full then decrypts each chunk once, for the check and for the reader.
    A chunk's bytes are published only once its tag has verified. The file is checked in up to `parts`
    ranges that `run_all` runs at once: one stream of reads and one core would leave both the disk and the
    other cores idle. Ranges meet at chunk boundaries, so no chunk is decrypted twice; the page that two
    ranges share is published once both have checked their part of it. Returns the bytes decrypted."""
    encrypted.verify_empty_tensors()
    size = encrypted.view.size
    if any(cipher.chunk_size is None for cipher in encrypted.crypto.ciphers.values()):
        parts = 1  # a v1 tensor is one message: split, it would be decrypted whole by each range it spans
    parts = max(1, min(parts, size // VERIFY_PART_MIN))
    bounds = sorted({0, size, *(_chunk_start(encrypted, size * i // parts) for i in range(1, parts))})
    checked = run_all([functools.partial(_verify_range, encrypted, publish, start, end, end == size)
                       for start, end in zip(bounds, bounds[1:])])
    for before, after in zip(checked, checked[1:]):
        if after.head:  # the page where they meet: the range before holds its start, this one its end
            shared = bytearray(before.tail + after.head)
            publish(after.start - len(before.tail), memoryview(shared))
    return sum(range_.decrypted for range_ in checked)


@dataclasses.dataclass
class _Checked:
    """One range's check: the bytes it decrypted, and its parts of the pages it shares with its neighbours,
    which it did not publish."""

    start: int
    decrypted: int
    head: bytes  # from `start` to the next page boundary
    tail: bytes  # from the last page boundary to the range's end


def _chunk_start(encrypted: EncryptedFile, offset: int) -> int:
    """The start of the chunk that holds plain byte `offset`, or `offset` where no chunk does."""
    pieces = encrypted.view.pieces(offset, 1)
    return offset - pieces[0].skip if pieces and isinstance(pieces[0], ChunkPiece) else offset


def _verify_range(encrypted: EncryptedFile, publish: Callable[[int, memoryview], object], start: int,
                  end: int, ends_file: bool) -> _Checked:
    pages = _PageStream(publish, start)
    scratch = memoryview(bytearray())
    decrypted = 0
    for piece in encrypted.view.pieces(start, end - start):
        if isinstance(piece, ChunkPiece):
            size = encrypted.chunk_size(piece.tensor, piece.index)
            decrypted += size
            room = pages.room(size) if piece.skip == 0 and piece.length == size else None
            if room is not None:  # straight into the pages to publish: one copy fewer
                encrypted.decrypt_chunk_into(piece.tensor, piece.index, room)
                pages.wrote(size)
                continue
            if len(scratch) < size:
                scratch = memoryview(bytearray(size))
            encrypted.decrypt_chunk_into(piece.tensor, piece.index, scratch[:size])
            pages.write(scratch[piece.skip:piece.skip + piece.length])
        elif isinstance(piece, HeaderPiece):
            pages.write(memoryview(encrypted.view.prefix)[piece.start:piece.start + piece.length])
        else:
            pages.write(memoryview(encrypted.read_stored(piece.data_offset, piece.length)))
    pages.flush(final=ends_file)
    return _Checked(start, decrypted, pages.head, pages.rest())


class _PageStream:
    """Gathers a file's bytes, written in order from `offset`, into blocks of whole pages: the kernel marks
    a stored page readable only if one store covers all of it (or ends the file). The bytes of a page begun
    before `offset` (`head`) and of one left unfinished (`rest()`) are not published, but handed back."""

    BLOCK = 4 * 1024 * 1024
    PAGE = 4096

    def __init__(self, publish: Callable[[int, memoryview], object], offset: int):
        self._publish = publish
        self._buffer = memoryview(bytearray(self.BLOCK + self.PAGE))
        self._skip = offset % self.PAGE  # bytes of the first page that are not this stream's
        self._filled = self._skip
        self._offset = offset - self._skip  # file offset of the buffer's first byte: a page boundary
        self.head = b""

    def room(self, size: int) -> memoryview | None:
        """The next `size` bytes of the buffer, to fill and then pass to `wrote`; None if they do not fit."""
        if self._filled + size > len(self._buffer):
            return None
        return self._buffer[self._filled:self._filled + size]

    def wrote(self, size: int) -> None:
        self._filled += size
        if self._filled >= self.BLOCK:
            self.flush()

    def write(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), len(self._buffer) - self._filled)
            self._buffer[self._filled:self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled >= self.BLOCK:
                self.flush()

    def flush(self, final: bool = False) -> None:
        whole = self._filled if final else self._filled - self._filled % self.PAGE
        first = 0
        if self._skip:  # the first page began before this stream: keep its part of it, publish none
            if whole < self.PAGE and not final:
                return
            first = min(self.PAGE, self._filled)
            self.head = bytes(self._buffer[self._skip:first])
            self._skip = 0
        if whole > first:
            self._publish(self._offset + first, self._buffer[first:whole])
        rest = self._filled - whole
        self._buffer[:rest] = self._buffer[whole:self._filled]
        self._offset += whole
        self._filled = rest

    def rest(self) -> bytes:
        """The bytes after the last whole page, not published."""
        return bytes(self._buffer[:self._filled])


class PlainView(OpenVersion):
    """An encrypted file served as its plain safetensors view; chunks come from the shared cache, and a
    sequential reader gets the next chunks decrypted ahead of it."""

    def __init__(self, encrypted: EncryptedFile, cache: ChunkCache, readahead_chunks: int):
        super().__init__(encrypted.identity)
        self.encrypted = encrypted
        self._cache = cache
        self._readahead_chunks = readahead_chunks
        self._prefix = memoryview(bytearray(encrypted.view.prefix))  # writable: the kernel copies from it
        self._next_offset = -1  # where a sequential reader will read next
        self._position_mutex = threading.Lock()

    def read(self, offset: int, size: int) -> Segments:
        segments = Segments(self._cache)
        try:
            for piece in self.encrypted.view.pieces(offset, size):
                if isinstance(piece, ChunkPiece):
                    chunk = self._cache.acquire(self._key(piece.tensor, piece.index),
                                                self.encrypted.chunk_size(piece.tensor, piece.index),
                                                self._filler(piece.tensor, piece.index))
                    segments.add_chunk(chunk, piece.skip, piece.length)
                elif isinstance(piece, HeaderPiece):
                    segments.add_buffer(self._prefix[piece.start:piece.start + piece.length])
                else:  # a tensor stored in plaintext
                    segments.add_buffer(memoryview(bytearray(self.encrypted.read_stored(piece.data_offset,
                                                                                         piece.length))))
        except BaseException:
            segments.close()
            raise
        self._read_ahead(offset, segments.size)
        return segments

    def _key(self, tensor: str, index: int) -> tuple:
        return (self.identity, tensor, index)

    def _filler(self, tensor: str, index: int) -> Callable[[memoryview], None]:
        return lambda out: self.encrypted.decrypt_chunk_into(tensor, index, out)

    def _read_ahead(self, offset: int, length: int) -> None:
        """On sequential access, decrypt the chunks after this read before the reader asks for them."""
        with self._position_mutex:
            sequential = offset == self._next_offset
            self._next_offset = offset + length
        if not sequential or not self._readahead_chunks:
            return
        # Look no further than the chunks wanted, and never so far that read-ahead evicts itself.
        span = self._readahead_chunks * (self.encrypted.crypto.chunk_size or READAHEAD_V1_SPAN)
        wanted: list[tuple[str, int]] = []
        for piece in self.encrypted.view.pieces(offset + length, min(span, self._cache.capacity // 2)):
            if isinstance(piece, ChunkPiece) and (piece.tensor, piece.index) not in wanted:
                wanted.append((piece.tensor, piece.index))
                if len(wanted) == self._readahead_chunks:
                    break
        for tensor, index in wanted:
            if not self.hold():
                return
            # The job holds the reference taken above until it is done with the file.
            if not self._cache.prefetch(self._key(tensor, index), self.encrypted.chunk_size(tensor, index),
                                        self._filler(tensor, index), self.let_go):
                self.let_go()

    def _close(self) -> None:
        self.encrypted.close()
