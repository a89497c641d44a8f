"""Version by version: a handle (fd, mmap, safe_open) sees the file version it opened until it closes, and an
open after the source changed (renamed over, or rewritten in place with its mtime put back) sees the new one."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_keys, write_plain
from mounting import (
    CHILD_TIMEOUT,
    call_with_timeout,
    mounted,
    requires_fuse,
    write_key_file,
)

from ctfs.files.encrypt import EncryptOptions, encrypt_file

pytestmark = requires_fuse

NAME = "model.safetensors"
# Files of a few MiB: many pages and kernel requests, and more than one chunk of every tensor.
CHUNK = 64 * 1024


def version_tensors(version: int) -> dict[str, np.ndarray]:
    """Each version has its own values and its own layout (names, shapes, so offsets and size differ)."""
    rng = np.random.default_rng(version)
    if version == 1:
        return {"w": rng.standard_normal((1024, 1024)).astype(np.float32)}
    if version == 2:
        return {"a": rng.standard_normal((700, 1000)).astype(np.float32),
                "w": rng.standard_normal((900, 1100)).astype(np.float32)}
    return {"z": rng.standard_normal((1500, 512)).astype(np.float32)}


def encrypted_version(tmp: Path, keys, version: int, tensors: dict[str, np.ndarray] | None = None) -> tuple[Path, bytes]:
    """An encrypted file of `version` staged in `tmp`, and the plain bytes the mount must serve for it."""
    plain = write_plain(tmp / f"v{version}.plain", tensors or version_tensors(version))
    staged = tmp / f"v{version}.staged"
    encrypt_file(plain, staged, keys.enc, keys.sign, EncryptOptions("2", CHUNK))
    return staged, plain.read_bytes()


@pytest.fixture
def world(tmp_path):
    keys = make_keys()
    src = tmp_path / "src"
    src.mkdir()
    staged, v1 = encrypted_version(tmp_path, keys, 1)
    os.replace(staged, src / NAME)
    return tmp_path, keys, src, v1, write_key_file(tmp_path / "keys.jwk", keys)


def publish(tmp: Path, keys, src: Path, version: int) -> bytes:
    """Deploy a new version the way rsync and deploy tools do: a complete file renamed over the old."""
    staged, plain = encrypted_version(tmp, keys, version)
    os.replace(staged, src / NAME)
    return plain


def read_all(path: Path) -> bytes:
    return call_with_timeout(path.read_bytes)


# A reader holding one open file (a child process: a failed read inside an mmap is SIGBUS, which must not
# kill the test run). It reads a little, says "opened", waits for the test to publish new versions, then
# reads everything and prints what it saw.
HOLDER = """
import hashlib, mmap, os, sys
kind, path = sys.argv[1:]
if kind == "safe_open":
    from safetensors import safe_open
    with safe_open(path, framework="np") as f:
        print("opened", flush=True)
        sys.stdin.readline()
        for name in sorted(f.keys()):
            print(name, hashlib.sha256(f.get_tensor(name).tobytes()).hexdigest(), flush=True)
    sys.exit()
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
if kind == "mmap":
    mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    mapped[:100]
else:
    os.pread(fd, 4096, 0)
print("opened", flush=True)
sys.stdin.readline()
data = mapped[:] if kind == "mmap" else os.pread(fd, size + 4096, 0)  # one read of the whole file
print(len(data), os.fstat(fd).st_size, hashlib.sha256(data).hexdigest(), flush=True)
"""


def hold_while(kind: str, path: Path, meanwhile) -> str:
    """Open `path` in a holder child, run `meanwhile()`, then let the holder read; returns what it printed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "opened"
        meanwhile()
        out, err = holder.communicate("go\n", timeout=CHILD_TIMEOUT)
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == 0, f"holder ended with {holder.returncode}: {err[-2000:]}"
    return out


def digest_line(data: bytes) -> str:
    return f"{len(data)} {len(data)} {hashlib.sha256(data).hexdigest()}\n"


@pytest.mark.parametrize("kind", ["fd", "mmap"])
def test_a_holder_keeps_its_version_while_new_opens_get_each_new_one(world, kind):
    tmp, keys, src, v1, key_file = world
    with mounted(src, tmp / "mnt", "--keys", str(key_file)) as mount:
        def publish_two() -> None:
            for version in (2, 3):
                plain = publish(tmp, keys, src, version)
                assert read_all(mount.path(NAME)) == plain
                assert os.stat(mount.path(NAME)).st_size == len(plain) != len(v1)

        assert hold_while(kind, mount.path(NAME), publish_two) == digest_line(v1)
        assert read_all(mount.path(NAME)) == (tmp / "v3.plain").read_bytes()


def test_a_safe_open_holder_reads_the_tensors_of_the_version_it_opened(world):
    tmp, keys, src, v1, key_file = world
    with mounted(src, tmp / "mnt", "--keys", str(key_file)) as mount:
        def publish_two() -> None:
            publish(tmp, keys, src, 2)
            v3 = publish(tmp, keys, src, 3)
            assert read_all(mount.path(NAME)) == v3

        out = hold_while("safe_open", mount.path(NAME), publish_two)
    expected = version_tensors(1)
    assert out.splitlines() == [f"{n} {hashlib.sha256(expected[n].tobytes()).hexdigest()}" for n in sorted(expected)]


def test_a_file_rewritten_in_place_with_its_mtime_restored_is_served_new_and_whole(world):
    tmp, keys, src, v1, key_file = world
    # Same layout, other values: the encrypted file has exactly the same size.
    new_tensors = {"w": version_tensors(1)["w"] * -3}
    staged, v1b = encrypted_version(tmp, keys, 4, new_tensors)
    target = src / NAME
    assert staged.stat().st_size == target.stat().st_size and v1b != v1
    with mounted(src, tmp / "mnt", "--keys", str(key_file)) as mount:
        assert read_all(mount.path(NAME)) == v1
        before = target.stat()
        with open(target, "r+b") as out:  # same inode, same size
            out.write(staged.read_bytes())
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = target.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
        assert read_all(mount.path(NAME)) == v1b
