"""A FUSE daemon that does nothing but serve bytes from memory: the ceiling of the mount on this machine.

    python bench/null_fuse.py MOUNTPOINT FILE      # serves a copy of FILE as MOUNTPOINT/<its name>

It copies FILE into memory at start, then mounts with ctfs's own FUSE settings (libfuse3, the same
read-ahead, background requests, keep_cache and reads copied straight into libfuse's buffer) but reads
no disk and decrypts nothing: each request is one memmove. What the kernel, libfuse and a Python
callback cost per byte is all it measures, so mount_bench.py runs it beside ctfs to show how much of
the gap to a target is the machine's. Serving a real file lets safetensors load through it too.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import stat
import sys
from pathlib import Path

from ctfs.daemon.fuse_ops import MAX_BACKGROUND, MAX_READAHEAD, DirectReadFUSE, mfusepy


class NullOperations(mfusepy.Operations):
    use_ns = True

    def __init__(self, source: Path):
        self.name = "/" + source.name
        self.size = source.stat().st_size
        self._data = mmap.mmap(-1, max(1, self.size))
        with open(source, "rb") as f:
            f.readinto(self._data)
        self._address = ctypes.addressof((ctypes.c_char * len(self._data)).from_buffer(self._data))

    def init_with_config(self, conn, config) -> None:
        conn.max_readahead = MAX_READAHEAD
        conn.max_background = MAX_BACKGROUND
        conn.congestion_threshold = MAX_BACKGROUND * 3 // 4
        config.kernel_cache = 0

    def getattr(self, path: str, fh=None) -> dict[str, int]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        if path == self.name:
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": self.size}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh) -> list[str]:
        return [".", "..", self.name[1:]]

    def open(self, path: str, fi) -> int:
        fi.fh = 1
        fi.keep_cache = 1  # as ctfs does for a source unchanged since its last open
        return 0

    def read(self, fi, address: int, size: int, offset: int) -> int:
        """Called by DirectReadFUSE with libfuse's buffer address."""
        size = max(0, min(size, self.size - offset))
        ctypes.memmove(address, self._address + offset, size)
        return size


def main() -> None:
    mountpoint, source = sys.argv[1], Path(sys.argv[2])
    DirectReadFUSE(NullOperations(source), mountpoint, raw_fi=True, foreground=True, ro=True,
                   fsname="null", subtype="null")


if __name__ == "__main__":
    main()
