"""A thin ctypes binding of libfuse3's low-level API: the structs, the replies, and a multi-threaded session.

Why low-level: the kernel keeps a page cache per node id, and only the low-level API lets the daemon choose
node ids, so each version of a file gets its own (docs/format.md is silent on this; FIELD-NOTES: versions and
inodes). Why not pyfuse3: it runs every handler and every reply on one trio thread; here libfuse's own
worker threads call in, and each reply (the kernel's copy of the data) runs with the GIL released.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_double,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint,
    c_uint32,
    c_uint64,
    c_ulong,
    c_void_p,
)
from ctypes.util import find_library

from ctfs.errors import CtfsError

fuse_ino_t = c_uint64
fuse_req_t = c_void_p
off_t = c_int64
ROOT_INO = 1


class Timespec(Structure):
    _fields_ = [("tv_sec", c_int64), ("tv_nsec", c_int64)]


if platform.machine() in ("x86_64", "AMD64"):
    class Stat(Structure):
        _fields_ = [("st_dev", c_uint64), ("st_ino", c_uint64), ("st_nlink", c_uint64), ("st_mode", c_uint32),
                    ("st_uid", c_uint32), ("st_gid", c_uint32), ("_pad0", c_int32), ("st_rdev", c_uint64),
                    ("st_size", c_int64), ("st_blksize", c_int64), ("st_blocks", c_int64),
                    ("st_atim", Timespec), ("st_mtim", Timespec), ("st_ctim", Timespec), ("_reserved", c_int64 * 3)]
elif platform.machine() in ("aarch64", "arm64"):
    class Stat(Structure):  # the generic Linux layout
        _fields_ = [("st_dev", c_uint64), ("st_ino", c_uint64), ("st_mode", c_uint32), ("st_nlink", c_uint32),
                    ("st_uid", c_uint32), ("st_gid", c_uint32), ("st_rdev", c_uint64), ("_pad1", c_uint64),
                    ("st_size", c_int64), ("st_blksize", c_int32), ("_pad2", c_int32), ("st_blocks", c_int64),
                    ("st_atim", Timespec), ("st_mtim", Timespec), ("st_ctim", Timespec), ("_reserved", c_int32 * 2)]
else:
    raise ImportError(f"ctfs's FUSE binding knows struct stat on x86_64 and aarch64, not {platform.machine()}")


class StatVfs(Structure):
    _fields_ = [("f_bsize", c_ulong), ("f_frsize", c_ulong), ("f_blocks", c_uint64), ("f_bfree", c_uint64),
                ("f_bavail", c_uint64), ("f_files", c_uint64), ("f_ffree", c_uint64), ("f_favail", c_uint64),
                ("f_fsid", c_ulong), ("f_flag", c_ulong), ("f_namemax", c_ulong), ("_spare", c_int * 6)]


class FileInfo(Structure):
    """struct fuse_file_info of libfuse 3.14."""

    _fields_ = [("flags", c_int), ("writepage", c_uint, 1), ("direct_io", c_uint, 1), ("keep_cache", c_uint, 1),
                ("flush", c_uint, 1), ("nonseekable", c_uint, 1), ("flock_release", c_uint, 1),
                ("cache_readdir", c_uint, 1), ("noflush", c_uint, 1), ("padding", c_uint, 24),
                ("padding2", c_uint, 32), ("fh", c_uint64), ("lock_owner", c_uint64), ("poll_events", c_uint32)]


class ConnInfo(Structure):
    _fields_ = [("proto_major", c_uint), ("proto_minor", c_uint), ("max_write", c_uint), ("max_read", c_uint),
                ("max_readahead", c_uint), ("capable", c_uint), ("want", c_uint), ("max_background", c_uint),
                ("congestion_threshold", c_uint), ("time_gran", c_uint), ("reserved", c_uint * 22)]


class EntryParam(Structure):
    _fields_ = [("ino", fuse_ino_t), ("generation", c_uint64), ("attr", Stat), ("attr_timeout", c_double),
                ("entry_timeout", c_double)]


class RequestContext(Structure):
    _fields_ = [("uid", c_uint32), ("gid", c_uint32), ("pid", c_int32), ("umask", c_uint32)]


class ForgetData(Structure):
    _fields_ = [("ino", fuse_ino_t), ("nlookup", c_uint64)]


class IoVec(Structure):
    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


class Buf(Structure):
    # mem_size is libfuse 3.17's addition at the end; 3.14 never reads it, and zero is what 3.17 expects here.
    _fields_ = [("size", c_size_t), ("flags", c_int), ("mem", c_void_p), ("fd", c_int), ("pos", off_t),
                ("mem_size", c_size_t)]


class BufVec(Structure):
    _fields_ = [("count", c_size_t), ("idx", c_size_t), ("off", c_size_t), ("buf", Buf * 1)]


class Args(Structure):
    _fields_ = [("argc", c_int), ("argv", POINTER(c_char_p)), ("allocated", c_int)]


_FI = POINTER(FileInfo)
# The operations ctfs implements, in struct fuse_lowlevel_ops order; the rest stay NULL (libfuse answers
# ENOSYS, which a read-only file system wants for every write operation anyway).
_OPS = [
    ("init", CFUNCTYPE(None, c_void_p, POINTER(ConnInfo))),
    ("destroy", CFUNCTYPE(None, c_void_p)),
    ("lookup", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p)),
    ("forget", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_uint64)),
    ("getattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("setattr", c_void_p), ("readlink", c_void_p), ("mknod", c_void_p), ("mkdir", c_void_p), ("unlink", c_void_p),
    ("rmdir", c_void_p), ("symlink", c_void_p), ("rename", c_void_p), ("link", c_void_p),
    ("open", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("read", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_size_t, off_t, _FI)),
    ("write", c_void_p), ("flush", c_void_p),
    ("release", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("fsync", c_void_p),
    ("opendir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("readdir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_size_t, off_t, _FI)),
    ("releasedir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("fsyncdir", c_void_p),
    ("statfs", CFUNCTYPE(None, fuse_req_t, fuse_ino_t)),
    ("setxattr", c_void_p),
    ("getxattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p, c_size_t)),
    ("listxattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_size_t)),
    ("removexattr", c_void_p),
    ("access", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_int)),
    ("create", c_void_p), ("getlk", c_void_p), ("setlk", c_void_p), ("bmap", c_void_p), ("ioctl", c_void_p),
    ("poll", c_void_p), ("write_buf", c_void_p), ("retrieve_reply", c_void_p),
    ("forget_multi", CFUNCTYPE(None, fuse_req_t, c_size_t, POINTER(ForgetData))),
]


class LowLevelOps(Structure):
    _fields_ = [(name, kind) for name, kind in _OPS]


def _load_libfuse3() -> ctypes.CDLL:
    path = find_library("fuse3")
    if path is None:
        raise CtfsError("libfuse3 is not installed (Debian: apt-get install fuse3)")
    lib = ctypes.CDLL(path, use_errno=True)
    signatures = {
        "fuse_session_new": (c_void_p, [POINTER(Args), POINTER(LowLevelOps), c_size_t, c_void_p]),
        "fuse_session_mount": (c_int, [c_void_p, c_char_p]),
        "fuse_session_loop_mt_312": (c_int, [c_void_p, c_void_p]),
        "fuse_session_unmount": (None, [c_void_p]),
        "fuse_session_destroy": (None, [c_void_p]),
        "fuse_session_exit": (None, [c_void_p]),
        "fuse_loop_cfg_create": (c_void_p, []),
        "fuse_loop_cfg_destroy": (None, [c_void_p]),
        "fuse_loop_cfg_set_max_threads": (None, [c_void_p, c_uint]),
        "fuse_loop_cfg_set_idle_threads": (None, [c_void_p, c_uint]),
        "fuse_loop_cfg_set_clone_fd": (None, [c_void_p, c_uint]),
        "fuse_req_ctx": (POINTER(RequestContext), [fuse_req_t]),
        "fuse_reply_err": (c_int, [fuse_req_t, c_int]),
        "fuse_reply_none": (None, [fuse_req_t]),
        "fuse_reply_entry": (c_int, [fuse_req_t, POINTER(EntryParam)]),
        "fuse_reply_attr": (c_int, [fuse_req_t, POINTER(Stat), c_double]),
        "fuse_reply_open": (c_int, [fuse_req_t, _FI]),
        "fuse_reply_buf": (c_int, [fuse_req_t, c_void_p, c_size_t]),
        "fuse_reply_iov": (c_int, [fuse_req_t, POINTER(IoVec), c_int]),
        "fuse_reply_statfs": (c_int, [fuse_req_t, POINTER(StatVfs)]),
        "fuse_reply_xattr": (c_int, [fuse_req_t, c_size_t]),
        "fuse_add_direntry": (c_size_t, [fuse_req_t, c_void_p, c_size_t, c_char_p, POINTER(Stat), off_t]),
        "fuse_lowlevel_notify_store": (c_int, [c_void_p, fuse_ino_t, off_t, POINTER(BufVec), c_int]),
        "fuse_session_fd": (c_int, [c_void_p]),
        "fuse_session_receive_buf": (c_int, [c_void_p, POINTER(Buf)]),
        "fuse_session_process_buf": (None, [c_void_p, POINTER(Buf)]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


libfuse = _load_libfuse3()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.free.argtypes, _libc.free.restype = [c_void_p], None

# FUSE passthrough (kernel 6.9+, docs/performance.md): the kernel serves an open file's reads and mmaps
# straight from a "backing" file the daemon registers. libfuse 3.14 predates it, so ctfs asks for it by
# amending libfuse's INIT reply. Offsets are those of <linux/fuse.h>: a request starts with a 40-byte
# fuse_in_header, a reply with a 16-byte fuse_out_header.
_IN_HEADER, _OUT_HEADER = 40, 16
_INIT_IN_FLAGS2 = _IN_HEADER + 16
_INIT_OUT_FLAGS, _INIT_OUT_FLAGS2, _INIT_OUT_STACK_DEPTH = _OUT_HEADER + 12, _OUT_HEADER + 32, _OUT_HEADER + 36
FUSE_INIT_EXT = 1 << 30  # flags: flags2 is meaningful
FUSE_PASSTHROUGH_FLAGS2 = 1 << (37 - 32)
FOPEN_PASSTHROUGH = 1 << 7
# A backing file may sit on a file system stacked this deep at most, plus one: 1 takes tmpfs, ext4, xfs.
PASSTHROUGH_STACK_DEPTH = 1
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)


def request_context(req: int) -> RequestContext:
    """uid, gid and pid of the process behind a request."""
    return libfuse.fuse_req_ctx(req).contents


def fill_stat(st: Stat, *, ino: int, mode: int, size: int, nlink: int, uid: int, gid: int,
              times_ns: tuple[int, int, int]) -> Stat:
    st.st_ino, st.st_mode, st.st_size, st.st_nlink, st.st_uid, st.st_gid = ino, mode, size, nlink, uid, gid
    st.st_blocks, st.st_blksize = -(-size // 512), 4096
    for field, ns in zip(("st_atim", "st_mtim", "st_ctim"), times_ns):
        getattr(st, field).tv_sec, getattr(st, field).tv_nsec = divmod(ns, 1_000_000_000)
    return st


def reply_statfs(req: int, sv: os.statvfs_result) -> int:
    out = StatVfs()
    for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                 "f_flag", "f_namemax"):
        setattr(out, name, getattr(sv, name))
    return libfuse.fuse_reply_statfs(req, ctypes.byref(out))


def reply_directory(req: int, listing: list[tuple[bytes, int]], size: int, offset: int) -> int:
    """Reply to a readdir with the entries of `listing` (name, st_mode type bits) from index `offset`, as many
    as fit in `size` bytes; each entry's offset is the index of the next."""
    buf = ctypes.create_string_buffer(size)
    used = 0
    st = Stat()
    for index in range(offset, len(listing)):
        name, mode = listing[index]
        st.st_ino, st.st_mode = index + 1, mode  # the kernel takes only the type from st_mode here
        need = libfuse.fuse_add_direntry(req, ctypes.byref(buf, used), size - used, name, ctypes.byref(st), index + 1)
        if need > size - used:
            break
        used += need
    return libfuse.fuse_reply_buf(req, buf, used)


def reply_open_passthrough(req: int, fh: int, backing_id: int) -> int:
    """Reply to an open: the kernel serves this file's reads and mmaps from the registered backing file."""
    out = struct.pack("=QIi", fh, FOPEN_PASSTHROUGH, backing_id)  # struct fuse_open_out
    return libfuse.fuse_reply_buf(req, out, len(out))


def reply_spans(req: int, spans: list[tuple[int, int]]) -> int:
    """Reply to a read with the bytes at each (address, length) span, in order, without joining them: the
    kernel copies straight from each buffer. The caller keeps the buffers alive until this returns."""
    if len(spans) == 1:  # most reads lie in one chunk: no iovec to build
        return libfuse.fuse_reply_buf(req, *spans[0])
    iov = (IoVec * max(1, len(spans)))(*spans)
    return libfuse.fuse_reply_iov(req, iov, len(spans))


class Session:
    """One FUSE session: created with mount options, mounted, served by libfuse's worker threads."""

    def __init__(self, ops: LowLevelOps, options: list[str]):
        argv = [b"ctfs", b"-o", ",".join(options).encode()]
        self._argv = (c_char_p * (len(argv) + 1))(*argv, None)
        self._args = Args(len(argv), self._argv, 0)
        self._ops = ops  # libfuse keeps pointers to the callbacks: they must live as long as the session
        self._se = libfuse.fuse_session_new(ctypes.byref(self._args), ctypes.byref(ops), ctypes.sizeof(ops), None)
        if not self._se:
            raise CtfsError(f"libfuse refused the mount options {','.join(options)}")

    def mount(self, mountpoint: str) -> None:
        if libfuse.fuse_session_mount(self._se, os.fsencode(mountpoint)) != 0:
            raise CtfsError(f"could not mount {mountpoint} (see the messages above)")

    def negotiate_passthrough(self) -> bool:
        """Answer the kernel's INIT ourselves, before the worker threads start, asking for passthrough when
        the kernel offers it; True when granted. Call after mount() and before serve()."""
        fd = libfuse.fuse_session_fd(self._se)
        buf = Buf()
        if libfuse.fuse_session_receive_buf(self._se, ctypes.byref(buf)) <= 0:
            return False
        try:
            request = ctypes.string_at(buf.mem, buf.size)
            offered = len(request) >= _INIT_IN_FLAGS2 + 4 and bool(
                struct.unpack_from("=I", request, _INIT_IN_FLAGS2)[0] & FUSE_PASSTHROUGH_FLAGS2)
            reply = self._run_captured(fd, buf)
        finally:
            _libc.free(buf.mem)
        granted = False
        if offered and len(reply) >= _INIT_OUT_STACK_DEPTH + 4 and struct.unpack_from("=i", reply, 4)[0] == 0:
            flags, = struct.unpack_from("=I", reply, _INIT_OUT_FLAGS)
            flags2, = struct.unpack_from("=I", reply, _INIT_OUT_FLAGS2)
            struct.pack_into("=I", reply, _INIT_OUT_FLAGS, flags | FUSE_INIT_EXT)
            struct.pack_into("=I", reply, _INIT_OUT_FLAGS2, flags2 | FUSE_PASSTHROUGH_FLAGS2)
            struct.pack_into("=I", reply, _INIT_OUT_STACK_DEPTH, PASSTHROUGH_STACK_DEPTH)
            granted = True
        os.write(fd, reply)
        return granted

    def _run_captured(self, fd: int, buf: Buf) -> bytearray:
        """Process one request with libfuse, catching the reply it writes instead of sending it."""
        read_end, write_end = os.pipe()
        saved = os.dup(fd)
        try:
            os.dup2(write_end, fd, inheritable=False)
            try:
                libfuse.fuse_session_process_buf(self._se, ctypes.byref(buf))
            finally:
                os.dup2(saved, fd, inheritable=False)
            os.close(write_end)
            write_end = -1
            reply = bytearray()
            while chunk := os.read(read_end, 65536):
                reply += chunk
            return reply
        finally:
            for end in (read_end, write_end, saved):
                if end >= 0:
                    os.close(end)

    def open_backing(self, fd: int) -> int:
        """Register `fd` as a backing file with the kernel; the id goes into passthrough open replies."""
        request = bytearray(struct.pack("=iIQ", fd, 0, 0))
        return fcntl.ioctl(libfuse.fuse_session_fd(self._se), FUSE_DEV_IOC_BACKING_OPEN, request, True)

    def close_backing(self, backing_id: int) -> None:
        """Forget a backing id; files the kernel opened with it keep their backing file until released."""
        try:
            fcntl.ioctl(libfuse.fuse_session_fd(self._se), FUSE_DEV_IOC_BACKING_CLOSE,
                        bytearray(struct.pack("=I", backing_id)), True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def serve(self, *, max_threads: int, clone_fd: bool) -> int:
        """Serve until unmounted or aborted; blocks. Returns libfuse's status (0, or a negative errno)."""
        config = libfuse.fuse_loop_cfg_create()
        try:
            libfuse.fuse_loop_cfg_set_max_threads(config, max_threads)
            libfuse.fuse_loop_cfg_set_idle_threads(config, max_threads)
            libfuse.fuse_loop_cfg_set_clone_fd(config, int(clone_fd))
            return libfuse.fuse_session_loop_mt_312(self._se, config)
        finally:
            libfuse.fuse_loop_cfg_destroy(config)

    def store(self, ino: int, offset: int, data: memoryview) -> int:
        """Put `data` into the kernel's page cache of node `ino` at `offset` (FUSE_NOTIFY_STORE): later reads
        of those pages never reach the daemon. Only whole pages (or the file's tail) become readable."""
        holder = (ctypes.c_char * len(data)).from_buffer(data)
        vec = BufVec(count=1, idx=0, off=0)
        vec.buf[0].size, vec.buf[0].mem = len(data), ctypes.addressof(holder)
        return libfuse.fuse_lowlevel_notify_store(self._se, ino, offset, ctypes.byref(vec), 0)

    def close(self) -> None:
        libfuse.fuse_session_unmount(self._se)
        libfuse.fuse_session_destroy(self._se)
        self._se = None
