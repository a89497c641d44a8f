"""FUSE operations: translate each low-level request into a call on the content model, and its outcome into a
reply (an entry, attributes, bytes or an errno). Node ids, file handles, st_* fields and buffer addresses
live here and nowhere else."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ctfs.daemon import lowlevel as ll
from ctfs.daemon.mountpoint import PID_XATTR
from ctfs.daemon.nodes import Node, NodeTable
from ctfs.daemon.served import OpenVersion
from ctfs.daemon.source import Entry, Kind, ModelSource, Publish, join
from ctfs.errors import (
    AccessDenied,
    CtfsError,
    KeyUnavailable,
    PlainFileError,
    StaleVersion,
    UntrustedSigner,
)
from ctfs.policy.context import Reader, path_text

log = logging.getLogger(__name__)

# The kernel asks for up to this much read-ahead; large requests are what make FUSE fast.
MAX_READAHEAD = 16 * 1024 * 1024
# Requests the kernel may have in flight at once (its default of 12 starves parallel loaders).
MAX_BACKGROUND = 64
# JSON work counters of the daemon (bytes served and decrypted, requests), read on the mount's root.
STATS_XATTR = "user.ctfs.stats"
# Opens of encrypted files decided at once; each memory image is decrypted by several threads of its own.
OPENER_THREADS = max(2, os.cpu_count() or 1)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT
FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555
# A file node is one version: its attributes never change, so the kernel may keep them. Names are looked up
# again at every open (entry timeout 0), which is how a replaced source reaches the next reader at once.
FILE_ATTR_TIMEOUT = 3600.0
DIR_ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 0.0
# How long a check started by a lookup waits for the kernel to make the node's inode (_NodeStore), and how
# often it tries.
STORE_WAIT = 2.0
STORE_RETRY_PAUSE = 0.002


def errno_of(exc: BaseException) -> int:
    """What a reader sees: refusals are EACCES, a version that changed under an open ESTALE (the kernel then
    looks the name up again), corrupt or tampered data EIO."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, (KeyUnavailable, AccessDenied, PlainFileError, UntrustedSigner)):
        return errno.EACCES
    if isinstance(exc, StaleVersion):
        return errno.ESTALE
    return errno.EIO


def _replying(method: Callable) -> Callable:
    """Every request gets exactly one reply: an exception becomes an errno reply (logged when it is ours)."""

    @functools.wraps(method)
    def handler(self: Operations, req: int, *args: object) -> None:
        try:
            method(self, req, *args)
        except BaseException as exc:  # nothing may escape into libfuse's thread
            code = errno_of(exc)
            if isinstance(exc, CtfsError):
                log.error("%s refused (%s): %s", method.__name__, errno.errorcode.get(code, code), exc)
            elif not isinstance(exc, OSError):
                log.exception("%s failed", method.__name__)
            ll.libfuse.fuse_reply_err(req, code)

    return handler


@dataclasses.dataclass
class _NodeIo:
    """How a node's live opens are served: the kernel wants all of them through its page cache or none."""

    mutex: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    cached_opens: int = 0


class Operations:
    """Read-only low-level operations over a ModelSource; `struct` is what libfuse calls."""

    def __init__(self, source: ModelSource, on_init: Callable[[], None]):
        self.source = source
        self.nodes = NodeTable(source.root_entry())
        self._on_init = on_init
        self.session: ll.Session | None = None  # set once the session exists: verified pages are stored through it
        self._files: dict[int, tuple[OpenVersion, _NodeIo]] = {}
        self._io: dict[int, _NodeIo] = {}
        self._openers = ThreadPoolExecutor(OPENER_THREADS, thread_name_prefix="ctfs-open")
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1
        self._mutex = threading.Lock()
        # libfuse calls these from its own threads: they must live as long as the session does.
        self._callbacks = {name: kind(getattr(self, name)) for name, kind in ll.LowLevelOps._fields_
                           if name in _IMPLEMENTED}
        self.struct = ll.LowLevelOps(**self._callbacks)

    # -- life --------------------------------------------------------------------------------------
    def init(self, userdata: int, conn) -> None:
        info = conn.contents
        info.max_readahead = MAX_READAHEAD
        info.max_background = MAX_BACKGROUND
        info.congestion_threshold = MAX_BACKGROUND * 3 // 4
        self._on_init()

    def destroy(self, userdata: int) -> None:
        self._openers.shutdown(wait=True, cancel_futures=True)
        self.source.close()  # its work ahead of opens uses the session, which goes next
        with self._mutex:
            files, self._files = list(self._files.values()), {}
        for version, _ in files:
            version.let_go()

    # -- names -------------------------------------------------------------------------------------
    @_replying
    def lookup(self, req: int, parent: int, name: bytes) -> None:
        directory = self.nodes[parent]
        path = join(directory.path, os.fsdecode(name))
        entry = self.source.child(directory.entry, os.fsdecode(name), path)
        if self.source.hidden(path, entry, _reader(req)):
            raise FileNotFoundError(errno.ENOENT, "hidden by policy", path)
        node = self.nodes.looked_up(path, entry)
        param = ll.EntryParam(ino=node.ino, generation=0, attr_timeout=_attr_timeout(entry),
                              entry_timeout=ENTRY_TIMEOUT)
        _fill_stat(param.attr, node.ino, entry)
        if ll.libfuse.fuse_reply_entry(req, ctypes.byref(param)) != 0:
            self.nodes.forget(node.ino, 1)  # the kernel never got it (the request was interrupted)
        else:
            self.source.looked_up(path, entry, self._publisher)

    def forget(self, req: int, ino: int, count: int) -> None:
        self._forget(ino, count)
        ll.libfuse.fuse_reply_none(req)

    def forget_multi(self, req: int, count: int, items) -> None:
        for i in range(count):
            self._forget(items[i].ino, items[i].nlookup)
        ll.libfuse.fuse_reply_none(req)

    def _forget(self, ino: int, count: int) -> None:
        node = self.nodes.forget(ino, count)
        if node is not None:
            with self._mutex:
                self._io.pop(ino, None)
            self.source.forgotten(node.entry)  # and with the node, its page cache

    @_replying
    def getattr(self, req: int, ino: int, fi) -> None:
        node = self.nodes[ino]
        entry = node.entry
        if entry.kind is Kind.DIRECTORY:  # a directory's times and owner change over its life: ask again
            st = os.stat(entry.real)
            entry = dataclasses.replace(entry, uid=st.st_uid, gid=st.st_gid,
                                        times_ns=(st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns))
        attr = _fill_stat(ll.Stat(), ino, entry)
        ll.libfuse.fuse_reply_attr(req, ctypes.byref(attr), _attr_timeout(entry))

    @_replying
    def access(self, req: int, ino: int, mask: int) -> None:
        ll.libfuse.fuse_reply_err(req, errno.EROFS if mask & os.W_OK else 0)

    @_replying
    def statfs(self, req: int, ino: int) -> None:
        ll.reply_statfs(req, self.source.statfs())

    # -- files -------------------------------------------------------------------------------------
    @_replying
    def open(self, req: int, ino: int, fi) -> None:
        if fi.contents.flags & WRITE_FLAGS:
            raise OSError(errno.EROFS, "read-only")
        node = self.nodes[ino]
        reader = _reader(req)
        if node.entry.kind is Kind.ENCRYPTED:
            # Its open may decrypt the whole file (a memory image, --verify full): answered from another
            # thread, so that libfuse's workers stay free for every other request (the watchdog's among them).
            self._openers.submit(self._open, req, ino, node, reader)
        else:
            self._open(req, ino, node, reader)

    @_replying
    def _open(self, req: int, ino: int, node: Node, reader: Reader) -> None:
        # The kernel fails an open (EIO) whose mode differs from that of the node's other live opens: while
        # some are served through the page cache, so is this one. One open of a node is decided at a time.
        io = self._node_io(ino)
        with io.mutex:
            try:
                version = self.source.open(node.path, node.entry, reader, self._publisher,
                                           chunks_only=io.cached_opens > 0)
            except CtfsError as exc:
                code = errno_of(exc)
                log.error("open %s refused (%s): %s", path_text(node.path), errno.errorcode.get(code, code), exc)
                raise OSError(code, str(exc)) from None
            fh = self._register(self._files, (version, io))
            if version.backing_id is not None:
                replied = ll.reply_open_passthrough(req, fh, version.backing_id)
            else:
                # keep_cache: this node is one version, so its cached pages stay right for every later open.
                info = ll.FileInfo(fh=fh, keep_cache=1)
                replied = ll.libfuse.fuse_reply_open(req, ctypes.byref(info))
                io.cached_opens += replied == 0
        if replied != 0:  # interrupted: the kernel will never release it
            self._files.pop(fh, None)
            version.let_go()

    @_replying
    def read(self, req: int, ino: int, size: int, offset: int, fi) -> None:
        version, _ = self._files.get(fi.contents.fh, (None, None))
        if version is None:
            raise OSError(errno.EBADF, "no such open file")
        try:
            segments = version.read(offset, size)
        except CtfsError as exc:
            log.error("read of %d bytes at %d of %s failed: %s", size, offset,
                      path_text(self.nodes[ino].path), exc)
            raise OSError(errno.EIO, str(exc)) from None
        try:
            ll.reply_spans(req, segments.spans)
            self.source.count_served(segments.size)
        finally:
            segments.close()

    @_replying
    def release(self, req: int, ino: int, fi) -> None:
        with self._mutex:
            version, io = self._files.pop(fi.contents.fh, (None, None))
        if version is not None:
            if version.backing_id is None:
                with io.mutex:
                    io.cached_opens -= 1
            version.let_go()
        ll.libfuse.fuse_reply_err(req, 0)

    # -- directories -------------------------------------------------------------------------------
    @_replying
    def opendir(self, req: int, ino: int, fi) -> None:
        node = self.nodes[ino]
        if node.entry.kind is not Kind.DIRECTORY:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", node.path)
        listing = [(b".", stat.S_IFDIR), (b"..", stat.S_IFDIR)] + [
            (os.fsencode(name), stat.S_IFDIR if entry.kind is Kind.DIRECTORY else stat.S_IFREG)
            for name, entry in self.source.listing(node.entry, node.path, _reader(req))
        ]
        fi.contents.fh = self._register(self._dirs, listing)
        ll.libfuse.fuse_reply_open(req, fi)

    @_replying
    def readdir(self, req: int, ino: int, size: int, offset: int, fi) -> None:
        ll.reply_directory(req, self._dirs.get(fi.contents.fh, []), size, offset)

    @_replying
    def releasedir(self, req: int, ino: int, fi) -> None:
        with self._mutex:
            self._dirs.pop(fi.contents.fh, None)
        ll.libfuse.fuse_reply_err(req, 0)

    # -- attributes ----------------------------------------------------------------------------------
    @_replying
    def getxattr(self, req: int, ino: int, name: bytes, size: int) -> None:
        # Lets `ctfs umount` and `ctfs reload` find this daemon from the mount point alone.
        if ino == ll.ROOT_INO and name == PID_XATTR.encode():
            value = str(os.getpid()).encode()
        elif ino == ll.ROOT_INO and name == STATS_XATTR.encode():
            value = json.dumps(self.source.stats()).encode()
        else:
            raise OSError(errno.ENODATA, "no such attribute")
        if size == 0:
            ll.libfuse.fuse_reply_xattr(req, len(value))
        elif size < len(value):
            raise OSError(errno.ERANGE, "buffer too small")
        else:
            ll.libfuse.fuse_reply_buf(req, value, len(value))

    @_replying
    def listxattr(self, req: int, ino: int, size: int) -> None:
        if size == 0:
            ll.libfuse.fuse_reply_xattr(req, 0)
        else:
            ll.libfuse.fuse_reply_buf(req, None, 0)

    def _publisher(self, path: str, entry: Entry) -> Publish | None:
        """Where --verify full stores the verified pages of `entry` at `path`: its node's page cache, if the
        kernel has that node."""
        node = self.nodes.find(path, entry)
        return None if node is None or self.session is None else _NodeStore(self.session, node.ino)

    def _node_io(self, ino: int) -> _NodeIo:
        with self._mutex:
            return self._io.setdefault(ino, _NodeIo())

    def _register(self, table: dict, value: object) -> int:
        with self._mutex:
            fh, self._next_fh = self._next_fh, self._next_fh + 1
            table[fh] = value
        return fh


class _NodeStore:
    """One check's stores of verified pages into the page cache of node `ino` (FUSE_NOTIFY_STORE).

    A lookup's check starts once its reply is written, but the kernel makes the node's inode in the task that
    looked it up, once that task runs again: a store before then finds no inode (ENOENT) and its pages would
    be decrypted a second time by the reads. Until one store lands, a store that finds no inode is tried
    again, for at most STORE_WAIT seconds in all."""

    def __init__(self, session: ll.Session, ino: int):
        self._session, self._ino = session, ino
        self._landed = False
        self._deadline: float | None = None

    def __call__(self, offset: int, data: memoryview) -> None:
        while (result := self._session.store(self._ino, offset, data)) == -errno.ENOENT and not self._landed:
            now = time.monotonic()
            self._deadline = self._deadline or now + STORE_WAIT
            if now >= self._deadline:
                break
            time.sleep(STORE_RETRY_PAUSE)
        if result == 0:
            self._landed = True
        else:
            log.debug("the kernel did not take verified pages of node %d at %d (%d)", self._ino, offset, result)


_IMPLEMENTED = ("init", "destroy", "lookup", "forget", "forget_multi", "getattr", "access", "statfs", "open",
                "read", "release", "opendir", "readdir", "releasedir", "getxattr", "listxattr")


def _reader(req: int) -> Reader:
    """The process behind a request."""
    ctx = ll.request_context(req)
    return Reader(pid=ctx.pid, uid=ctx.uid, gid=ctx.gid)


def _attr_timeout(entry: Entry) -> float:
    return DIR_ATTR_TIMEOUT if entry.kind is Kind.DIRECTORY else FILE_ATTR_TIMEOUT


def _fill_stat(st: ll.Stat, ino: int, entry: Entry) -> ll.Stat:
    directory = entry.kind is Kind.DIRECTORY
    return ll.fill_stat(st, ino=ino, mode=DIR_MODE if directory else FILE_MODE, size=entry.size,
                        nlink=2 if directory else 1, uid=entry.uid, gid=entry.gid, times_ns=entry.times_ns)


def mount_options(*, fsname: str, allow_other: bool, subtype: str = "ctfs") -> list[str]:
    options = [f"fsname={fsname}", f"subtype={subtype}", "ro", "default_permissions"]
    return options + ["allow_other"] if allow_other else options

