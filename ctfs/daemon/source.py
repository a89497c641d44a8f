"""The content model of a mount: a source directory seen as plain safetensors. FUSE-free: entries, listings,
and opens that hand out one version of a file each."""

from __future__ import annotations

import enum
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ctfs.daemon.chunk_cache import ChunkCache
from ctfs.daemon.images import ImageStore
from ctfs.daemon.served import (
    ImageView,
    OpenVersion,
    PassthroughFile,
    PlainView,
    verify_and_publish,
)
from ctfs.errors import AccessDenied, CtfsError, FormatError, IntegrityError, StaleVersion
from ctfs.files.atomic import TEMP_SUFFIX
from ctfs.files.encrypted import EncryptedFile
from ctfs.files.fileio import FileIdentity, read_header
from ctfs.files.modeldir import SAFETENSORS_SUFFIX, next_shards
from ctfs.format.encryption import parse_crypto_header
from ctfs.format.header import HEADER_PREFIX_SIZE, looks_like_safetensors
from ctfs.format.view import PlainView as PlainLayout
from ctfs.keys.store import KeySource
from ctfs.policy.context import path_text

if TYPE_CHECKING:
    from ctfs.daemon.integrity import ModelGuard
    from ctfs.policy.context import Reader
    from ctfs.policy.gate import PolicyGate

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Header facts remembered per file version: enough for large model trees, bounded for a long-lived daemon.
FACTS_CACHE_ENTRIES = 4096
# With --verify full, the shards after an opened one that are checked ahead, two at a time.
VERIFY_AHEAD_SHARDS = 2
# With --verify full, files checked ahead because the kernel looked them up, not yet opened, hold at most
# this share of the memory in the page cache.
LOOKUP_AHEAD_SHARE = 4
# With --verify full, one file is checked in this many ranges at once: a single stream of reads left the
# disk and the second core idle here (see docs/performance.md).
VERIFY_PARTS = max(2, min(4, os.cpu_count() or 1))


class Kind(enum.Enum):
    DIRECTORY = "directory"
    ENCRYPTED = "encrypted"  # served as its plain view
    PLAIN_SAFETENSORS = "plain safetensors"  # a downgrade: refused unless --allow-plain
    OTHER = "other"  # config, tokenizer, index: passed through
    UNREADABLE = "unreadable"  # looks like safetensors but its header is broken: listed, refused at open


@dataclass(frozen=True)
class Entry:
    """One name in the source as the mount shows it, for one version of what it names."""

    kind: Kind
    real: str  # the source path, symlinks resolved
    identity: FileIdentity
    size: int  # the plain view's size for an encrypted file, else the file's own
    uid: int
    gid: int
    times_ns: tuple[int, int, int]  # atime, mtime, ctime
    policy: str | None = None  # an encrypted file's embedded policy
    key_ids: tuple[str, ...] = ()
    problem: str | None = None  # why an unreadable file cannot be opened


# Where --verify full puts a version's plain bytes as its tags verify: publish(offset, bytes); a publisher
# gives the publish of a path's version, or None where it has nowhere to put them.
Publish = Callable[[int, memoryview], object]
Publisher = Callable[[str, Entry], Publish | None]


@dataclass
class SourceOptions:
    allow_plain: bool = False
    hide_denied: bool = False
    verify_full: bool = False
    # Roots besides the source that symlinks may point into (e.g. a Hugging Face cache's models--org--name).
    follow: tuple[str, ...] = ()
    # Chunks decrypted ahead of a sequential reader. Four kept a cold 1 MiB-read loop about 7% faster
    # than two on 2 cores (paired runs); the bound against evicting itself is in PlainView._read_ahead.
    readahead_chunks: int = 4


@dataclass
class _Counters:
    served_bytes: int = 0
    read_requests: int = 0
    largest_request: int = 0
    verified_bytes: int = 0  # decrypted by --verify full's check at a first open
    mutex: threading.Lock = field(default_factory=threading.Lock)


class ModelSource:
    """Maps paths under the mount to the source directory and opens file versions for reading."""

    def __init__(self, root: str | os.PathLike[str], keys: KeySource, cache: ChunkCache,
                 options: SourceOptions | None = None, gate: PolicyGate | None = None,
                 guard: ModelGuard | None = None):
        self.root = os.path.realpath(root)
        self.guard = guard
        self.keys = keys
        self.cache = cache
        self.options = options or SourceOptions()
        self.gate = gate
        # Set when the kernel grants FUSE passthrough: encrypted files are then served from memory images.
        self.images: ImageStore | None = None
        self._allowed_roots = (self.root, *(os.path.realpath(r) for r in self.options.follow))
        self._facts: OrderedDict[tuple[FileIdentity, bool], dict] = OrderedDict()
        self._verified: set[FileIdentity] = set()
        self._verifying: dict[FileIdentity, threading.Event] = {}  # one check of a version at a time
        self._failed: dict[FileIdentity, str] = {}  # versions whose check found a bad tag: why
        self._looked_up_ahead: dict[FileIdentity, int] = {}  # checked on lookup, not opened yet: their sizes
        self.lookup_ahead_budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // LOOKUP_AHEAD_SHARE
        self._ahead = ThreadPoolExecutor(VERIFY_AHEAD_SHARDS, thread_name_prefix="ctfs-verify-ahead")
        self._parts = ThreadPoolExecutor(VERIFY_PARTS - 1, thread_name_prefix="ctfs-verify")
        self._said: set[object] = set()  # warnings and refusals are logged once per file version or link
        self._mutex = threading.Lock()
        self._counters = _Counters()

    def reload(self, keys: KeySource, gate: PolicyGate | None) -> None:
        """New opens use `keys` and `gate`; files whose keys are gone are refused from now on."""
        # The old gate is not closed: an open in flight may still write its audit record through it.
        with self._mutex:
            self.keys, self.gate = keys, gate
            self._verified.clear()
            self._failed.clear()
            self._looked_up_ahead.clear()
        if self.images is not None:
            self.images.drop_unused()

    # -- names -----------------------------------------------------------------------------------
    def root_entry(self) -> Entry:
        return self._entry_of(self.root, os.stat(self.root), "/")

    def child(self, parent: Entry, name: str, path: str) -> Entry:
        """The entry of `name` in directory `parent`; `path` is its path inside the mount, for messages and
        policies. A symlink is served as what it points to, if that lies inside an allowed root."""
        real = os.path.join(parent.real, name)
        st = os.lstat(real)
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(real)
            if not any(target == r or target.startswith(r + "/") for r in self._allowed_roots):
                self._say_once(("link", real, target), logging.WARNING,
                               "%s: symlink to %s refused: it points outside the source%s", path_text(path),
                               path_text(target), " and the followed roots" if self.options.follow else "")
                raise PermissionError(13, "symlink points outside the allowed roots", path)
            real, st = target, os.stat(target)
        entry = self._entry_of(real, st, path)
        if self.guard is not None and entry.kind is not Kind.DIRECTORY and not self.guard.listed(path):
            self._say_once(("unlisted", path, entry.identity), logging.WARNING,
                           "%s: not listed in the signed model.sig: not served", path_text(path))
            raise FileNotFoundError(2, "not listed in model.sig", path)
        return entry

    def listing(self, directory: Entry, path: str, reader: Reader | None) -> list[tuple[str, Entry]]:
        """What a directory lists: every servable name, less our temp files, refused symlinks and, with
        --hide-denied, files the policy refuses to `reader`."""
        found = []
        for name in sorted(os.listdir(directory.real)):
            if name.endswith(TEMP_SUFFIX):  # our own writers' temporary files
                continue
            child_path = join(path, name)
            try:
                entry = self.child(directory, name, child_path)
            except (OSError, FormatError):
                continue
            if not self.hidden(child_path, entry, reader):
                found.append((name, entry))
        return found

    def encrypted_files(self) -> Iterator[tuple[str, Entry]]:
        """Every encrypted file the mount serves, as (its path inside the mount, its entry), symlinked
        directories included; each directory is walked once, however many links lead to it."""
        walked: set[str] = set()

        def walk(directory: Entry, path: str) -> Iterator[tuple[str, Entry]]:
            walked.add(directory.real)
            for name, entry in self.listing(directory, path, None):
                if entry.kind is Kind.DIRECTORY and entry.real not in walked:
                    yield from walk(entry, join(path, name))
                elif entry.kind is Kind.ENCRYPTED:
                    yield join(path, name), entry

        yield from walk(self.root_entry(), "/")

    def _entry_of(self, real: str, st: os.stat_result, path: str) -> Entry:
        if stat.S_ISDIR(st.st_mode):
            return Entry(Kind.DIRECTORY, real, FileIdentity.of(st), 4096, st.st_uid, st.st_gid, _times(st))
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(2, "only regular files and directories are served", path)
        facts = self._facts_of(real, st, path)
        return Entry(facts["kind"], real, facts["identity"], facts["size"], st.st_uid, st.st_gid, _times(st),
                     facts.get("policy"), facts.get("key_ids", ()), facts.get("problem"))

    def _facts_of(self, real: str, st: os.stat_result, path: str) -> dict:
        """What a file is, decided by its content, cached per version. A `.safetensors` name only adds
        strictness: such a file must parse as safetensors, or it is refused rather than passed through."""
        key = (FileIdentity.of(st), path.endswith(SAFETENSORS_SUFFIX))
        with self._mutex:
            facts = self._facts.get(key)
            if facts is not None:
                self._facts.move_to_end(key)
                return facts
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        try:
            identity = FileIdentity.of(os.fstat(fd))  # the version actually read, should it have just changed
            facts = _classify(fd, identity, path)
        finally:
            os.close(fd)
        with self._mutex:
            self._facts[(identity, key[1])] = facts
            while len(self._facts) > FACTS_CACHE_ENTRIES:
                self._facts.popitem(last=False)
        return facts

    def hidden(self, path: str, entry: Entry, reader: Reader | None) -> bool:
        """With --hide-denied, encrypted files the policy refuses to this reader are not listed."""
        if not self.options.hide_denied or self.gate is None or reader is None or entry.kind is not Kind.ENCRYPTED:
            return False
        return not self._decide(path, reader, entry.policy, entry.key_ids, entry.identity).allowed

    def _decide(self, path: str, reader: Reader, policy: str | None, key_ids, identity: FileIdentity):
        return self.gate.check(
            reader=reader, file=path, model_dir=os.path.dirname(path), embedded_policy=policy,
            key_ids=list(key_ids), file_identity=identity,
        )

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)

    # -- open ------------------------------------------------------------------------------------
    def open(self, path: str, entry: Entry, reader: Reader | None, publisher: Publisher | None = None, *,
             chunks_only: bool = False) -> OpenVersion:
        """Open the version `entry` names. Every check (header, signer, key, policy, optionally every tag)
        happens here, because a failure later, inside an mmap, would kill the reader with SIGBUS.

        An encrypted file is served from its memory image when there is an image store, the image fits and
        not `chunks_only`; building the image checks every tag. Otherwise it is served through the chunk
        cache, and with --verify full `publisher(path, entry)` says where the plain file goes as its tags
        verify (the FUSE layer puts it in the kernel's page cache of the version's node, so it is not
        decrypted a second time); the next shard of an index is then verified ahead the same way."""
        if entry.kind is Kind.DIRECTORY:
            raise IsADirectoryError(21, "is a directory", path)
        if entry.kind is Kind.UNREADABLE:
            raise FormatError(entry.problem or f"{path_text(path)}: unreadable")
        if entry.kind is Kind.PLAIN_SAFETENSORS and not self.options.allow_plain:
            raise AccessDenied(f"{path_text(path)}: plain safetensors file refused (downgrade); "
                               "mount with --allow-plain to serve it")
        if entry.kind is not Kind.ENCRYPTED:
            fd = os.open(entry.real, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if FileIdentity.of(os.fstat(fd)) != entry.identity:
                    raise StaleVersion(f"{path_text(path)}: changed since it was looked up")
                self._check_signed_bytes(path, fd, entry.identity)
            except BaseException:
                os.close(fd)
                raise
            return PassthroughFile(fd, entry.identity)
        encrypted = self._open_encrypted(path, entry)
        with self._mutex:
            self._looked_up_ahead.pop(entry.identity, None)
        try:
            self._admit(path, encrypted, reader)
            image = None if chunks_only or self.images is None else self.images.acquire(encrypted)
            if image is None and self.options.verify_full:
                self._verify(encrypted, None if publisher is None else publisher(path, entry))
        except BaseException:
            encrypted.close()
            raise
        if image is None:
            if self.options.verify_full and publisher is not None:
                self._verify_next_shards(path, publisher)
            return PlainView(encrypted, self.cache, self.options.readahead_chunks)
        encrypted.close()  # the image holds every byte: no data key stays in memory
        self._build_next_shard(path)
        return ImageView(image, self.images)

    def _next_shards(self, path: str, count: int) -> list[str]:
        """Loaders read a sharded model's files one after another, in the sorted order of its index: the
        paths of the (up to `count`) shards read after `path`."""
        directory, _, name = path.rpartition("/")
        try:
            following = next_shards(os.path.join(self.root, directory.lstrip("/")), name, count)
        except OSError:
            return []
        return [join(directory, shard) for shard in following]

    def _entry_at(self, path: str) -> Entry:
        real_dir = os.path.join(self.root, os.path.dirname(path).lstrip("/"))
        parent = self._entry_of(real_dir, os.stat(real_dir), os.path.dirname(path))
        return self.child(parent, os.path.basename(path), path)

    def _build_next_shard(self, path: str) -> None:
        """While one shard is read, the image of the next is built. Only the image: whoever opens that file
        is checked then, like any reader."""
        for following in self._next_shards(path, 1):
            self.images.build_ahead(lambda shard=following: self._build_image(shard))

    def _build_image(self, path: str) -> None:
        try:
            entry = self._entry_at(path)
            if entry.kind is not Kind.ENCRYPTED or self.images.holds(entry.identity):
                return
            with self._open_encrypted(path, entry) as encrypted:
                encrypted.unwrap_all()
                image = self.images.acquire(encrypted)
            if image is not None:
                self.images.release(image)
                log.debug("%s: image built ahead of its open", path_text(path))
        except (CtfsError, OSError) as exc:  # its own open will fail and say why
            log.debug("%s: no image built ahead: %s", path_text(path), exc)

    def looked_up(self, path: str, entry: Entry, publisher: Publisher) -> None:
        """With --verify full, a file the kernel has just looked up is checked ahead of its open, into that
        node's page cache. Loaders look a model's files up before they read them (vLLM looks every shard up,
        then builds its engine for seconds), so the checks overlap their work and the opens find them done.
        Files so checked and not yet opened hold at most `lookup_ahead_budget` bytes of pages: past that a
        lookup checks nothing, and the open checks its file."""
        if not self.options.verify_full or self.images is not None or entry.kind is not Kind.ENCRYPTED:
            return
        identity = entry.identity
        with self._mutex:
            if identity in self._verified or identity in self._verifying or identity in self._looked_up_ahead:
                return
            if sum(self._looked_up_ahead.values()) + entry.size > self.lookup_ahead_budget:
                return
            self._looked_up_ahead[identity] = entry.size
        self._ahead.submit(self._verify_ahead, path, publisher, entry)

    def forgotten(self, entry: Entry) -> None:
        """The kernel dropped the node of `entry`, and with it the pages a check ahead stored there."""
        with self._mutex:
            self._looked_up_ahead.pop(entry.identity, None)

    def _verify_next_shards(self, path: str, publisher: Publisher) -> None:
        """With --verify full, while one shard is read the next ones are checked, their plain bytes going
        where `publisher` says: their opens then find them verified. Only where the kernel already has a
        shard's node (vLLM looks every shard up first), so that nothing is decrypted twice. Each open
        still checks its reader like any other."""
        for following in self._next_shards(path, VERIFY_AHEAD_SHARDS):
            self._ahead.submit(self._verify_ahead, following, publisher)

    def _verify_ahead(self, path: str, publisher: Publisher, entry: Entry | None = None) -> None:
        """Check the file at `path` (whose entry a lookup may have just resolved) ahead of its open."""
        try:
            if entry is None:
                entry = self._entry_at(path)
            with self._mutex:
                known = entry.identity in self._verified or entry.identity in self._verifying
            publish = publisher(path, entry) if entry.kind is Kind.ENCRYPTED and not known else None
            if publish is None:
                return
            with self._open_encrypted(path, entry) as encrypted:
                encrypted.unwrap_all()
                self._verify(encrypted, publish, wait=False)
        except (CtfsError, OSError) as exc:  # its open fails the same way, and logs it then
            log.debug("%s: check ahead of its open failed: %s", path_text(path), exc)

    def close(self) -> None:
        """Stop the work done ahead of opens (checks, image builds) before the FUSE session it uses goes."""
        self._ahead.shutdown(wait=True, cancel_futures=True)
        self._parts.shutdown(wait=True, cancel_futures=True)
        if self.images is not None:
            self.images.stop_building()

    def _open_encrypted(self, path: str, entry: Entry) -> EncryptedFile:
        """The version `entry` names, its header signed by a trusted signer and, in a signed model directory,
        its bytes those model.sig records."""
        encrypted = EncryptedFile(entry.real, self.keys, label=path_text(path))
        try:
            if encrypted.identity != entry.identity:
                raise StaleVersion(f"{path_text(path)}: changed since it was looked up")
            self._check_signed_bytes(path, encrypted.fileno(), entry.identity)
        except BaseException:
            encrypted.close()
            raise
        return encrypted

    def _check_signed_bytes(self, path: str, fd: int, identity: FileIdentity) -> None:
        """With a signed model directory, the bytes of this version must be those model.sig records."""
        if self.guard is not None:
            self.guard.check(path, fd, identity)

    def _admit(self, path: str, encrypted: EncryptedFile, reader: Reader | None) -> None:
        if self.gate is not None and reader is not None:
            crypto = encrypted.crypto
            key_ids = [k for k in (crypto.enc.kid, crypto.sign.kid) if k]
            decision = self._decide(path, reader, crypto.policy_local, key_ids, encrypted.identity)
            if not decision.allowed:
                raise AccessDenied(f"{path_text(path)}: denied by policy: {decision.reason}")
        encrypted.unwrap_all()
        if self._first_sight(("format", encrypted.identity)):
            _warn_about_format(path, encrypted)

    def _verify(self, encrypted: EncryptedFile, publish: Publish | None, *, wait: bool = True) -> None:
        """Check every tag of a version once (--verify full). Meeting a check of the version under way,
        an open waits for it (and checks again itself if that one failed, unless on a bad tag, which the
        version keeps); a check ahead leaves it be."""
        identity = encrypted.identity
        while True:
            with self._mutex:
                if identity in self._verified:
                    return
                if identity in self._failed:
                    if not wait:
                        return
                    raise IntegrityError(self._failed[identity])
                running = self._verifying.get(identity)
                if running is None:
                    done = self._verifying[identity] = threading.Event()
                    break
            if not wait:
                return
            running.wait()
        try:
            if publish is None:
                encrypted.verify_all()
                decrypted = encrypted.encrypted_bytes
            else:
                decrypted = verify_and_publish(encrypted, publish, self._run_all, VERIFY_PARTS)
            with self._mutex:
                self._verified.add(identity)
            with self._counters.mutex:
                self._counters.verified_bytes += decrypted
        except IntegrityError as exc:
            with self._mutex:
                self._failed[identity] = str(exc)
            raise
        finally:
            with self._mutex:
                del self._verifying[identity]
            done.set()

    def _run_all(self, jobs: list[Callable[[], _T]]) -> list[_T]:
        """Run `jobs` at once, the first in this thread; return their results once all have ended, or raise
        the first failure then: none may still use the file when its open fails and closes it."""
        others = [self._parts.submit(job) for job in jobs[1:]]
        results, failures = [], []
        for run in (*jobs[:1], *(future.result for future in others)):
            try:
                results.append(run())
            except BaseException as exc:  # raised below, once every job has ended
                failures.append(exc)
        if failures:
            raise failures[0]
        return results

    def _first_sight(self, what: object) -> bool:
        with self._mutex:
            if what in self._said:
                return False
            self._said.add(what)
            return True

    def _say_once(self, what: object, level: int, message: str, *args: object) -> None:
        if self._first_sight(what):
            log.log(level, message, *args)

    # -- counters --------------------------------------------------------------------------------
    def count_served(self, count: int) -> None:
        counters = self._counters
        with counters.mutex:
            counters.served_bytes += count
            counters.read_requests += 1
            counters.largest_request = max(counters.largest_request, count)

    def stats(self) -> dict[str, int]:
        """Work counters for benchmarks: bytes served to the kernel against bytes decrypted."""
        counters = self._counters
        with counters.mutex:
            mine = {"served_bytes": counters.served_bytes, "read_requests": counters.read_requests,
                    "largest_request": counters.largest_request, "verified_bytes": counters.verified_bytes}
        images = self.images.stats() if self.images is not None else {}
        return {**mine, **self.cache.stats(), **images}


def _classify(fd: int, identity: FileIdentity, path: str) -> dict:
    label = path_text(path)
    start = os.pread(fd, HEADER_PREFIX_SIZE + 1, 0)
    facts: dict = {"kind": Kind.OTHER, "identity": identity, "size": identity.size}
    if not (path.endswith(SAFETENSORS_SUFFIX) or looks_like_safetensors(start, identity.size)):
        return facts
    try:
        header = read_header(fd, identity.size, label)
        crypto = parse_crypto_header(header, label)
    except FormatError as exc:
        return {**facts, "kind": Kind.UNREADABLE, "problem": str(exc)}
    if crypto is None:
        return {**facts, "kind": Kind.PLAIN_SAFETENSORS}
    return {**facts, "kind": Kind.ENCRYPTED, "size": PlainLayout(header, crypto).size, "policy": crypto.policy_local,
            "key_ids": tuple(k for k in (crypto.enc.kid, crypto.sign.kid) if k)}


def _times(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def join(directory: str, name: str) -> str:
    """A path inside the mount: `name` in `directory`."""
    return directory.rstrip("/") + "/" + name


def _warn_about_format(path: str, encrypted: EncryptedFile) -> None:
    ciphers = encrypted.crypto.ciphers
    label = path_text(path)
    if any(c.chunk_size is None for c in ciphers.values()):
        log.warning("%s: format v1 tensors are decrypted whole; re-encrypt with format 2 for large tensors", label)
    plain = [t.name for t in encrypted.header.tensors if t.name not in ciphers and t.nbytes]
    if plain:
        # The signature covers their header entries but not their bytes (docs/format.md §13 W2).
        log.warning("%s: %d tensor(s) stored in plaintext are not authenticated (e.g. %r)", label, len(plain), plain[0])
