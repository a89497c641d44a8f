"""A FUSE daemon that does no work of its own: the ceiling of the mount on this machine.

    python bench/null_fuse.py MOUNTPOINT FILE          # serves a copy of FILE from memory
    python bench/null_fuse.py --disk MOUNTPOINT FILE   # serves FILE by pread from the disk

It mounts with ctfs's own FUSE binding and settings (libfuse3's low-level API, the same worker threads,
read-ahead, background requests and keep_cache) and serves FILE as MOUNTPOINT/<its name>, but decrypts
nothing. From memory, each request is one reply straight from a buffer: what the kernel, libfuse and a Python
callback cost per byte. With --disk, each request is a pread into a buffer then the reply, as ctfs reads its
ciphertext: the same disk, minus the cryptography. mount_bench.py runs it beside ctfs, so a missed target
can be told apart from the machine's own limit. Serving a real file lets safetensors load through it too.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import mmap
import os
import stat
from pathlib import Path

from ctfs.daemon import lowlevel as ll
from ctfs.daemon.fuse_ops import MAX_BACKGROUND, MAX_READAHEAD, mount_options
from ctfs.daemon.lifecycle import default_threads

FILE_INO = 2


class NullOperations:
    def __init__(self, source: Path, disk: bool):
        self.name = source.name.encode()
        self.size = source.stat().st_size
        self._fd = os.open(source, os.O_RDONLY) if disk else -1
        self._data = None
        if not disk:
            self._data = mmap.mmap(-1, max(1, self.size))
            with open(source, "rb") as f:
                f.readinto(self._data)
            self._address = ctypes.addressof((ctypes.c_char * len(self._data)).from_buffer(self._data))
        names = ("init", "lookup", "forget", "getattr", "open", "read", "release", "opendir", "readdir",
                 "releasedir")
        self._callbacks = {name: kind(getattr(self, name)) for name, kind in ll.LowLevelOps._fields_ if name in names}
        self.struct = ll.LowLevelOps(**self._callbacks)

    def init(self, userdata, conn) -> None:
        conn.contents.max_readahead = MAX_READAHEAD
        conn.contents.max_background = MAX_BACKGROUND
        conn.contents.congestion_threshold = MAX_BACKGROUND * 3 // 4

    def _stat(self, ino: int) -> ll.Stat:
        if ino == ll.ROOT_INO:
            return ll.fill_stat(ll.Stat(), ino=ino, mode=stat.S_IFDIR | 0o555, size=4096, nlink=2, uid=0, gid=0,
                                times_ns=(0, 0, 0))
        return ll.fill_stat(ll.Stat(), ino=ino, mode=stat.S_IFREG | 0o444, size=self.size, nlink=1, uid=0, gid=0,
                            times_ns=(0, 0, 0))

    def lookup(self, req, parent, name) -> None:
        if parent != ll.ROOT_INO or name != self.name:
            ll.libfuse.fuse_reply_err(req, errno.ENOENT)
            return
        param = ll.EntryParam(ino=FILE_INO, attr=self._stat(FILE_INO), attr_timeout=3600.0, entry_timeout=0.0)
        ll.libfuse.fuse_reply_entry(req, ctypes.byref(param))

    def forget(self, req, ino, count) -> None:
        ll.libfuse.fuse_reply_none(req)

    def getattr(self, req, ino, fi) -> None:
        ll.libfuse.fuse_reply_attr(req, ctypes.byref(self._stat(ino)), 3600.0)

    def open(self, req, ino, fi) -> None:
        fi.contents.keep_cache = 1  # as ctfs does for every open of a file version
        ll.libfuse.fuse_reply_open(req, fi)

    def read(self, req, ino, size, offset, fi) -> None:
        size = max(0, min(size, self.size - offset))
        if self._data is not None:
            ll.libfuse.fuse_reply_buf(req, self._address + offset, size)
            return
        buf = bytearray(size)
        count = os.preadv(self._fd, [buf], offset)
        ll.reply_segments(req, [memoryview(buf)[:count]])

    def release(self, req, ino, fi) -> None:
        ll.libfuse.fuse_reply_err(req, 0)

    def opendir(self, req, ino, fi) -> None:
        ll.libfuse.fuse_reply_open(req, fi)

    def readdir(self, req, ino, size, offset, fi) -> None:
        ll.reply_directory(req, [(b".", stat.S_IFDIR), (b"..", stat.S_IFDIR), (self.name, stat.S_IFREG)], size, offset)

    def releasedir(self, req, ino, fi) -> None:
        ll.libfuse.fuse_reply_err(req, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk", action="store_true", help="pread FILE from the disk instead of a memory copy")
    parser.add_argument("mountpoint")
    parser.add_argument("file", type=Path)
    args = parser.parse_args()
    ops = NullOperations(args.file, args.disk)
    session = ll.Session(ops.struct, mount_options(fsname="null", subtype="null", allow_other=False))
    session.mount(args.mountpoint)
    try:
        session.serve(max_threads=default_threads(), clone_fd=False)
    finally:
        session.close()


if __name__ == "__main__":
    main()
