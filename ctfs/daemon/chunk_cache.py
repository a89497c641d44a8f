"""A byte-bounded LRU of decrypted chunks shared by every open file, with single-flight and read-ahead."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

Loader = Callable[[], bytes]


class _InFlight:
    """A chunk being decrypted: later readers wait for it instead of decrypting it again."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: bytes | None = None
        self.error: BaseException | None = None


class ChunkCache:
    """Decrypted chunks keyed by (file identity, tensor, chunk index), evicted least-recently-used.

    Only chunks whose tag verified ever enter the cache; failures are never cached, so a reader
    retrying after an I/O error decrypts again.
    """

    def __init__(self, capacity: int, readahead_workers: int = 1):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._in_flight: dict[Hashable, _InFlight] = {}
        self._size = 0
        self._mutex = threading.Lock()
        self._prefetcher = ThreadPoolExecutor(readahead_workers, thread_name_prefix="ctfs-readahead")
        # Counters for benchmarks and tests: how much work the cache saved or did.
        self.decrypted_bytes = 0
        self.hits = 0

    def get(self, key: Hashable, load: Loader) -> bytes:
        """The chunk for `key`, decrypting it with `load` unless cached or already being decrypted."""
        with self._mutex:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
            flight = self._in_flight.get(key)
            owner = flight is None
            if owner:
                flight = self._in_flight[key] = _InFlight()
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        return self._load(key, flight, load)

    def _load(self, key: Hashable, flight: _InFlight, load: Loader) -> bytes:
        try:
            value = load()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            self._insert(key, value)
            return value
        finally:
            with self._mutex:
                del self._in_flight[key]
            flight.done.set()

    def _insert(self, key: Hashable, value: bytes) -> None:
        with self._mutex:
            self.decrypted_bytes += len(value)
            self._entries[key] = value
            self._size += len(value)
            # A chunk larger than the whole cache is still returned to its reader, just not kept.
            while self._size > self.capacity and self._entries:
                _, old = self._entries.popitem(last=False)
                self._size -= len(old)

    def prefetch(self, jobs: Iterable[tuple[Hashable, Loader]]) -> None:
        """Decrypt chunks a sequential reader will want next, in the background."""
        for key, load in jobs:
            with self._mutex:
                if key in self._entries or key in self._in_flight:
                    continue
                flight = self._in_flight[key] = _InFlight()
            self._prefetcher.submit(self._prefetch_one, key, flight, load)

    def _prefetch_one(self, key: Hashable, flight: _InFlight, load: Loader) -> None:
        try:
            self._load(key, flight, load)
        except Exception as exc:  # the reader that needs this chunk gets the error itself
            log.debug("read-ahead of %s failed: %s", key, exc)

    def drop(self, predicate: Callable[[Hashable], bool]) -> None:
        """Forget chunks whose key matches, e.g. those of a file whose keys were revoked."""
        with self._mutex:
            for key in [k for k in self._entries if predicate(k)]:
                self._size -= len(self._entries.pop(key))

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
