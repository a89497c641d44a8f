"""The input document a policy sees: who reads which file, when, on which host, under which labels."""

from __future__ import annotations

import functools
import os
import posixpath
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

# Unit types whose cgroups hold processes; slices only group other units.
_PROCESS_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")


@dataclass(frozen=True)
class Reader:
    """The caller of one FUSE request, as the kernel reports it (pid is the calling thread's id)."""

    pid: int
    uid: int
    gid: int


def process_info(pid: int) -> dict:
    """What /proc says about a process; each field is None when missing or unreadable (never raises)."""
    proc = f"/proc/{pid}"
    status = _read_text(f"{proc}/status")
    cgroup = cgroup_path(_read_text(f"{proc}/cgroup"))
    return {
        "pid": pid,
        "uid": _fs_id(status, "Uid:"),
        "gid": _fs_id(status, "Gid:"),
        "exe": _readlink(f"{proc}/exe"),
        "cmdline": _cmdline(_read_bytes(f"{proc}/cmdline")),
        "cgroup": cgroup,
        "unit": unit_of_cgroup(cgroup),
    }


def build_input(
    reader: Reader,
    *,
    file: str,
    model_dir: str,
    labels: Mapping[str, str],
    now: datetime | None = None,
) -> dict:
    """The policy input for `reader` opening `file` (a path inside the mount, e.g. "/llama/x.safetensors")."""
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    # FUSE's credentials are taken with the request; /proc is read later and only fills in the rest.
    process = process_info(reader.pid) | {"uid": reader.uid, "gid": reader.gid}
    return {
        "process": process,
        "file": {"path": path_text(file), "name": path_text(posixpath.basename(file)),
                 "model_dir": path_text(model_dir), "utf8": is_utf8(file)},
        "time": {"rfc3339": _rfc3339(moment), "unix": int(moment.timestamp())},
        "host": host_info(),
        "labels": dict(labels),
    }


def host_info() -> dict:
    """This machine's hostname and systemd machine-id, read once per process."""
    hostname, machine_id = _host_identity()
    return {"hostname": hostname, "machine_id": machine_id}


@functools.cache
def _host_identity() -> tuple[str, str | None]:
    machine_id = _read_text("/etc/machine-id")
    return socket.gethostname(), (machine_id.strip() or None) if machine_id else None


def cgroup_path(proc_cgroup: str | None) -> str | None:
    """The process's cgroup path from /proc/PID/cgroup: the unified (v2) line, else systemd's v1 one."""
    if proc_cgroup is None:
        return None
    for line in proc_cgroup.splitlines():
        _hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers in ("", "name=systemd") and path:
            return path
    return None


def unit_of_cgroup(path: str | None) -> str | None:
    """The system manager's unit for a cgroup path, as `systemctl status PID` names it.

    The outermost unit wins: a user can name a unit anything inside user@UID.service (including the
    name of a system service), so only the system manager's unit is trustworthy.
    """
    if path is None:
        return None
    return next((part for part in path.split("/") if part.endswith(_PROCESS_UNIT_SUFFIXES)), None)


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _fs_id(status: str | None, field: str) -> int | None:
    """The filesystem uid/gid from /proc/PID/status (real, effective, saved, fs): the one FUSE reports."""
    if status is None:
        return None
    for line in status.splitlines():
        if line.startswith(field):
            ids = line.split()
            return int(ids[4]) if len(ids) == 5 else None
    return None


def _cmdline(raw: bytes | None) -> list[str] | None:
    if raw is None:
        return None
    args = raw.split(b"\0")
    if args[-1] == b"":  # the terminating NUL; a process that rewrote its title may lack it
        args.pop()
    return [_decode(arg) for arg in args]


def _readlink(path: str) -> str | None:
    try:
        return _decode(os.readlink(os.fsencode(path)))
    except OSError:
        return None


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _read_text(path: str) -> str | None:
    raw = _read_bytes(path)
    return None if raw is None else _decode(raw)


def is_utf8(path: str) -> bool:
    """Whether a path (as os.fsdecode gives it) was valid UTF-8 on disk."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def path_text(path: str) -> str:
    """A path as policies and logs see it: valid UTF-8 unchanged; each byte that is not UTF-8 written as
    the four characters \\xHH. Never a lone surrogate, which crashes the Rego engine."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _decode(raw: bytes) -> str:
    # Replacement, not surrogateescape: the text goes into JSON and into Rego, which need valid UTF-8.
    return raw.decode("utf-8", "replace")
