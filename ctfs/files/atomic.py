"""Write outputs atomically: unnamed until complete and fsynced, then named in one step; a kill leaves nothing."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import resource
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from ctfs.errors import CtfsError

TEMP_SUFFIX = ".ctfs-tmp"
# `.NAME.PID.TOKEN.ctfs-tmp`: the pid tells a later run whether the entry is litter or work under way
# (Linux pids stay below 2**22: seven digits at most).
TEMP_NAME = re.compile(r"\..+\.(?P<pid>[1-9][0-9]{0,6})\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX), re.DOTALL)
# Characters of the target's name kept in a temp name: the whole stays within NAME_MAX (255).
TEMP_NAME_KEEP = 200
# How open(O_TMPFILE) says the filesystem (FUSE, some network filesystems) or the kernel (before 3.11)
# cannot make unnamed files.
NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}
# Descriptors a run needs besides the files a tree holds: sources, key files, the interpreter's own.
SPARE_DESCRIPTORS = 64


def temp_path(directory: Path, name: str) -> Path:
    return directory / f".{name[:TEMP_NAME_KEEP]}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


class UnnamedFile:
    """A file being written that has no name until `link`: if the process dies first, the kernel frees it.

    Where unnamed files are unsupported, it is a named temp file (`.NAME.PID.TOKEN.ctfs-tmp`) instead,
    which a kill leaves behind, plaintext and all, until the next run removes it. Either way the file
    is locked while this process lives, so no other run takes it for litter."""

    fd: int
    temp: Path | None  # the fallback's name, until the file is given its own

    def __init__(self, directory: Path, name: str, mode: int):
        self.fd, self.temp = -1, None
        try:
            if not os.path.isdir("/proc/self/fd"):  # without /proc, an unnamed file could never be named
                raise OSError(errno.EOPNOTSUPP, "no /proc/self/fd")
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode)
        except OSError as exc:
            if exc.errno not in NO_TMPFILE:
                raise
            self.fd = self._create_named(directory, name, mode)
        try:
            os.fchmod(self.fd, mode)  # exactly `mode`, whatever the umask
            _lock(self.fd)
        except BaseException:
            self.close()
            raise

    def _create_named(self, directory: Path, name: str, mode: int) -> int:
        while True:
            self.temp = temp_path(directory, name)
            with contextlib.suppress(FileExistsError):
                return os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)

    def sync(self) -> None:
        os.fsync(self.fd)

    def link(self, path: Path) -> None:
        """Give the finished file the name `path`, which must not exist (FileExistsError otherwise)."""
        if self.temp is None:
            _link_unnamed(self.fd, path)
        else:
            os.link(self.temp, path)
            os.unlink(self.temp)
            self.temp = None

    def replace(self, target: Path) -> None:
        """Put the finished file at `target` in one step, replacing any file there, and make it durable."""
        try:
            self.link(target)
        except FileExistsError:
            # linkat cannot replace: the file is named beside the target, then renamed over it. A kill
            # between the two leaves the complete file under its temp name, for the next run to remove.
            if self.temp is None:
                self.temp = temp_path(target.parent, target.name)
                _link_unnamed(self.fd, self.temp)
            os.replace(self.temp, target)
            self.temp = None
        fsync_dir(target.parent)

    def close(self) -> None:
        """Let go of the file: unless it was named, nothing of it remains."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
            self.temp = None


def _link_unnamed(fd: int, path: Path) -> None:
    # os.link alone calls link(2), which does not follow /proc's link to the open file; given a directory
    # descriptor it calls linkat(2) with AT_SYMLINK_FOLLOW, which does.
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def _lock(fd: int) -> None:
    # A filesystem without flock leaves the pid in the name as the only sign of ownership.
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def fsync_dir(path: Path) -> None:
    # A new name is durable only once the directory entry is on disk.
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_stale_temps(directory: Path) -> None:
    """Remove the temp files and staging directories that dead ctfs runs of this user left in `directory`.

    Only an entry whose name is exactly one ctfs gives, owned by this user, whose pid is not running (or
    is this process: a pid reused in a fresh container) and whose lock nobody holds (a run in another pid
    namespace, or this process's own work under way, would) is removed. Best effort: a failure here
    never fails the command."""
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = TEMP_NAME.fullmatch(entry.name)
            if match and _owner_gone(int(match["pid"])):
                with contextlib.suppress(OSError):
                    _remove_unless_locked(entry)


def _owner_gone(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _remove_unless_locked(entry: os.DirEntry) -> None:
    st = entry.stat(follow_symlinks=False)
    is_dir = stat.S_ISDIR(st.st_mode)
    if st.st_uid != os.geteuid() or not (is_dir or stat.S_ISREG(st.st_mode)):
        return
    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its owner is alive
        if is_dir:
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    finally:
        os.close(fd)


class HeldOutput:
    """One file of a HeldTree: once written and fsynced it is held, unnamed, by the tree."""

    def __init__(self, tree: HeldTree, rel: Path):
        self._tree, self._rel = tree, rel

    @contextlib.contextmanager
    def writing(self, mode: int) -> Iterator[int]:
        file = UnnamedFile(self._tree.dst.parent, self._tree.dst.name, mode)
        try:
            yield file.fd
            file.sync()
        except BaseException:
            file.close()
            raise
        self._tree.files[self._rel] = file


class HeldTree:
    """A directory built from unnamed files, one open descriptor each, named only once all are complete:
    `publish` links them into a hidden staging directory beside `dst` and renames it into place.

    A kill before `publish` leaves nothing. A kill during it (a link per file, an fsync per directory,
    one rename) leaves a staging directory of complete files, which the next run removes."""

    def __init__(self, dst: Path, count: int):
        allow_open_files(count)
        self.dst = dst
        self.files: dict[Path, UnnamedFile] = {}

    def output(self, rel: Path) -> HeldOutput:
        return HeldOutput(self, rel)

    def publish(self, finish: Callable[[Path], None] | None = None) -> None:
        """Name every file and put the tree at `dst`, which must not exist or be an empty directory;
        `finish(tree)` runs on the complete, named tree just before it moves into place."""
        with _staging_directory(self.dst.parent, self.dst.name) as staging:
            tree = staging / self.dst.name  # dst's own name while it is finished: a model signature records it
            tree.mkdir()
            for rel, file in self.files.items():
                (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                file.link(tree / rel)
            if finish is not None:
                finish(tree)
            for directory, _, _ in os.walk(tree):
                fsync_dir(Path(directory))
            tree.chmod(0o755)
            if self.dst.exists():
                self.dst.rmdir()
            tree.rename(self.dst)
            staging.rmdir()
        fsync_dir(self.dst.parent)

    def close(self) -> None:
        for file in self.files.values():
            file.close()


def allow_open_files(count: int) -> None:
    """Make room to hold `count` files open: raise the soft limit if the hard one allows, else fail clearly."""
    need = count + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise CtfsError(f"{count} files are held open until the whole directory is written, which needs "
                        f"{need} open files; the limit is {hard} (raise it with ulimit -n)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@contextlib.contextmanager
def _staging_directory(parent: Path, name: str) -> Iterator[Path]:
    """A new private directory beside `name`, locked while in use and removed unless renamed away."""
    while True:
        path = temp_path(parent, name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
            break
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _lock(dfd)
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        os.close(dfd)


Output = str | os.PathLike[str] | HeldOutput


def atomic_output(target: Output, mode: int = 0o600) -> AbstractContextManager[int]:
    """A file descriptor whose contents replace `target` only if the block completes. An output of a
    HeldTree instead stays unnamed, held by the tree, until the whole tree is published."""
    if isinstance(target, HeldOutput):
        return target.writing(mode)
    return _replacing(Path(target), mode)


@contextlib.contextmanager
def _replacing(target: Path, mode: int) -> Iterator[int]:
    remove_stale_temps(target.parent)
    file = UnnamedFile(target.parent, target.name, mode)
    try:
        yield file.fd
        file.sync()
        file.replace(target)
    finally:
        file.close()


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


# os.pwritev takes at most IOV_MAX buffers per call (1024 on Linux).
IOV_BATCH = 1024


def write_all_vectored(fd: int, buffers: list, offset: int) -> None:
    """Write `buffers` back to back at `offset` with as few system calls as possible, no joining copy."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        batch = views[:IOV_BATCH]
        written = os.pwritev(fd, batch, offset)
        offset += written
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0
