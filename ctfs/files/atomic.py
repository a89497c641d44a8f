"""Write files atomically: a temporary file beside the target, fsync, rename; nothing partial survives."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str], mode: int = 0o600) -> Iterator[int]:
    """Yield a file descriptor whose contents replace `target` only if the block completes."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".ctfs-tmp")
    try:
        os.fchmod(fd, mode)
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


# os.pwritev takes at most IOV_MAX buffers per call (1024 on Linux).
IOV_BATCH = 1024


def write_all_vectored(fd: int, buffers: list, offset: int) -> None:
    """Write `buffers` back to back at `offset` with as few system calls as possible, no joining copy."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        batch = views[:IOV_BATCH]
        written = os.pwritev(fd, batch, offset)
        offset += written
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0
