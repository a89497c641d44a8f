"""--verify full below the FUSE layer: one file checked in several ranges at once, a shard's check ahead of its
open and the open meeting it."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
from conftest import flip_file_bit, write_plain
from mounting import SERVED_CHUNK_SIZE, served_tensors

from ctfs.daemon import served
from ctfs.daemon.chunk_cache import ChunkCache
from ctfs.daemon.source import ModelSource, SourceOptions
from ctfs.errors import CtfsError
from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.encrypted import EncryptedFile

NAMES = ["model-1.safetensors", "model-2.safetensors"]
WAIT = 30  # seconds: only a broken run waits this long


def test_an_open_meeting_the_check_ahead_of_its_shard_waits_for_it_and_checks_nothing_again(tmp_path, keys):
    src = tmp_path / "src"
    src.mkdir()
    plain = write_plain(tmp_path / "plain.safetensors", served_tensors())
    for name in NAMES:
        encrypt_file(plain, src / name, keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    weight_map = {f"w{i}": name for i, name in enumerate(NAMES)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    source = ModelSource(src, keys.store, ChunkCache(1 << 20), SourceOptions(verify_full=True))
    entries = {name: source.child(source.root_entry(), name, f"/{name}") for name in NAMES}
    stored: defaultdict[str, int] = defaultdict(int)
    held, release = threading.Event(), threading.Event()

    def publisher(path, entry):
        def publish(offset, data):
            if path == f"/{NAMES[1]}":  # the check ahead of model-2 stops in its first store
                held.set()
                release.wait(WAIT)
            stored[path] += len(data)
        return publish

    first = source.open(f"/{NAMES[0]}", entries[NAMES[0]], None, publisher)
    assert held.wait(WAIT)
    opened = []
    second_open = threading.Thread(
        target=lambda: opened.append(source.open(f"/{NAMES[1]}", entries[NAMES[1]], None, publisher)))
    second_open.start()
    second_open.join(0.5)
    assert second_open.is_alive()  # waiting for the check under way, not checking on its own
    release.set()
    second_open.join(WAIT)
    assert opened
    for version in (first, *opened):
        version.let_go()
    source.close()
    encrypted_bytes = sum(t.nbytes for t in served_tensors().values())
    assert source.stats()["verified_bytes"] == 2 * encrypted_bytes  # each shard checked once
    assert stored == {f"/{name}": entries[name].size for name in NAMES}  # and published once


def _checked_in_parts(path, keys, parts):
    """verify_and_publish of `path` in `parts` ranges, each run by its own thread: what it published, per
    range, and the bytes it decrypted."""
    published: list[tuple[int, bytes]] = []
    mutex = threading.Lock()
    ranges: list[int] = []

    def publish(offset, data):
        with mutex:
            published.append((offset, bytes(data)))

    def run_all(jobs):
        ranges.append(len(jobs))
        results, failures = [None] * len(jobs), []

        def run(i):
            try:
                results[i] = jobs[i]()
            except CtfsError as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        if failures:
            raise failures[0]
        return results

    with EncryptedFile(path, keys.store) as encrypted:
        return published, ranges, served.verify_and_publish(encrypted, publish, run_all, parts), encrypted.view.size


@pytest.fixture
def large_file(tmp_path, keys, monkeypatch):
    """A v2 file of ~200 KB in chunks of an odd size, and ranges of at least 32 KiB: ranges meet inside
    pages."""
    monkeypatch.setattr(served, "VERIFY_PART_MIN", 32 * 1024)
    rng = np.random.default_rng(7)
    tensors = {"a": rng.standard_normal(30_001).astype(np.float32), "b": rng.standard_normal(19_999).astype(np.float32)}
    plain = write_plain(tmp_path / "plain.safetensors", tensors)
    path = tmp_path / "model.safetensors"
    encrypt_file(plain, path, keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    decrypt_file(path, tmp_path / "view", keys.store)
    return path, (tmp_path / "view").read_bytes(), sum(t.nbytes for t in tensors.values())


def test_a_file_checked_in_several_ranges_publishes_every_page_once_and_exactly(large_file, keys):
    path, view, encrypted_bytes = large_file
    published, ranges, decrypted, size = _checked_in_parts(path, keys, 4)
    assert ranges == [4]
    published.sort()
    page = served._PageStream.PAGE
    assert all(offset % page == 0 and (len(data) % page == 0 or offset + len(data) == size)
               for offset, data in published)  # only whole pages, but the file's last one
    assert b"".join(data for _, data in published) == view  # every byte once, in order, none missing
    assert decrypted == encrypted_bytes  # ranges meet at chunk boundaries: no chunk decrypted twice


def test_a_tampered_chunk_in_one_range_fails_the_check_and_is_never_published(large_file, keys):
    path, view, _ = large_file
    flip_file_bit(path, path.stat().st_size - 5_000)  # in the last range's data
    with pytest.raises(CtfsError, match="authentication tag mismatch"):
        _checked_in_parts(path, keys, 4)
    published = []
    with EncryptedFile(path, keys.store) as encrypted:
        # What the other ranges published is the file's true bytes; the bad chunk's pages are not among them.
        with pytest.raises(CtfsError):
            served.verify_and_publish(encrypted, lambda offset, data: published.append((offset, bytes(data))),
                                      lambda jobs: [job() for job in jobs], 4)
    assert published and all(data == view[offset:offset + len(data)] for offset, data in published)
    assert max(offset + len(data) for offset, data in published) <= len(view) - 5_000


def test_lookups_check_ahead_only_as_much_as_the_budget_holds_until_opens_or_forgets_free_it(tmp_path, keys):
    src = tmp_path / "src"
    src.mkdir()
    plain = write_plain(tmp_path / "plain.safetensors", served_tensors())
    names = ["a.safetensors", "b.safetensors", "c.safetensors"]
    for name in names:
        encrypt_file(plain, src / name, keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    source = ModelSource(src, keys.store, ChunkCache(1 << 20), SourceOptions(verify_full=True))
    entries = {name: source.child(source.root_entry(), name, f"/{name}") for name in names}
    source.lookup_ahead_budget = entries["a.safetensors"].size  # room for one file's pages
    stored: defaultdict[str, int] = defaultdict(int)
    mutex = threading.Lock()

    def publisher(path, entry):
        def publish(offset, data):
            with mutex:
                stored[path] += len(data)
        return publish

    def checked() -> set[str]:
        with mutex:
            done = {path.lstrip("/") for path, count in stored.items() if count == entries[path.lstrip("/")].size}
        return done

    def settle(expected: set[str]) -> None:
        deadline = time.monotonic() + WAIT
        while checked() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # and nothing more is on its way
        assert checked() == expected

    for name in names:
        source.looked_up(f"/{name}", entries[name], publisher)
    settle({"a.safetensors"})  # b and c do not fit while a waits for its open
    source.open("/a.safetensors", entries["a.safetensors"], None, publisher).let_go()
    source.looked_up("/b.safetensors", entries["b.safetensors"], publisher)
    settle({"a.safetensors", "b.safetensors"})  # a's open freed the room
    source.forgotten(entries["b.safetensors"])  # its node, and its pages, gone unopened
    source.looked_up("/c.safetensors", entries["c.safetensors"], publisher)
    settle(set(names))
    source.close()
    assert source.stats()["verified_bytes"] == 3 * sum(t.nbytes for t in served_tensors().values())
