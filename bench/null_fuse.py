"""A FUSE daemon that does no work of its own: the ceiling of the mount on this machine.

    python bench/null_fuse.py MOUNTPOINT FILE...          # serves copies of the FILEs from memory
    python bench/null_fuse.py --disk MOUNTPOINT FILE...   # serves the FILEs by pread from the disk

It mounts with ctfs's own FUSE binding and settings (libfuse3's low-level API, the same worker threads,
read-ahead, background requests and keep_cache) and serves each FILE as MOUNTPOINT/<its name>, but decrypts
nothing. From memory, each request is one reply straight from a buffer: what the kernel, libfuse and a Python
callback cost per byte. With --disk, each request is a pread into a new buffer then the reply, as ctfs reads
its ciphertext: the same disk, minus the cryptography. mount_bench.py runs it beside ctfs, so a missed target
can be told apart from the machine's own limit. Serving real files lets safetensors load through it too.
--clone-fd and --direct try two of the levers of issue 14 on this ceiling: one FUSE channel per worker
thread, and O_DIRECT reads of the disk (into reused aligned buffers, bypassing the page cache).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import mmap
import os
import stat
import threading
from pathlib import Path

from ctfs.daemon import lowlevel as ll
from ctfs.daemon.fuse_ops import MAX_BACKGROUND, MAX_READAHEAD, mount_options
from ctfs.daemon.lifecycle import default_threads

FIRST_FILE_INO = 2
DIRECT_ALIGN = 4096


class NullOperations:
    def __init__(self, sources: list[Path], disk: bool, direct: bool = False):
        self.names = {source.name.encode(): FIRST_FILE_INO + i for i, source in enumerate(sources)}
        self.sizes = [source.stat().st_size for source in sources]
        self._direct = direct
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        self._fds = [os.open(source, flags) for source in sources] if disk else []
        self._addresses: list[int] = []
        self._memory: list[mmap.mmap] = []
        if not disk:
            for source, size in zip(sources, self.sizes):
                data = mmap.mmap(-1, max(1, size))
                with open(source, "rb") as f:
                    f.readinto(data)
                self._memory.append(data)
                self._addresses.append(ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data)))
        self._aligned = threading.local()  # O_DIRECT: one reused aligned buffer per libfuse worker
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
        return ll.fill_stat(ll.Stat(), ino=ino, mode=stat.S_IFREG | 0o444, size=self.sizes[ino - FIRST_FILE_INO],
                            nlink=1, uid=0, gid=0, times_ns=(0, 0, 0))

    def lookup(self, req, parent, name) -> None:
        ino = self.names.get(name) if parent == ll.ROOT_INO else None
        if ino is None:
            ll.libfuse.fuse_reply_err(req, errno.ENOENT)
            return
        param = ll.EntryParam(ino=ino, attr=self._stat(ino), attr_timeout=3600.0, entry_timeout=0.0)
        ll.libfuse.fuse_reply_entry(req, ctypes.byref(param))

    def forget(self, req, ino, count) -> None:
        ll.libfuse.fuse_reply_none(req)

    def getattr(self, req, ino, fi) -> None:
        ll.libfuse.fuse_reply_attr(req, ctypes.byref(self._stat(ino)), 3600.0)

    def open(self, req, ino, fi) -> None:
        fi.contents.keep_cache = 1  # as ctfs does for every open of a file version
        ll.libfuse.fuse_reply_open(req, fi)

    def read(self, req, ino, size, offset, fi) -> None:
        index = ino - FIRST_FILE_INO
        size = max(0, min(size, self.sizes[index] - offset))
        if self._memory:
            ll.libfuse.fuse_reply_buf(req, self._addresses[index] + offset, size)
        elif self._direct:
            self._read_direct(req, index, size, offset)
        else:
            buf = bytearray(size)
            count = os.preadv(self._fds[index], [buf], offset)
            ll.libfuse.fuse_reply_buf(req, ctypes.addressof((ctypes.c_char * size).from_buffer(buf)), count)

    def _read_direct(self, req, index: int, size: int, offset: int) -> None:
        """O_DIRECT wants aligned offsets, lengths and buffers: read the aligned span around the request."""
        start = offset - offset % DIRECT_ALIGN
        span = -(-(offset + size - start) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = getattr(self._aligned, "buf", None)
        if buf is None or len(buf) < span:
            buf = self._aligned.buf = mmap.mmap(-1, span)
            self._aligned.address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        count = os.preadv(self._fds[index], [memoryview(buf)[:span]], start)
        skip = offset - start
        ll.libfuse.fuse_reply_buf(req, self._aligned.address + skip, max(0, min(size, count - skip)))

    def release(self, req, ino, fi) -> None:
        ll.libfuse.fuse_reply_err(req, 0)

    def opendir(self, req, ino, fi) -> None:
        ll.libfuse.fuse_reply_open(req, fi)

    def readdir(self, req, ino, size, offset, fi) -> None:
        listing = [(b".", stat.S_IFDIR), (b"..", stat.S_IFDIR)] + [(name, stat.S_IFREG) for name in self.names]
        ll.reply_directory(req, listing, size, offset)

    def releasedir(self, req, ino, fi) -> None:
        ll.libfuse.fuse_reply_err(req, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk", action="store_true", help="pread the FILEs from the disk instead of memory copies")
    parser.add_argument("--direct", action="store_true", help="with --disk: O_DIRECT reads (no page cache)")
    parser.add_argument("--clone-fd", action="store_true", help="one /dev/fuse channel per worker thread")
    parser.add_argument("mountpoint")
    parser.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    ops = NullOperations(args.files, args.disk, args.direct)
    session = ll.Session(ops.struct, mount_options(fsname="null", subtype="null", allow_other=False))
    session.mount(args.mountpoint)
    try:
        session.serve(max_threads=default_threads(), clone_fd=args.clone_fd)
    finally:
        session.close()


if __name__ == "__main__":
    main()
