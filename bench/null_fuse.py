"""A FUSE daemon that does nothing but serve bytes from memory: the ceiling of the mount on this machine.

    python bench/null_fuse.py MOUNTPOINT SIZE      # serves MOUNTPOINT/null, SIZE bytes, in the foreground

It mounts with ctfs's own FUSE settings (libfuse3, the same read-ahead, background requests, keep_cache and
reads copied straight into libfuse's buffer) but reads no disk and decrypts nothing: each request is one
memmove out of a 2 MiB buffer. What the kernel, libfuse and a Python callback cost per byte is all it
measures, so mount_bench.py runs it beside ctfs to show how much of the gap to a target is the machine's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys

from ctfs.daemon.fuse_ops import MAX_BACKGROUND, MAX_READAHEAD, DirectReadFUSE, mfusepy

PATTERN_SIZE = 2 * 1024 * 1024
NAME = "/null"


class NullOperations(mfusepy.Operations):
    use_ns = True

    def __init__(self, size: int):
        self.size = size
        self._pattern = ctypes.create_string_buffer(os.urandom(PATTERN_SIZE), PATTERN_SIZE)
        self._address = ctypes.addressof(self._pattern)

    def init_with_config(self, conn, config) -> None:
        conn.max_readahead = MAX_READAHEAD
        conn.max_background = MAX_BACKGROUND
        conn.congestion_threshold = MAX_BACKGROUND * 3 // 4
        config.kernel_cache = 0

    def getattr(self, path: str, fh=None) -> dict[str, int]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        if path == NAME:
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": self.size}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh) -> list[str]:
        return [".", "..", NAME[1:]]

    def open(self, path: str, fi) -> int:
        fi.fh = 1
        fi.keep_cache = 1  # as ctfs does for a source unchanged since its last open
        return 0

    def read(self, fi, address: int, size: int, offset: int) -> int:
        """Called by DirectReadFUSE with libfuse's buffer address."""
        size = max(0, min(size, self.size - offset))
        done = 0
        while done < size:
            skip = (offset + done) % PATTERN_SIZE
            n = min(size - done, PATTERN_SIZE - skip)
            ctypes.memmove(address + done, self._address + skip, n)
            done += n
        return size


def main() -> None:
    mountpoint, size = sys.argv[1], int(sys.argv[2])
    DirectReadFUSE(NullOperations(size), mountpoint, raw_fi=True, foreground=True, ro=True,
                   fsname="null", subtype="null")


if __name__ == "__main__":
    main()
