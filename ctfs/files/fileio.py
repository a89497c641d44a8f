"""Reading source files: exact positional reads, the safetensors header, and a file version's identity."""

from __future__ import annotations

import os
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


def read_header(fd: int, size: int, source: str) -> Header:
    header_size = read_header_size(os.pread(fd, HEADER_PREFIX_SIZE, 0), source)
    if HEADER_PREFIX_SIZE + header_size > size:
        raise FormatError(f"{source}: header of {header_size} bytes runs past the end of the file (truncated)")
    raw = pread_exact(fd, header_size, HEADER_PREFIX_SIZE, source)
    return parse_header(raw, file_size=size, source=source)
