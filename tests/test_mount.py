"""A mount mirrors its source read-only, each encrypted file as its exact plain view, for any read and any
number of concurrent readers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import evict, flip_file_bit, make_keys, resident_bytes, seeded_tensors, write_plain
from hypothesis import given, settings
from hypothesis import strategies as st
from mounting import (
    CHILD_TIMEOUT,
    CONSUMERS_SCRIPT,
    SERVED_CHUNK_SIZE,
    SERVED_NAMES,
    call_with_timeout,
    make_served_dir,
    mounted,
    requires_fuse,
    served_tensors,
    wait_until,
    write_key_file,
)

from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file

pytestmark = requires_fuse


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mount")
    keys = make_keys()
    src, views = make_served_dir(root, keys)
    return root, src, {name: path.read_bytes() for name, path in views.items()}, write_key_file(root / "keys.jwk", keys)


@pytest.fixture(scope="module")
def served(served_dir):
    root, src, plain, key_file = served_dir
    with mounted(src, root / "mnt", "--keys", str(key_file)) as mount:
        yield mount, plain


def test_listing_sizes_and_modes_are_right_before_any_open(served_dir, tmp_path):
    root, src, plain, key_file = served_dir
    with mounted(src, tmp_path / "mnt", "--keys", str(key_file)) as mount:
        assert sorted(os.listdir(mount.mountpoint)) == sorted(os.listdir(src))
        for name, data in plain.items():
            st_ = os.stat(mount.path(name))
            assert st_.st_size == len(data), name
            assert stat.S_IMODE(st_.st_mode) == 0o444 and stat.S_ISREG(st_.st_mode)
        assert mount.path("config.json").read_bytes() == (src / "config.json").read_bytes()


def test_the_mount_refuses_writes(served):
    mount, _ = served
    attempts = [(name, flags) for name in ("ctfs-v2.safetensors", "config.json")
                for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC)]
    for name, flags in [*attempts, ("new-file", os.O_WRONLY | os.O_CREAT)]:
        with pytest.raises(OSError) as refused:
            os.open(mount.path(name), flags, 0o644)
        assert refused.value.errno == errno.EROFS, (name, flags)


def pread_all(path, offset: int, size: int, direct: bool) -> bytes:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_reads_equal_the_plain_slice(served, data):
    mount, plain = served
    name = data.draw(st.sampled_from(SERVED_NAMES), label="file")
    expected = plain[name]
    offset = data.draw(st.integers(0, len(expected) + 10), label="offset")
    size = data.draw(st.integers(0, 4 * SERVED_CHUNK_SIZE) | st.integers(0, len(expected)), label="size")
    # O_DIRECT reads reach the daemon every time, unaligned; buffered ones mostly come from the page cache.
    direct = data.draw(st.booleans(), label="O_DIRECT")
    got = call_with_timeout(lambda: pread_all(mount.path(name), offset, size, direct))
    assert got == expected[offset:offset + size]


PROCESSES = 4
THREADS_PER_PROCESS = 6


def test_processes_and_threads_reading_the_same_and_different_files_at_once_see_exact_bytes(served_dir, tmp_path):
    root, src, plain, key_file = served_dir
    # A cold mount with a cache smaller than the files: chunks are evicted, decrypted again and waited for.
    with mounted(src, tmp_path / "mnt", "--keys", str(key_file), "--cache-size", "64K") as mount:
        readers = [
            subprocess.Popen([sys.executable, str(CONSUMERS_SCRIPT), "threads", str(mount.mountpoint),
                              str(THREADS_PER_PROCESS), *SERVED_NAMES[i:], *SERVED_NAMES[:i]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(PROCESSES)
        ]
        try:
            outputs = [reader.communicate(timeout=CHILD_TIMEOUT) for reader in readers]
        finally:
            for reader in readers:
                reader.kill()
        assert os.stat(mount.path(SERVED_NAMES[0])).st_size == len(plain[SERVED_NAMES[0]])  # still serving
    want = {name: [hashlib.sha256(data).hexdigest()] for name, data in plain.items()}
    for reader, (out, err) in zip(readers, outputs):
        assert reader.returncode == 0, err
        assert json.loads(out) == {"digests": want, "errors": []}


def test_plaintext_tensors_of_a_partially_encrypted_file_are_served_with_a_warning(tmp_path):
    keys = make_keys()
    src = tmp_path / "src"
    src.mkdir()
    plain = write_plain(tmp_path / "plain.safetensors", seeded_tensors(0))
    encrypt_file(plain, src / "partial.safetensors", keys.enc, keys.sign,
                 EncryptOptions(tensors=[next(iter(seeded_tensors(0)))]))
    decrypt_file(src / "partial.safetensors", tmp_path / "view", keys.store)
    with mounted(src, tmp_path / "mnt", "--keys", str(write_key_file(tmp_path / "keys.jwk", keys))) as mount:
        assert mount.path("partial.safetensors").read_bytes() == (tmp_path / "view").read_bytes()
        assert "stored in plaintext are not authenticated" in mount.log()


@pytest.mark.parametrize("verify", ["open", "full"])
def test_a_cold_read_through_the_mount_leaves_the_model_cached_once_as_plaintext(tmp_path, verify):
    """Chunks whose ciphertext is not in the page cache are read from the disk past it: the kernel caches what
    the mount serves (plaintext), and the source file's pages hold no second copy of the model beside it."""
    keys = make_keys()
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    plain = write_plain(tmp_path / "plain.safetensors", {"w": rng.standard_normal(1_000_003).astype(np.float32)})
    encrypted = src / "model.safetensors"
    encrypt_file(plain, encrypted, keys.enc, keys.sign, EncryptOptions("2", 100_003))
    decrypt_file(encrypted, tmp_path / "view", keys.store)
    view = (tmp_path / "view").read_bytes()
    with mounted(src, tmp_path / "mnt", "--keys", str(write_key_file(tmp_path / "keys.jwk", keys)),
                 "--verify", verify) as mount:
        evict(encrypted)
        assert call_with_timeout(mount.path("model.safetensors").read_bytes) == view
        served = resident_bytes(encrypted)
    # The header (read at open, through the page cache, with the kernel's first read-ahead) at most.
    assert served <= 64 * 1024 < encrypted.stat().st_size // 50


def test_verify_full_decrypts_each_chunk_once_for_the_check_and_the_readers(served_dir, tmp_path):
    """The tags checked at the first open are the bytes served: the verified plain file goes into the
    kernel's page cache, so whole-file reads and an mmap after it decrypt nothing more."""
    root, src, plain, key_file = served_dir
    name = SERVED_NAMES[1]  # v2, chunks of an odd size: pages straddle chunks
    with mounted(src, tmp_path / "mnt", "--keys", str(key_file), "--verify", "full") as mount:
        assert call_with_timeout(mount.path(name).read_bytes) == plain[name]
        run = subprocess.run([sys.executable, str(CONSUMERS_SCRIPT), "memmap_r", str(mount.path(name))],
                             capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["sha256"] == hashlib.sha256(plain[name]).hexdigest()
        stats = json.loads(os.getxattr(mount.mountpoint, "user.ctfs.stats"))
    encrypted_bytes = sum(t.nbytes for t in served_tensors().values())
    assert stats["verified_bytes"] == encrypted_bytes  # one pass, the check's ...
    assert stats["decrypted_bytes"] == 0  # ... and the reads were served from what it verified


def test_verify_full_checks_a_large_file_in_ranges_at_once_and_serves_exactly_what_they_checked(tmp_path):
    """A file of several check ranges (VERIFY_PART_MIN each) is checked by as many threads; every page they
    store, those two ranges share included, holds the file's true bytes, and a tampered chunk in any range
    fails the open."""
    keys = make_keys()
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    tensors = {"embed": rng.standard_normal(7_000_001).astype(np.float32),
               "head": rng.standard_normal(3_000_007).astype(np.float32)}  # 40 MB: two ranges or more
    plain = write_plain(tmp_path / "plain.safetensors", tensors)
    for name in ("good.safetensors", "bad.safetensors"):
        encrypt_file(plain, src / name, keys.enc, keys.sign, EncryptOptions("2", 1_000_003))
    bad_size = (src / "bad.safetensors").stat().st_size
    flip_file_bit(src / "bad.safetensors", bad_size - 1_000)  # in the last range
    decrypt_file(src / "good.safetensors", tmp_path / "view", keys.store)
    view = (tmp_path / "view").read_bytes()
    key_file = write_key_file(tmp_path / "keys.jwk", keys)
    with mounted(src, tmp_path / "mnt", "--keys", str(key_file), "--verify", "full") as mount:
        assert call_with_timeout(mount.path("good.safetensors").read_bytes) == view
        with pytest.raises(OSError) as refused:
            call_with_timeout(mount.path("bad.safetensors").read_bytes)
        stats = json.loads(os.getxattr(mount.mountpoint, "user.ctfs.stats"))
        log = mount.log()
    assert refused.value.errno == errno.EIO
    assert "open /bad.safetensors refused (EIO)" in log and "authentication tag mismatch" in log
    encrypted_bytes = sum(t.nbytes for t in tensors.values())
    assert stats["decrypted_bytes"] == 0  # every page the reader got was stored by a range's check
    assert stats["verified_bytes"] == encrypted_bytes  # the good file's chunks, each decrypted once


def test_verify_full_stores_a_looked_up_files_pages_even_when_its_reader_is_slow_to_run_again(tmp_path):
    """A lookup starts the file's check once its reply is written, but the kernel makes the node's inode in
    the task that looked it up, when that task runs again. Readers starved of CPU (every core busy, the
    reader at nice 19) run again late: the check's pages must still land in the page cache, so that the
    reads decrypt nothing a second time."""
    keys = make_keys()
    src = tmp_path / "src"
    src.mkdir()
    weights = np.random.default_rng(5).standard_normal(2_000_000).astype(np.float32)  # 8 MB: two blocks
    plain = write_plain(tmp_path / "plain.safetensors", {"weight": weights})
    names = [f"model-{i}.safetensors" for i in range(6)]
    for name in names:
        encrypt_file(plain, src / name, keys.enc, keys.sign, EncryptOptions("2", 1_000_003))
    decrypt_file(src / names[0], tmp_path / "view", keys.store)
    view = (tmp_path / "view").read_bytes()
    key_file = write_key_file(tmp_path / "keys.jwk", keys)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        with mounted(src, tmp_path / "mnt", "--keys", str(key_file), "--verify", "full") as mount:
            for name in names:
                read = subprocess.run(["nice", "-n", "19", "cat", str(mount.path(name))], capture_output=True,
                                      timeout=CHILD_TIMEOUT, check=True)
                assert read.stdout == view, name
            stats = json.loads(os.getxattr(mount.mountpoint, "user.ctfs.stats"))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert stats["verified_bytes"] == len(names) * weights.nbytes
    assert stats["decrypted_bytes"] == 0  # every page read was one a check stored


def test_verify_full_checks_files_as_the_kernel_looks_them_up_so_their_opens_find_them_checked(tmp_path):
    """Loaders look every shard up, then read them (vLLM builds its engine in between). With --verify full a
    lookup starts the file's check, into its node's page cache: the opens then wait for no check and the
    reads decrypt nothing. A tampered shard is found then too, and its own open still fails."""
    keys = make_keys()
    src = tmp_path / "src"
    src.mkdir()
    plain = write_plain(tmp_path / "plain.safetensors", served_tensors())
    names = ["model-1.safetensors", "model-2.safetensors", "model-3.safetensors", "model-4.safetensors"]
    for name in names:
        encrypt_file(plain, src / name, keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    flip_file_bit(src / names[3], (src / names[3]).stat().st_size - 1000)
    weight_map = {f"w{i}": name for i, name in enumerate(names)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    decrypt_file(src / names[0], tmp_path / "view", keys.store)
    view = (tmp_path / "view").read_bytes()
    encrypted_bytes = sum(t.nbytes for t in served_tensors().values())

    def stats() -> dict:
        return json.loads(os.getxattr(mount.mountpoint, "user.ctfs.stats"))

    key_file = write_key_file(tmp_path / "keys.jwk", keys)
    with mounted(src, tmp_path / "mnt", "--keys", str(key_file), "--verify", "full") as mount:
        for name in names:
            os.stat(mount.path(name))  # as loaders do before reading
        assert wait_until(lambda: stats()["verified_bytes"] == 3 * encrypted_bytes)
        for name in names[:3]:
            assert call_with_timeout(mount.path(name).read_bytes) == view
        for _ in range(2):  # its open refused from what the check found, every time
            with pytest.raises(OSError) as refused:
                call_with_timeout(mount.path(names[3]).read_bytes)
            assert refused.value.errno == errno.EIO
        counters = stats()
        refusals = [line for line in mount.log().splitlines() if "model-4" in line]
    assert counters["verified_bytes"] == 3 * encrypted_bytes and counters["decrypted_bytes"] == 0
    assert len(refusals) == 2 and all("refused (EIO)" in line and "authentication tag mismatch" in line
                                      for line in refusals)
