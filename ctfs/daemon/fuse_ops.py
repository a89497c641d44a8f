"""FUSE operations: translate each callback into a call on the content model, and errors into errnos."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from ctypes.util import find_library

# mfusepy takes libfuse2 when both are installed; libfuse3 sends 1 MiB read requests where libfuse2 is
# stuck at 128 KiB (measured 1.3-1.4x sequential). It reads the choice at import, hence before it.
if not (os.environ.get("FUSE_LIBRARY_NAME") or os.environ.get("FUSE_LIBRARY_PATH")) and find_library("fuse3"):
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

import mfusepy  # noqa: E402

from ctfs.daemon.mountpoint import PID_XATTR
from ctfs.daemon.source import Handle, ModelSource, errno_of
from ctfs.errors import CtfsError
from ctfs.policy.context import Reader

log = logging.getLogger(__name__)

# The kernel asks for up to this much read-ahead; large requests are what make FUSE fast.
MAX_READAHEAD = 16 * 1024 * 1024
# Requests the kernel may have in flight at once (its default of 12 starves parallel loaders).
MAX_BACKGROUND = 64
# JSON work counters of the daemon (bytes served and decrypted, requests), read on the mount's root.
STATS_XATTR = "user.ctfs.stats"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


class DirectReadFUSE(mfusepy.FUSE):
    """mfusepy's read callback copies the bytes an operation returns into libfuse's buffer. Handing the
    buffer address to the operation instead lets it copy decrypted chunks straight in, saving two
    copies per request (measured 2x). This relies on mfusepy 3.1.1 internals, hence the pinned version."""

    def read(self, path, buf, size, offset, fip):  # overrides mfusepy's wrapper of the read callback
        address = ctypes.cast(buf, ctypes.c_void_p).value
        return self.operations.read(fip.contents, address, size, offset)


class CtfsOperations(mfusepy.Operations):
    """Read-only operations over a ModelSource. Attribute names matter: mfusepy registers every
    attribute named like a FUSE operation, so helpers here must not be called e.g. `lock`."""

    use_ns = True

    def __init__(self, source: ModelSource, on_init: Callable[[], None]):
        self.source = source
        self._on_init = on_init
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._handles_mutex = threading.Lock()

    def init_with_config(self, conn, config) -> None:
        if conn is not None:
            conn.max_readahead = MAX_READAHEAD
            conn.max_background = MAX_BACKGROUND
            conn.congestion_threshold = MAX_BACKGROUND * 3 // 4
        if config is not None:
            config.kernel_cache = 0  # per-open keep_cache decides, so a changed source is re-read
            # Each open looks its name up again, so a replaced source's size and mtime reach the kernel
            # then; with the default 1 s the kernel kept the old size and cut the new file short.
            config.entry_timeout = 0.0
            config.use_ino = 0
        self._on_init()

    def destroy(self, path: str) -> None:
        for handle in list(self._handles.values()):
            self.source.release(handle)
        self._handles.clear()

    def getattr(self, path: str, fh=None) -> dict[str, int]:
        try:
            if fh is None and self.source.hidden(path, _reader()):
                raise FileNotFoundError(errno.ENOENT, "hidden by policy", path)
            return self.source.getattr(path)
        except OSError as exc:
            raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None

    def readdir(self, path: str, fh) -> list[str]:
        try:
            reader = _reader()
            names = [n for n in self.source.readdir(path)
                     if not self.source.hidden(f"{path.rstrip('/')}/{n}", reader)]
            return [".", "..", *names]
        except OSError as exc:
            raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None

    def statfs(self, path: str) -> dict[str, int]:
        return self.source.statfs()

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        # Lets `ctfs umount` and `ctfs reload` find this daemon from the mount point alone.
        if path == "/" and name == PID_XATTR:
            return str(os.getpid()).encode()
        if path == "/" and name == STATS_XATTR:
            return json.dumps(self.source.stats()).encode()
        raise mfusepy.FuseOSError(errno.ENODATA)

    def listxattr(self, path: str) -> list[str]:
        return []

    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def open(self, path: str, fi) -> int:
        if fi.flags & WRITE_FLAGS:
            raise mfusepy.FuseOSError(errno.EROFS)
        try:
            handle = self.source.open(path, _reader())
        except (CtfsError, OSError) as exc:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno_of(exc)
            log.error("open %s refused (%s): %s", path, errno.errorcode.get(code, code), exc)
            raise mfusepy.FuseOSError(code) from None
        with self._handles_mutex:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        fi.fh = fh
        fi.keep_cache = 1 if handle.keep_cache else 0
        fi.direct_io = 0
        return 0

    def read(self, fi, address: int, size: int, offset: int) -> int:
        """Called by DirectReadFUSE with libfuse's buffer address, not mfusepy's (path, size, offset, fh)."""
        handle = self._handles.get(fi.fh)
        if handle is None:
            return -errno.EBADF
        try:
            return self.source.read_into(handle, address, size, offset)
        except (CtfsError, OSError) as exc:
            log.error("read of %d bytes at %d failed: %s", size, offset, exc)
            return -errno.EIO

    def release(self, path: str, fi) -> int:
        with self._handles_mutex:
            handle = self._handles.pop(fi.fh, None)
        if handle is not None:
            self.source.release(handle)
        return 0


def _reader() -> Reader:
    """The process behind the current FUSE request."""
    uid, gid, pid = mfusepy.fuse_get_context()
    return Reader(pid=pid, uid=uid, gid=gid)


def serve(ops: CtfsOperations, mountpoint: str, *, fsname: str, allow_other: bool) -> None:
    """Mount and serve until unmounted or signalled (blocks). Multi-threaded, read-only."""
    options = dict(fsname=fsname, subtype="ctfs", ro=True, default_permissions=True, foreground=True)
    if allow_other:
        options["allow_other"] = True
    DirectReadFUSE(ops, mountpoint, raw_fi=True, **options)
