"""The content model of a mount: a source directory seen as plain safetensors. FUSE-free and testable."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ctfs.errors import CtfsError, FormatError, KeyUnavailable, UntrustedSigner
from ctfs.format.encryption import parse_crypto_header
from ctfs.format.view import ChunkPiece, HeaderPiece, PlainView
from ctfs.keys.store import KeySource
from ctfs.modeldir import is_safetensors
from ctfs.reader import EncryptedFile, FileIdentity, PlainFileError, read_header

from ctfs.daemon.chunk_cache import ChunkCache

if TYPE_CHECKING:
    from ctfs.policy.context import Reader
    from ctfs.policy.gate import PolicyGate

log = logging.getLogger(__name__)

# Files are served read-only whatever their source mode.
FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555
# v1 tensors have no chunk size; read-ahead looks this far for the next ones.
READAHEAD_V1_SPAN = 4 * 1024 * 1024


class AccessDenied(CtfsError):
    """A policy or the downgrade rule refuses the open."""


def errno_of(exc: BaseException) -> int:
    """What a reader sees: refusals are EACCES, corrupt or tampered data is EIO."""
    if isinstance(exc, (KeyUnavailable, AccessDenied, PlainFileError, UntrustedSigner)):
        return errno.EACCES
    if isinstance(exc, FileNotFoundError):
        return errno.ENOENT
    return errno.EIO


@dataclass(frozen=True)
class HeaderFacts:
    identity: FileIdentity
    size: int
    policy: str | None = None  # None: not an encrypted file
    key_ids: tuple[str, ...] = ()


@dataclass
class SourceOptions:
    allow_plain: bool = False
    hide_denied: bool = False
    verify_full: bool = False
    # Chunks decrypted ahead of a sequential reader. Four kept a cold 1 MiB-read loop about 7% faster
    # than two on 2 cores (paired runs); the bound against evicting itself is in _read_ahead.
    readahead_chunks: int = 4


@dataclass
class Handle:
    """One open file. `served` is None for files passed through unchanged."""

    fd: int
    served: EncryptedFile | None = None
    keep_cache: bool = False  # the source is unchanged since the last open: the kernel may keep its pages
    next_offset: int = -1  # where a sequential reader will read next; drives read-ahead
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelSource:
    """Maps paths under the mount to the source directory and serves plaintext views of encrypted files."""

    def __init__(self, root: str | os.PathLike[str], keys: KeySource, cache: ChunkCache,
                 options: SourceOptions | None = None, gate: PolicyGate | None = None):
        self.root = Path(root).resolve()
        self.keys = keys
        self.cache = cache
        self.options = options or SourceOptions()
        self.gate = gate
        self._headers: dict[str, HeaderFacts] = {}
        self._verified: set[FileIdentity] = set()
        self._warned: set[FileIdentity] = set()  # format warnings are said once per file version
        self._opened: dict[str, FileIdentity] = {}
        self._mutex = threading.Lock()
        self._stats_mutex = threading.Lock()
        self._served_bytes = self._read_requests = self._largest_request = 0

    # -- names -----------------------------------------------------------------------------------
    def real_path(self, path: str) -> Path:
        """The source path of a mount path; `..` cannot climb out because FUSE resolves it first."""
        return self.root / path.lstrip("/")

    def reload(self, keys: KeySource, gate: PolicyGate | None) -> None:
        """New opens use `keys` and `gate`; files whose keys are gone are refused from now on."""
        # The old gate is not closed: an open in flight may still write its audit record through it.
        with self._mutex:
            self.keys, self.gate = keys, gate
            self._verified.clear()

    # -- metadata --------------------------------------------------------------------------------
    def getattr(self, path: str) -> dict[str, int]:
        real = self.real_path(path)
        st = os.lstat(real)
        times = {"st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}
        base = {"st_uid": st.st_uid, "st_gid": st.st_gid, "st_ino": st.st_ino, **times}
        if stat.S_ISDIR(st.st_mode):
            return {**base, "st_mode": DIR_MODE, "st_nlink": 2, "st_size": 4096}
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "only regular files and directories are served", path)
        size = self._plain_size(path, real, st) if is_safetensors(real) else st.st_size
        return {**base, "st_mode": FILE_MODE, "st_nlink": 1, "st_size": size, "st_blocks": -(-size // 512)}

    def _plain_size(self, path: str, real: Path, st: os.stat_result) -> int:
        return self._header_facts(path, real, st).size

    def _header_facts(self, path: str, real: Path, st: os.stat_result) -> HeaderFacts:
        """What listing a file needs from its header alone (no keys): the plain size and its policy,
        cached per identity."""
        identity = FileIdentity.of(st)
        with self._mutex:
            cached = self._headers.get(path)
        if cached and cached.identity == identity:
            return cached
        facts = HeaderFacts(identity, st.st_size)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
            try:
                header = read_header(fd, st.st_size, path)
            finally:
                os.close(fd)
            crypto = parse_crypto_header(header, path)
            if crypto is not None:
                key_ids = tuple(k for k in (crypto.enc.kid, crypto.sign.kid) if k)
                facts = HeaderFacts(identity, PlainView(header, crypto).size, crypto.policy_local, key_ids)
        except FormatError:
            pass  # listed with its raw size; opening it fails with EIO and the reason is logged then
        with self._mutex:
            self._headers[path] = facts
        return facts

    def hidden(self, path: str, reader: Reader) -> bool:
        """With --hide-denied, encrypted files the policy refuses to this reader are not listed."""
        if not self.options.hide_denied or self.gate is None:
            return False
        real = self.real_path(path)
        if not is_safetensors(real):
            return False
        try:
            st = os.stat(real)
        except OSError:
            return False
        facts = self._header_facts(path, real, st)
        if facts.policy is None:
            return False
        return not self._decide(path, reader, facts.policy, facts.key_ids, facts.identity).allowed

    def _decide(self, path: str, reader: Reader, policy: str, key_ids, identity: FileIdentity):
        return self.gate.check(
            reader=reader, file=path, model_dir=str(Path(path).parent), embedded_policy=policy,
            key_ids=list(key_ids), file_identity=identity,
        )

    def readdir(self, path: str) -> list[str]:
        return sorted(e.name for e in os.scandir(self.real_path(path)) if not e.name.endswith(".ctfs-tmp"))

    def statfs(self) -> dict[str, int]:
        sv = os.statvfs(self.root)
        return {key: getattr(sv, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                  "f_files", "f_ffree", "f_favail", "f_namemax")}

    # -- open / read / release -------------------------------------------------------------------
    def open(self, path: str, reader: Reader | None) -> Handle:
        """Open for reading; every check (header, signer, key, policy, optionally every tag) happens here,
        because a failure later, inside an mmap, would kill the reader with SIGBUS."""
        real = self.real_path(path)
        if not is_safetensors(real):
            return self._passthrough(path, real)
        try:
            served = EncryptedFile(real, self.keys, label=path)
        except PlainFileError:
            if not self.options.allow_plain:
                raise AccessDenied(
                    f"{path}: plain safetensors file refused (downgrade); mount with --allow-plain to serve it"
                ) from None
            return self._passthrough(path, real)
        try:
            self._admit(path, served, reader)
        except BaseException:
            served.close()
            raise
        return Handle(-1, served, keep_cache=self._unchanged_since_last_open(path, served.identity))

    def _passthrough(self, path: str, real: Path) -> Handle:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        return Handle(fd, keep_cache=self._unchanged_since_last_open(path, FileIdentity.of(os.fstat(fd))))

    def _unchanged_since_last_open(self, path: str, identity: FileIdentity) -> bool:
        """Kernel pages of a changed source must be dropped, or readers would see old and new bytes mixed."""
        with self._mutex:
            previous = self._opened.get(path)
            self._opened[path] = identity
        return previous == identity

    def _admit(self, path: str, served: EncryptedFile, reader: Reader | None) -> None:
        if self.gate is not None and reader is not None:
            crypto = served.crypto
            key_ids = [k for k in (crypto.enc.kid, crypto.sign.kid) if k]
            decision = self._decide(path, reader, crypto.policy_local, key_ids, served.identity)
            if not decision.allowed:
                raise AccessDenied(f"{path}: denied by policy: {decision.reason}")
        served.unwrap_all()
        if self._first_sight(self._warned, served.identity):
            _warn_about_format(path, served)
        if self.options.verify_full:
            with self._mutex:
                known = served.identity in self._verified
            if not known:
                served.verify_all()
                with self._mutex:
                    self._verified.add(served.identity)

    def _first_sight(self, seen: set[FileIdentity], identity: FileIdentity) -> bool:
        with self._mutex:
            if identity in seen:
                return False
            seen.add(identity)
            return True

    def read_into(self, handle: Handle, buf: int, size: int, offset: int) -> int:
        """Copy plain bytes `[offset, offset+size)` to address `buf`; returns the count (short at EOF)."""
        if handle.served is None:
            count = os.preadv(handle.fd, [(ctypes.c_char * size).from_address(buf)], offset)
            self._count_served(count)
            return count
        served = handle.served
        pos = 0
        for piece in served.view.pieces(offset, size):
            if isinstance(piece, ChunkPiece):
                chunk = self.cache.acquire((served.identity, piece.tensor, piece.index),
                                           served.chunk_size(piece.tensor, piece.index),
                                           _filler(served, piece.tensor, piece.index))
                try:
                    ctypes.memmove(buf + pos, chunk.address + piece.skip, piece.length)
                finally:
                    self.cache.release(chunk, piece.length)
            elif isinstance(piece, HeaderPiece):
                ctypes.memmove(buf + pos, served.view.prefix[piece.start:piece.start + piece.length], piece.length)
            else:  # a tensor stored in plaintext
                ctypes.memmove(buf + pos, served.read_stored(piece.data_offset, piece.length), piece.length)
            pos += piece.length
        self._count_served(pos)
        self._read_ahead(handle, offset, pos)
        return pos

    def _count_served(self, count: int) -> None:
        with self._stats_mutex:
            self._served_bytes += count
            self._read_requests += 1
            self._largest_request = max(self._largest_request, count)

    def stats(self) -> dict[str, int]:
        """Work counters for benchmarks: bytes served to the kernel against bytes decrypted."""
        with self._stats_mutex:
            mine = {"served_bytes": self._served_bytes, "read_requests": self._read_requests,
                    "largest_request": self._largest_request}
        return {**mine, **self.cache.stats()}

    def _read_ahead(self, handle: Handle, offset: int, length: int) -> None:
        """On sequential access, decrypt the chunks after this read before the reader asks for them."""
        with handle.lock:
            sequential = offset == handle.next_offset
            handle.next_offset = offset + length
        if not sequential or not self.options.readahead_chunks:
            return
        served = handle.served
        # Look no further than the chunks wanted, and never so far that read-ahead evicts itself.
        span = self.options.readahead_chunks * (served.crypto.chunk_size or READAHEAD_V1_SPAN)
        wanted: list[tuple[str, int]] = []
        for piece in served.view.pieces(offset + length, min(span, self.cache.capacity // 2)):
            if isinstance(piece, ChunkPiece) and (piece.tensor, piece.index) not in wanted:
                wanted.append((piece.tensor, piece.index))
                if len(wanted) == self.options.readahead_chunks:
                    break
        self.cache.prefetch(
            ((served.identity, t, i), served.chunk_size(t, i), _filler(served, t, i)) for t, i in wanted
        )

    def release(self, handle: Handle) -> None:
        if handle.served is not None:
            handle.served.close()
        elif handle.fd >= 0:
            os.close(handle.fd)


def _warn_about_format(path: str, served: EncryptedFile) -> None:
    ciphers = served.crypto.ciphers
    if any(c.chunk_size is None for c in ciphers.values()):
        log.warning("%s: format v1 tensors are decrypted whole; re-encrypt with format 2 for large tensors", path)
    plain = [t.name for t in served.header.tensors if t.name not in ciphers and t.nbytes]
    if plain:
        # The signature covers their header entries but not their bytes (docs/format.md §13 W2).
        log.warning("%s: %d tensor(s) stored in plaintext are not authenticated (e.g. %r)", path, len(plain), plain[0])


def _filler(served: EncryptedFile, tensor: str, index: int) -> Callable[[memoryview], None]:
    return lambda out: served.decrypt_chunk_into(tensor, index, out)
