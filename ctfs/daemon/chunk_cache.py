"""A byte-bounded LRU of decrypted chunks shared by every open file, with single-flight and read-ahead."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

# Decrypts a chunk into the buffer it is given (exactly the chunk's length); raises if a tag fails.
Fill = Callable[[memoryview], None]

# Buffers are sized in steps of this, so that equal-sized chunks reuse each other's buffers.
BUFFER_STEP = 64 * 1024
# Keys of chunks recently served whole, remembered so read-ahead does not decrypt them again: parallel
# kernel requests make a stale "sequential" signal name chunks the page cache already holds.
SERVED_MEMORY = 1024
# Freed buffers kept for reuse: fresh memory costs a page fault per 4 KiB on first touch, which cost
# more than the decryption itself (measured: 2 MiB chunks decrypted 8x faster into reused buffers).
POOL_BUFFERS = 8


def buffer_capacity(length: int) -> int:
    return max(BUFFER_STEP, -(-length // BUFFER_STEP) * BUFFER_STEP)


class Chunk:
    """A decrypted, verified chunk in a reusable buffer. Readers pin it while copying it out, so that
    eviction cannot hand its buffer to the next decryption in the middle of a copy."""

    __slots__ = ("buffer", "address", "length", "pins", "cached", "key", "served", "_export")

    def __init__(self, capacity: int):
        # Anonymous memory comes zeroed by the kernel on first touch; bytearray(n) would memset it first.
        self.buffer = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._export = (ctypes.c_char * capacity).from_buffer(self.buffer)
        self.address = ctypes.addressof(self._export)
        self.length = 0
        self.pins = 0
        self.cached = False  # in the index; a pinned chunk dropped from it is recycled at its last release
        self.key: Hashable = None
        self.served = 0  # bytes copied out; once all were, the kernel's page cache holds them too

    @property
    def capacity(self) -> int:
        return len(self.buffer)

    def view(self) -> memoryview:
        return memoryview(self.buffer)[:self.length]


class _InFlight:
    """A chunk being decrypted: later readers wait for it instead of decrypting it again."""

    __slots__ = ("done", "chunk", "error", "waiters", "started")

    def __init__(self, started: bool = True) -> None:
        self.done = threading.Event()
        self.chunk: Chunk | None = None
        self.error: BaseException | None = None
        self.waiters = 0  # readers waiting: each gets the chunk already pinned for it
        # False while a read-ahead job sits in the queue: a reader that needs the chunk then decrypts it
        # itself rather than wait for the worker to reach it.
        self.started = started


class ChunkCache:
    """Decrypted chunks keyed by (file identity, tensor, chunk index), evicted least-recently-used.

    Only chunks whose tag verified ever enter the cache; failures are never cached, so a reader
    retrying after an I/O error decrypts again. Readers `acquire` a chunk pinned and `release` it once
    copied out; the bound holds for every unpinned chunk, and pins last one memmove.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Chunk] = OrderedDict()
        self._in_flight: dict[Hashable, _InFlight] = {}
        self._pool: deque[Chunk] = deque()
        self._served_whole: OrderedDict[Hashable, None] = OrderedDict()
        self._size = 0
        self._mutex = threading.Lock()
        # Half the cores: a second worker measured no faster on 2 cores, and a reader decrypts a queued chunk
        # it needs itself instead of waiting for a worker.
        self._prefetcher = ThreadPoolExecutor(max(1, (os.cpu_count() or 1) // 2), thread_name_prefix="ctfs-readahead")
        # Counters for benchmarks and tests: how much work the cache saved or did.
        self.decrypted_bytes = 0
        self.hits = 0

    def acquire(self, key: Hashable, length: int, fill: Fill) -> Chunk:
        """The chunk for `key`, pinned: cached, awaited if being decrypted, else decrypted here by `fill`.
        The caller must `release` it. A failed decryption fails every reader waiting for it."""
        with self._mutex:
            chunk = self._entries.get(key)
            if chunk is not None:
                self._entries.move_to_end(key)
                chunk.pins += 1
                self.hits += 1
                return chunk
            flight = self._in_flight.get(key)
            if flight is None:
                flight = self._in_flight[key] = _InFlight()
                self._served_whole.pop(key, None)  # asked for again: read-ahead may fetch it once more
                owner = True
            elif not flight.started:  # queued read-ahead: take it over
                flight.started = True
                owner = True
            else:
                flight.waiters += 1
                owner = False
        if owner:
            return self._load(key, flight, length, fill, pin=True)
        flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.chunk

    def release(self, chunk: Chunk, served: int = 0) -> None:
        """Unpin `chunk`, of which `served` bytes were copied out. A chunk served whole is evicted first:
        its bytes now live in the kernel's page cache, so sequential reads recycle a handful of buffers
        instead of filling the cache with a second copy of what the kernel holds."""
        with self._mutex:
            chunk.pins -= 1
            if chunk.cached:
                if chunk.served < chunk.length:
                    chunk.served += served
                    if chunk.served >= chunk.length:
                        self._entries.move_to_end(chunk.key, last=False)
                        self._served_whole[chunk.key] = None
                        if len(self._served_whole) > SERVED_MEMORY:
                            self._served_whole.popitem(last=False)
            elif chunk.pins == 0:
                self._recycle(chunk)

    def _load(self, key: Hashable, flight: _InFlight, length: int, fill: Fill, *, pin: bool) -> Chunk | None:
        chunk = self._take_buffer(length)
        try:
            fill(chunk.view())
        except BaseException as exc:
            with self._mutex:
                del self._in_flight[key]
            flight.error = exc
            flight.done.set()
            raise  # the buffer holds unauthenticated bytes: it is dropped, never reused
        with self._mutex:
            del self._in_flight[key]
            self.decrypted_bytes += length
            chunk.pins = flight.waiters + (1 if pin else 0)
            self._insert(key, chunk)
        flight.chunk = chunk
        flight.done.set()
        return chunk if pin else None

    def _take_buffer(self, length: int) -> Chunk:
        """A free buffer for a chunk of `length` bytes: recycled if one fits, else new."""
        capacity = buffer_capacity(length)
        with self._mutex:
            chunk = self._reusable(capacity)
        if chunk is None:
            chunk = Chunk(capacity)
        chunk.length = length
        chunk.served = 0
        return chunk

    def _reusable(self, capacity: int) -> Chunk | None:
        """A pooled buffer of `capacity`, or the oldest cached chunk if it was served whole (mutex held)."""
        for i, free in enumerate(self._pool):
            if free.capacity == capacity:
                del self._pool[i]
                return free
        for _, (key, old) in zip(range(POOL_BUFFERS), self._entries.items()):  # served-whole ones lead
            if old.served < old.length:
                break
            if old.capacity == capacity and not old.pins:
                del self._entries[key]
                old.cached = False
                self._size -= old.capacity
                return old
        return None

    def _insert(self, key: Hashable, chunk: Chunk) -> None:
        """Index `chunk` (mutex held), evicting unpinned chunks, oldest first, to stay within capacity."""
        if chunk.capacity > self.capacity:
            return  # larger than the whole cache: served to its readers, then recycled, never kept
        self._entries[key] = chunk
        chunk.key = key
        chunk.cached = True
        self._size += chunk.capacity
        for _ in range(len(self._entries)):
            if self._size <= self.capacity:
                return
            old_key = next(iter(self._entries))
            old = self._entries[old_key]
            if old.pins:  # being copied out right now: as good as just used
                self._entries.move_to_end(old_key)
                continue
            del self._entries[old_key]
            old.cached = False
            self._size -= old.capacity
            self._recycle(old)

    def _recycle(self, chunk: Chunk) -> None:
        """Keep an unpinned, unindexed buffer for the next decryption (mutex held)."""
        if chunk.capacity > self.capacity // 4:
            return  # a whole v1 tensor, say: not worth holding on to
        self._pool.append(chunk)
        while len(self._pool) > POOL_BUFFERS:
            self._pool.popleft()

    def prefetch(self, key: Hashable, length: int, fill: Fill, done: Callable[[], None]) -> bool:
        """Decrypt a chunk a sequential reader will want next, in the background. True if queued: `done` is
        then called once the job has run, or found a reader had taken the chunk over; False if the chunk
        is cached, in flight, or was recently served whole (and `done` is never called)."""
        with self._mutex:
            if key in self._entries or key in self._in_flight or key in self._served_whole:
                return False
            flight = self._in_flight[key] = _InFlight(started=False)
        self._prefetcher.submit(self._prefetch_one, key, flight, length, fill, done)
        return True

    def _prefetch_one(self, key: Hashable, flight: _InFlight, length: int, fill: Fill,
                      done: Callable[[], None]) -> None:
        try:
            with self._mutex:
                taken, flight.started = flight.started, True
            if not taken:
                self._load(key, flight, length, fill, pin=False)
        except Exception as exc:  # the reader that needs this chunk gets the error itself
            log.debug("read-ahead of %s failed: %s", key, exc)
        finally:
            done()

    def drop(self, predicate: Callable[[Hashable], bool]) -> None:
        """Forget chunks whose key matches, e.g. those of a file whose keys were revoked."""
        with self._mutex:
            for key in [k for k in self._served_whole if predicate(k)]:
                del self._served_whole[key]
            for key in [k for k in self._entries if predicate(k)]:
                chunk = self._entries.pop(key)
                chunk.cached = False
                self._size -= chunk.capacity
                if chunk.pins == 0:
                    self._recycle(chunk)

    @property
    def size(self) -> int:
        return self._size

    def stats(self) -> dict[str, int]:
        with self._mutex:
            return {"decrypted_bytes": self.decrypted_bytes, "cache_hits": self.hits,
                    "cache_bytes": self._size, "cache_capacity": self.capacity}

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
