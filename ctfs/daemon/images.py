"""Whole decrypted files in sealed memory files: the kernel serves their reads and mmaps itself (FUSE
passthrough), so no read of such a file ever reaches the daemon.

An image is built at the first open of a file version: every chunk decrypted and its tag checked, so a
tampered file fails at open, never in the middle of a reader's mmap. It lives while opens use it and then,
unused, until its room is needed (least recently used first). A version whose image does not fit the budget
is served through the chunk cache instead.
"""

from __future__ import annotations

import fcntl
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
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


@dataclass
class Backing:
    """How images reach the kernel: `open(fd)` registers a backing file and returns its id, `close(id)`
    forgets it (the FUSE session's BACKING_OPEN and BACKING_CLOSE)."""

    open: Callable[[int], int]
    close: Callable[[int], None]


class MemoryImage:
    """The plain view of one file version in a sealed memory file, registered with the kernel."""

    __slots__ = ("identity", "fd", "size", "backing_id", "users")

    def __init__(self, identity: FileIdentity, fd: int, size: int, backing_id: int):
        self.identity = identity
        self.fd = fd
        self.size = size
        self.backing_id = backing_id
        self.users = 0  # opens using it, counted under the store's mutex


class ImageStore:
    """Images of file versions, bounded by `budget` bytes; images in use are never dropped."""

    def __init__(self, budget: int, backing: Backing):
        self.budget = budget
        self._backing = backing
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
        finally:
            with self._mutex:
                self._reserved -= size
                self._building.pop(identity).set()
        with self._mutex:
            image.users = 1
            self._images[identity] = image
            self._used += size
            self._built += 1
            self._decrypted += encrypted.encrypted_bytes
        return image

    def release(self, image: MemoryImage) -> None:
        with self._mutex:
            image.users -= 1

    def drop_unused(self) -> None:
        """Forget every image no open uses (keys or policy were reloaded: the next open decrypts anew)."""
        with self._mutex:
            for identity in [i for i, image in self._images.items() if not image.users]:
                self._drop(identity)

    def close(self) -> None:
        with self._mutex:
            for image in self._images.values():
                os.close(image.fd)
            self._images.clear()
            self._used = 0

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
        fd = os.memfd_create("ctfs-image", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, encrypted.view.size)
            decrypt_whole_into(encrypted, fd)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            backing_id = self._backing.open(fd)
        except BaseException:
            os.close(fd)
            raise
        return MemoryImage(encrypted.identity, fd, encrypted.view.size, backing_id)


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


def _write_all(fd: int, data: memoryview, position: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written
