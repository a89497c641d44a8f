"""Reading source files: exact positional reads, the safetensors header, and a file version's identity."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from dataclasses import dataclass

from ctfs.errors import FormatError
from ctfs.format.header import (
    HEADER_PREFIX_SIZE,
    Header,
    parse_header,
    read_header_size,
)


@dataclass(frozen=True)
class FileIdentity:
    """What makes two opens see the same bytes: a changed source gets a new identity. The ctime is in it
    because user space can put back a rewritten file's mtime (os.utime) but never its ctime."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def pread_exact(fd: int, length: int, offset: int, source: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise FormatError(f"{source}: file shrank while being read")
    return data


def pread_exact_into(fd: int, out: memoryview, offset: int, source: str) -> None:
    """Fill `out` from `offset`, with no intermediate bytes object."""
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            raise FormatError(f"{source}: file shrank while being read")
        done += n


# O_DIRECT wants the offset, the length and the buffer aligned to the device's logical block: a page is a
# multiple of every block size Linux takes for it.
DIRECT_ALIGN = mmap.PAGESIZE
# A transparent huge page (x86-64, and arm64 with 4 KiB pages). A disk request holds a bounded number of
# physically contiguous segments (254 on this VM's virtio disk): in 4 KiB pages a direct read of a 2 MiB chunk
# became 2-3 requests of ~0.8 MiB, in a huge page one, and the disk served twice the bytes per second.
HUGE_PAGE = 2 * 1024 * 1024
# cachestat(2), Linux 6.5+: how much of a range the page cache holds, without reading or faulting anything.
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


def _all_cached(fd: int, offset: int, length: int) -> bool | None:
    """Whether the page cache holds every page of the range; None where the kernel cannot say."""
    if _SYS_CACHESTAT is None:
        return None
    first = offset - offset % mmap.PAGESIZE
    span = _CachestatRange(first, offset + length - first)
    stat = _Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        return None
    return stat.nr_cache >= -(-span.len // mmap.PAGESIZE)


class SourceReader:
    """Positional reads of one source file version that leave the page cache as they find it: a range it holds
    entirely is copied from it, any other is read from the device straight into the caller's buffer
    (O_DIRECT). The mount keeps what it serves in the page cache as plaintext; caching the ciphertext beside it
    would hold a model twice, and copying freshly read pages out of the cache costs more CPU than decrypting
    them (docs/performance.md). Where the kernel cannot tell what is cached (before Linux 6.5), or the file
    system refuses O_DIRECT, every read goes through the page cache."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self._direct = _open_direct(fd, path) if _all_cached(fd, 0, 1) is not None else -1
        self._direct_works = self._direct >= 0

    @staticmethod
    def buffer(length: int) -> memoryview:
        """A buffer with room for `length` bytes read at any offset: private memory starting on a huge-page
        boundary, its whole huge pages backed by huge pages where the kernel grants them."""
        room = length + 2 * DIRECT_ALIGN
        mapping = mmap.mmap(-1, room + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        skip = -ctypes.addressof(ctypes.c_char.from_buffer(mapping)) % HUGE_PAGE
        if room >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE, skip, room - room % HUGE_PAGE)
        return memoryview(mapping)[skip:skip + room]  # the mapping lives as long as the view

    def read_into(self, buf: memoryview, offset: int, length: int, source: str) -> int:
        """Read `length` bytes from `offset` into `buf` (made by `buffer`); returns where in it they start."""
        if self._direct_works and _all_cached(self.fd, offset, length) is False:
            try:
                return self._read_direct(buf, offset, length, source)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_works = False  # an alignment this file system does not take
        pread_exact_into(self.fd, buf[:length], offset, source)
        return 0

    def _read_direct(self, buf: memoryview, offset: int, length: int, source: str) -> int:
        first = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        done = 0
        while first + done < offset + length:
            n = os.preadv(self._direct, [buf[done:end - first]], first + done)
            if n == 0:
                raise FormatError(f"{source}: file shrank while being read")
            done += n
        return offset - first

    def close(self) -> None:
        """Close the reader's own descriptor (the caller closes `fd`)."""
        direct, self._direct = self._direct, -1
        if direct >= 0:
            os.close(direct)


def _open_direct(fd: int, path: str) -> int:
    """A second descriptor of `fd`'s file that reads past the page cache, or -1 where there is none."""
    try:
        direct = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1
    same, opened = os.fstat(direct), os.fstat(fd)
    if (same.st_dev, same.st_ino) != (opened.st_dev, opened.st_ino):  # the path names another file by now
        os.close(direct)
        return -1
    return direct


def read_header(fd: int, size: int, source: str) -> Header:
    header_size = read_header_size(os.pread(fd, HEADER_PREFIX_SIZE, 0), source)
    if HEADER_PREFIX_SIZE + header_size > size:
        raise FormatError(f"{source}: header of {header_size} bytes runs past the end of the file (truncated)")
    raw = pread_exact(fd, header_size, HEADER_PREFIX_SIZE, source)
    return parse_header(raw, file_size=size, source=source)
