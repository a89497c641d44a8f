"""Facts about and actions on a mount point: is it mounted, stale, whose daemon serves it, unmount it."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ctfs.errors import CtfsError

log = logging.getLogger(__name__)
PID_XATTR = "user.ctfs.pid"
# umount2(2) flags; MNT_FORCE makes the kernel abort a FUSE connection.
MNT_FORCE, MNT_DETACH = 1, 2


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def mount_entry(mountpoint: str) -> dict[str, str] | None:
    """The mountinfo entry of `mountpoint`, if something is mounted exactly there."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == target:
                found = {"fstype": fields[sep + 1], "source": _unescape(fields[sep + 2]), "dev": fields[2]}
    return found  # the last entry wins: it is the one on top


FSNAME = "ctfs"  # what /proc/mounts shows as our mounts' source; their type is fuse.ctfs


def is_ctfs(entry: dict[str, str]) -> bool:
    """Whether a mount_entry() is a ctfs mount: ctfs never touches anyone else's."""
    return entry["fstype"] == f"fuse.{FSNAME}" or (entry["fstype"] == "fuse" and entry["source"] == FSNAME)


# What the kernel answers on a mount whose daemon died: ENOTCONN, or ECONNABORTED for a request that
# was in flight, or arrived while the connection was being torn down.
DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


def is_stale(mountpoint: str) -> bool:
    """A FUSE mount whose daemon died: every access fails."""
    try:
        # Not stat(): for a second or so after the daemon died, the kernel answers that from its cache.
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in DEAD_MOUNT_ERRNOS
    return False


def daemon_pid(mountpoint: str) -> int | None:
    try:
        return int(os.getxattr(mountpoint, PID_XATTR))
    except (OSError, ValueError):
        return None


def ask_daemon_pid(mountpoint: str, timeout: float) -> int | None:
    """daemon_pid(), or None when the daemon does not answer within `timeout` seconds.

    The kernel keeps no cache of extended attributes, so the answer comes from the daemon itself every
    time (a stat of the mount root may come from the kernel's attribute cache). A question left
    unanswered keeps its thread blocked until the daemon answers or dies."""
    answer: list[int | None] = []
    asker = threading.Thread(target=lambda: answer.append(daemon_pid(mountpoint)), name="ctfs-ask-pid", daemon=True)
    asker.start()
    asker.join(timeout)
    return answer[0] if answer else None


def _fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        path = shutil.which(name)
        if path:
            return path
    raise CtfsError("fusermount3 not found; install the fuse3 package")


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount; a busy mount is an error unless `lazy` (then it detaches now and goes when unused)."""
    args = [_fusermount(), "-u", *(["-z"] if lazy else []), mountpoint]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "fusermount failed"
        raise CtfsError(f"cannot unmount {mountpoint}: {reason}")


def abort_and_detach(mountpoint: str) -> None:
    """End the FUSE session now and detach the mount, as libfuse does on SIGTERM: requests in flight and
    files still open fail with ENOTCONN. Only root may abort; for anyone else this is a lazy unmount,
    and the daemon serves the files still open until they are closed."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), MNT_FORCE | MNT_DETACH) != 0:
            code = ctypes.get_errno()
            raise CtfsError(f"cannot unmount {mountpoint}: {os.strerror(code)}")
        return
    unmount(mountpoint, lazy=True)


def clean_stale(mountpoint: str) -> bool:
    """Lazily unmount a dead ctfs mount left by a killed daemon; True if one was there."""
    entry = mount_entry(mountpoint)
    if entry is None or not is_ctfs(entry) or not is_stale(mountpoint):
        return False
    log.warning("%s: removing a stale mount left by a daemon that died", mountpoint)
    unmount(mountpoint, lazy=True)
    return True


def has_exited(pid: int) -> bool:
    """Gone, or a zombie: a background daemon's parent has exited, so it waits for init to reap it,
    which may be slow or never (a container's init); kill(pid, 0) would still call it alive."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
            state = stat_file.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if has_exited(pid):
            return True
        time.sleep(0.05)
    return False


def raise_readahead(mountpoint: str, kilobytes: int) -> bool:
    """Raise the mount's block-device read-ahead: without it the kernel sends 128 KiB requests, and
    only root may write it. Returns whether it was set."""
    dev = os.stat(mountpoint).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        knob.write_text(str(kilobytes))
    except OSError as exc:
        log.info("read_ahead_kb left at its default (%s): large reads will be slower", exc.strerror)
        return False
    return True
