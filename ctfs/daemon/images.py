"""Whole decrypted files in memory: the kernel serves their reads and mmaps itself (FUSE passthrough), so no
read of such a file ever reaches the daemon.

Images are unnamed files on a tmpfs of the daemon's own that is mounted nowhere (fsopen/fsmount: no path
reaches it) and uses huge pages: a 4 KiB-page memfd took three times as long to fill, and twice as long to
read. Once written, an image is reopened read-only and its writable descriptor closed.

An image is built at the first open of a file version: every chunk decrypted and its tag checked, so a
tampered file fails at open, never in the middle of a reader's mmap. It lives while opens use it and then,
unused, until its room is needed (least recently used first). A version whose image does not fit the budget
is served through the chunk cache instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ctfs.files.encrypted import EncryptedFile
from ctfs.files.fileio import FileIdentity
from ctfs.format.view import ChunkPiece, HeaderPiece

log = logging.getLogger(__name__)

# Decryption threads per image: the ciphertext reads (which release the GIL) overlap the decryption.
BUILD_THREADS = 4
# <linux/mount.h>; the new mount API's syscall numbers are the same on every architecture.
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 6
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def private_tmpfs() -> int:
    """The root directory of a new tmpfs with huge pages, mounted nowhere; it lives while the descriptor
    returned (and any file opened on it) does. Needs CAP_SYS_ADMIN. Its size is not bounded here: the
    image store's budget bounds it."""
    config = _syscall(_SYS_FSOPEN, b"tmpfs", FSOPEN_CLOEXEC)
    try:
        for key, value in ((b"huge", b"always"), (b"size", b"0"), (b"nr_inodes", b"0"), (b"mode", b"0700")):
            _syscall(_SYS_FSCONFIG, config, FSCONFIG_SET_STRING, key, value, 0)
        _syscall(_SYS_FSCONFIG, config, FSCONFIG_CMD_CREATE, None, None, 0)
        return _syscall(_SYS_FSMOUNT, config, FSMOUNT_CLOEXEC,
                        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC)
    finally:
        os.close(config)


@dataclass
class Backing:
    """How images reach the kernel: `open(fd)` registers a backing file and returns its id, `close(id)`
    forgets it (the FUSE session's BACKING_OPEN and BACKING_CLOSE)."""

    open: Callable[[int], int]
    close: Callable[[int], None]


class MemoryImage:
    """The plain view of one file version in a read-only in-memory file, registered with the kernel."""

    __slots__ = ("identity", "fd", "size", "backing_id", "users")

    def __init__(self, identity: FileIdentity, fd: int, size: int, backing_id: int):
        self.identity = identity
        self.fd = fd
        self.size = size
        self.backing_id = backing_id
        self.users = 0  # opens using it, counted under the store's mutex


class ImageStore:
    """Images of file versions, bounded by `budget` bytes; images in use are never dropped."""

    def __init__(self, budget: int, backing: Backing, directory: int):
        self.budget = budget
        self._backing = backing
        self._directory = directory  # where images are made: private_tmpfs()
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="ctfs-ahead")
        self._images: OrderedDict[FileIdentity, MemoryImage] = OrderedDict()
        self._building: dict[FileIdentity, threading.Event] = {}
        self._reserved = 0  # bytes of images being built
        self._used = 0
        self._built = 0
        self._decrypted = 0
        self._mutex = threading.Lock()

    def acquire(self, encrypted: EncryptedFile) -> MemoryImage | None:
        """The image of `encrypted`'s version, built now if there is none, counted as used until release();
        None when it does not fit the budget. Raises what decryption raises (a tampered chunk)."""
        identity, size = encrypted.identity, encrypted.view.size
        while True:
            with self._mutex:
                image = self._images.get(identity)
                if image is not None:
                    image.users += 1
                    self._images.move_to_end(identity)
                    return image
                building = self._building.get(identity)
                if building is None:
                    if not self._make_room(size):
                        return None
                    self._reserved += size
                    self._building[identity] = threading.Event()
                    break
            building.wait()  # another open builds it: take that image, or build again if it failed
        try:
            image = self._build(encrypted)
        except BaseException:
            with self._mutex:
                self._reserved -= size
                self._building.pop(identity).set()
            raise
        with self._mutex:  # in one step with the end of the build: a waiter wakes to find the image
            self._reserved -= size
            image.users = 1
            self._images[identity] = image
            self._used += size
            self._built += 1
            self._decrypted += encrypted.encrypted_bytes
            self._building.pop(identity).set()
        return image

    def release(self, image: MemoryImage) -> None:
        with self._mutex:
            image.users -= 1

    def holds(self, identity: FileIdentity) -> bool:
        """Whether the image of this version is built or being built."""
        with self._mutex:
            return identity in self._images or identity in self._building

    def build_ahead(self, job: Callable[[], None]) -> None:
        """Run `job` (which builds an image no open asked for yet) on the one thread for such work."""
        self._ahead.submit(job)

    def drop_unused(self) -> None:
        """Forget every image no open uses (keys or policy were reloaded: the next open decrypts anew)."""
        with self._mutex:
            for identity in [i for i, image in self._images.items() if not image.users]:
                self._drop(identity)

    def stop_building(self) -> None:
        """Let the build under way finish and start no other: builds register with the FUSE session."""
        self._ahead.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.stop_building()
        with self._mutex:
            for image in self._images.values():
                os.close(image.fd)
            self._images.clear()
            self._used = 0
        os.close(self._directory)

    def stats(self) -> dict[str, int]:
        with self._mutex:
            return {"images": len(self._images), "image_bytes": self._used, "image_budget": self.budget,
                    "images_built": self._built, "image_decrypted_bytes": self._decrypted}

    def _make_room(self, size: int) -> bool:
        """Drop unused images, least recently used first, until `size` more bytes fit; False if they cannot."""
        unused = [i for i, image in self._images.items() if not image.users]
        while self._used + self._reserved + size > self.budget and unused:
            self._drop(unused.pop(0))
        return self._used + self._reserved + size <= self.budget

    def _drop(self, identity: FileIdentity) -> None:
        image = self._images.pop(identity)
        self._used -= image.size
        self._backing.close(image.backing_id)
        os.close(image.fd)

    def _build(self, encrypted: EncryptedFile) -> MemoryImage:
        size = encrypted.view.size
        writable = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self._directory)
        fd = -1
        try:
            os.posix_fallocate(writable, 0, size)  # whole huge pages at once, rather than a fault per write
            decrypt_whole_into(encrypted, writable)
            fd = os.open(f"/proc/self/fd/{writable}", os.O_RDONLY | os.O_CLOEXEC)
            backing_id = self._backing.open(fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            os.close(writable)
        return MemoryImage(encrypted.identity, fd, size, backing_id)


def decrypt_whole_into(encrypted: EncryptedFile, fd: int) -> None:
    """Write the plain view of `encrypted` into file `fd`, checking every tag; chunks are decrypted by
    BUILD_THREADS threads. The first failure stops the rest and raises."""
    encrypted.verify_empty_tensors()
    os.posix_fadvise(encrypted.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    local = threading.local()

    def decrypt(tensor: str, index: int, size: int, position: int) -> None:
        scratch = getattr(local, "scratch", None)
        if scratch is None or len(scratch) < size:
            scratch = local.scratch = memoryview(bytearray(size))
        encrypted.decrypt_chunk_into(tensor, index, scratch[:size])
        _write_all(fd, scratch[:size], position)

    with ThreadPoolExecutor(BUILD_THREADS, thread_name_prefix="ctfs-image") as pool:
        jobs = []
        try:
            position = 0
            for piece in encrypted.view.pieces(0, encrypted.view.size):
                if isinstance(piece, ChunkPiece):  # whole chunks: the range starts at 0 and spans the file
                    jobs.append(pool.submit(decrypt, piece.tensor, piece.index, piece.length, position))
                elif isinstance(piece, HeaderPiece):
                    _write_all(fd, memoryview(encrypted.view.prefix)[piece.start:piece.start + piece.length],
                               position)
                else:
                    _write_all(fd, memoryview(encrypted.read_stored(piece.data_offset, piece.length)), position)
                position += piece.length
            for job in jobs:
                job.result()
        finally:
            for job in jobs:
                job.cancel()
    os.posix_fadvise(encrypted.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the image holds it now


def _write_all(fd: int, data: memoryview, position: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written
