"""The chunk cache: single-flight, failures never cached, bounded in bytes, pinned chunks never reused."""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import segment_bytes

from ctfs.daemon.chunk_cache import ChunkCache, buffer_capacity
from ctfs.errors import IntegrityError

MiB = 1 << 20


def filler(value: int, calls: list[int] | None = None):
    """A stand-in for decryption: fills the chunk with `value`, counting calls."""
    def fill(out: memoryview) -> None:
        if calls is not None:
            calls.append(value)
        out[:] = bytes([value]) * len(out)
    return fill


def failing(out: memoryview) -> None:
    out[:] = b"\xee" * len(out)  # unauthenticated bytes written before the tag check fails
    raise IntegrityError("authentication tag mismatch")


def read(cache: ChunkCache, key, length: int, fill) -> bytes:
    chunk = cache.acquire(key, length, fill)
    try:
        return bytes(chunk.view())
    finally:
        cache.release(chunk, length)


def wait_for_waiters(cache: ChunkCache, key, count: int) -> None:
    """Until `count` readers are blocked on the decryption of `key` (the cache's own bookkeeping)."""
    deadline = time.monotonic() + 30
    while cache._in_flight[key].waiters < count:
        assert time.monotonic() < deadline, "readers never started waiting"
        time.sleep(0.001)


def test_a_chunk_is_decrypted_once_however_many_readers_want_it_at_once():
    cache, calls = ChunkCache(64 * MiB), []
    results: list[bytes] = []

    def first_fill(out: memoryview) -> None:
        wait_for_waiters(cache, "k", 7)  # the seven others are waiting for this very decryption
        filler(7, calls)(out)

    threads = [threading.Thread(target=lambda: results.append(read(cache, "k", MiB, filler(7, calls))))
               for _ in range(7)]
    owner = threading.Thread(target=lambda: results.append(read(cache, "k", MiB, first_fill)))
    owner.start()
    while "k" not in cache._in_flight:
        time.sleep(0.001)
    for t in threads:
        t.start()
    for t in [owner, *threads]:
        t.join()
    assert calls == [7]
    assert results == [b"\x07" * MiB] * 8
    assert cache.stats()["decrypted_bytes"] == MiB
    cache.close()


def _owner_fails_while_a_waiter_waits(cache: ChunkCache, waiter_fill) -> tuple[list[bytes], list[BaseException]]:
    """The first reader's decryption fails after a second reader started waiting for the same chunk;
    returns what the waiter read and what it raised."""
    waiting = threading.Event()
    got: list[bytes] = []
    errors: list[BaseException] = []

    def slow_failure(out: memoryview) -> None:
        assert waiting.wait(5)
        wait_for_waiters(cache, "k", 1)  # the waiter is inside acquire(), blocked on this flight
        failing(out)

    def waiter() -> None:
        waiting.set()
        try:
            got.append(read(cache, "k", MiB, waiter_fill))
        except IntegrityError as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    with pytest.raises(IntegrityError):
        cache.acquire("k", MiB, lambda out: (t.start(), slow_failure(out)))
    t.join()
    return got, errors


def workers(cache: ChunkCache) -> int:
    return cache._prefetcher._max_workers


def park_workers(cache: ChunkCache, gate: threading.Event) -> None:
    """Occupy every read-ahead worker until `gate` is set: jobs queued after this wait in the queue."""
    for worker in range(workers(cache)):
        assert cache.prefetch(("blocker", worker), 16, lambda out: gate.wait(), lambda: None)


def drain(cache: ChunkCache) -> None:
    """Until every read-ahead job queued so far has run: one job per worker, each waiting for all the
    others, holds every worker at once, which no worker can do while still on an earlier job."""
    drained, together = threading.Semaphore(0), threading.Barrier(workers(cache))
    for worker in range(workers(cache)):
        assert cache.prefetch(("last", worker), 16, lambda out: together.wait(30), drained.release)
    for _ in range(workers(cache)):
        assert drained.acquire(timeout=30)


def test_a_reader_takes_over_a_queued_read_ahead_instead_of_waiting_for_it():
    cache, calls, done = ChunkCache(64 * MiB), [], []
    gate = threading.Event()
    park_workers(cache, gate)
    try:
        assert cache.prefetch("k", MiB, filler(1, calls), lambda: done.append("job"))
        assert read(cache, "k", MiB, filler(2, calls)) == b"\x02" * MiB  # decrypted by the reader, now
    finally:
        gate.set()
    drain(cache)  # the job runs: it finds the chunk taken and leaves it
    assert calls == [2] and done == ["job"]
    assert read(cache, "k", MiB, filler(3)) == b"\x02" * MiB  # the reader's decryption is the cached one


def test_a_file_closed_under_a_queued_read_ahead_stays_open_until_the_job_ran(tmp_path, keys):
    """The reference a read-ahead job holds keeps its file's descriptor open: the job decrypts from it
    even when the reader closed meanwhile, and the descriptor closes right after."""
    import numpy as np
    from conftest import write_plain

    from ctfs.daemon.source import ModelSource
    from ctfs.files.encrypt import EncryptOptions, encrypt_file

    plain = write_plain(tmp_path / "plain.safetensors", {"a": np.arange(100_000, dtype=np.float32)})
    (tmp_path / "src").mkdir()
    encrypt_file(plain, tmp_path / "src" / "m.safetensors", keys.enc, keys.sign, EncryptOptions(chunk_size=4096))
    source = ModelSource(tmp_path / "src", keys.store, ChunkCache(MiB))
    entry = source.child(source.root_entry(), "m.safetensors", "/m.safetensors")
    version = source.open("/m.safetensors", entry, None)
    fd = version.encrypted._fd
    gate = threading.Event()
    park_workers(source.cache, gate)
    try:
        for offset in (0, 8192):  # the second read is sequential: read-ahead jobs queue behind the blocker
            version.read(offset, 8192).close()
        decrypted = source.cache.stats()["decrypted_bytes"]
        version.let_go()  # the reader closes while its jobs wait
        os.fstat(fd)  # still open
    finally:
        gate.set()
    drain(source.cache)
    source.cache.close()
    # The queued jobs decrypted whole chunks from the file the reader had closed (besides the 16-byte jobs).
    ahead = source.cache.stats()["decrypted_bytes"] - decrypted - 32 * workers(source.cache)
    assert ahead >= 4096 and ahead % 4096 == 0
    with pytest.raises(OSError):
        os.fstat(fd)  # closed once the last job let go


def test_a_genuine_failure_fails_every_reader_and_is_never_cached():
    cache = ChunkCache(64 * MiB)
    got, errors = _owner_fails_while_a_waiter_waits(cache, failing)
    assert not got and len(errors) == 1
    assert cache.stats()["decrypted_bytes"] == 0
    assert read(cache, "k", MiB, filler(3)) == b"\x03" * MiB  # nothing bad was kept: decrypted afresh
    cache.close()


def test_the_cache_stays_within_its_bound():
    capacity = 8 * MiB
    cache = ChunkCache(capacity)
    for i in range(50):
        chunk = cache.acquire(("f", i), 2 * MiB, filler(i % 256))
        cache.release(chunk, MiB)  # half served: not a candidate for early reuse
        assert cache.size <= capacity
    assert cache.stats()["cache_bytes"] <= capacity
    cache.close()


def test_a_pinned_chunk_is_not_reused_until_released():
    cache = ChunkCache(4 * MiB)  # room for two 2 MiB chunks
    pinned = cache.acquire(("f", 0), 2 * MiB, filler(1))
    for i in range(1, 10):  # pressure: every other chunk is evicted and its buffer reused
        read(cache, ("f", i), 2 * MiB, filler(i + 1))
    assert bytes(pinned.view()) == b"\x01" * 2 * MiB
    cache.release(pinned, 2 * MiB)
    cache.close()


def test_chunks_served_whole_are_reused_before_the_cache_grows():
    cache = ChunkCache(256 * MiB)
    for i in range(64):
        assert read(cache, ("f", i), 2 * MiB, filler(i)) == bytes([i]) * 2 * MiB
    # A sequential reader needs only a few buffers: served chunks live on in the kernel's page cache.
    assert cache.size <= 8 * buffer_capacity(2 * MiB)
    cache.close()


def test_read_ahead_skips_chunks_already_served_whole_but_a_reader_gets_them_again():
    cache, calls = ChunkCache(256 * MiB), []
    read(cache, ("f", 0), MiB, filler(5, calls))
    read(cache, ("f", 1), MiB, filler(6, calls))  # its buffer may be chunk 0's
    assert not cache.prefetch(("f", 0), MiB, filler(5, calls), lambda: None)
    cache.close()  # waits for read-ahead
    assert calls == [5, 6]
    cache = ChunkCache(256 * MiB)
    assert read(cache, ("f", 0), MiB, filler(5)) == b"\x05" * MiB
    cache.close()


def test_a_chunk_larger_than_the_cache_is_served_but_not_kept():
    cache = ChunkCache(MiB)
    assert read(cache, "big", 3 * MiB, filler(9)) == b"\x09" * 3 * MiB
    assert cache.size == 0
    cache.close()


def test_the_source_counts_bytes_served_and_decrypted(tmp_path, keys):
    """The counters behind the mount's `user.ctfs.stats` xattr: a whole sequential read decrypts each
    chunk once, and serves exactly the plain file."""
    import numpy as np
    from conftest import write_plain

    from ctfs.daemon.source import ModelSource
    from ctfs.files.decrypt import decrypt_file
    from ctfs.files.encrypt import EncryptOptions, encrypt_file

    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal(300_000).astype(np.float32), "b": rng.integers(0, 9, 70_001).astype(np.int8)}
    plain = write_plain(tmp_path / "plain.safetensors", tensors)
    (tmp_path / "src").mkdir()
    encrypt_file(plain, tmp_path / "src" / "m.safetensors", keys.enc, keys.sign, EncryptOptions(chunk_size=64 * 1024))
    decrypt_file(tmp_path / "src" / "m.safetensors", tmp_path / "view", keys.store)
    source = ModelSource(tmp_path / "src", keys.store, ChunkCache(MiB))
    entry = source.child(source.root_entry(), "m.safetensors", "/m.safetensors")
    version = source.open("/m.safetensors", entry, None)
    out = bytearray()
    while len(out) < entry.size:  # 100 KiB requests: chunks straddle requests
        segments = version.read(len(out), min(100_000, entry.size - len(out)))
        out += segment_bytes(segments)
        source.count_served(segments.size)
        segments.close()
    version.let_go()
    source.cache.close()
    assert bytes(out) == (tmp_path / "view").read_bytes()
    stats = source.stats()
    assert stats["served_bytes"] == entry.size
    assert stats["decrypted_bytes"] == sum(t.nbytes for t in tensors.values())
