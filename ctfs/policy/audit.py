"""The audit trail: one JSON line per access decision, written to a file or the journal, and read back."""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import BinaryIO

from ctfs.policy.engine import Decision

JOURNAL_IDENTIFIER = "ctfs-audit"
_LOG_WARNING, _LOG_INFO = 4, 6


class AuditLog:
    """Where decision records go. Build one with `to_file` or `to_journal`; safe to share between threads."""

    def __init__(self, emit: Callable[[dict, str], None], close: Callable[[], None] = lambda: None):
        self._emit = emit
        self._close = close
        self._lock = threading.Lock()

    @classmethod
    def to_file(cls, path: str) -> AuditLog:
        """Append to `path`, created 0600; each record reaches the file with one write(2)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # A file object, not the bare fd: after close() a write fails instead of hitting a reused fd.
        out = os.fdopen(fd, "ab", buffering=0)
        return cls(lambda _record, line: _write_all(out, line), out.close)

    @classmethod
    def to_journal(cls) -> AuditLog:
        """Send to the systemd journal natively, or as a JSON line on stderr without python-systemd."""
        try:
            from systemd import journal
        except ImportError:
            # A service's stderr is captured by journald, so the line still lands in the journal.
            return cls(lambda _record, line: _write_stderr(line))
        return cls(lambda record, line: journal.send(line, **_journal_fields(record)))

    def record(
        self,
        *,
        file: str,
        process: Mapping,
        decision: Decision,
        key_ids: Sequence[str],
        labels: Mapping[str, str],
        cached: bool,
    ) -> dict:
        """Write one decision and return the record written: identifiers only, never key material or the
        command line."""
        rec = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "file": file,
            # cmdline is left out on purpose: arguments often carry tokens and passwords.
            "process": {field: process.get(field) for field in ("pid", "uid", "gid", "exe")},
            "decision": "allow" if decision.allowed else "deny",
            "reason": decision.reason,
            "key_ids": [str(key_id) for key_id in key_ids],
            "labels": dict(labels),
            "cached": cached,
        }
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        with self._lock:
            self._emit(rec, line)
        return rec

    def close(self) -> None:
        with self._lock:
            self._close()


def _journal_fields(rec: dict) -> dict:
    """Structured fields, so `journalctl CTFS_DECISION=deny` works without parsing MESSAGE."""
    return {
        "SYSLOG_IDENTIFIER": JOURNAL_IDENTIFIER,
        "PRIORITY": str(_LOG_INFO if rec["decision"] == "allow" else _LOG_WARNING),
        "CTFS_DECISION": rec["decision"],
        "CTFS_FILE": rec["file"],
        "CTFS_UID": str(rec["process"]["uid"]),
        "CTFS_EXE": str(rec["process"]["exe"]),
    }


def _write_all(out: BinaryIO, line: str) -> None:
    data = line.encode()
    while data:
        data = data[out.write(data) :]


def _write_stderr(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()


class AuditRecords(Iterator[dict]):
    """The records of an audit file in order; `malformed` counts the lines skipped so far."""

    def __init__(self, path: str):
        self.malformed = 0
        self._records = self._parse(path)

    def __next__(self) -> dict:
        return next(self._records)

    def _parse(self, path: str) -> Iterator[dict]:
        with _open_text(path) as lines:
            for line in lines:
                if not line.strip():
                    continue
                rec = _parse_line(line)
                if rec is None:
                    self.malformed += 1
                else:
                    yield rec


def read_records(path: str) -> AuditRecords:
    """Iterate the records in an audit file ("-" reads stdin, e.g. from `journalctl -o cat`)."""
    return AuditRecords(path)


def _open_text(path: str):
    if path == "-":
        return open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)
    return open(path, encoding="utf-8", errors="replace")


def _parse_line(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def filter_records(
    records: Iterable[dict],
    *,
    decision: str | None = None,
    uid: int | None = None,
    file_glob: str | None = None,
    since: datetime | None = None,
) -> Iterator[dict]:
    """Keep records matching every given criterion; `since` without a zone is local time."""
    since_utc = since.astimezone(timezone.utc) if since else None
    for rec in records:
        process = rec.get("process") if isinstance(rec.get("process"), dict) else {}
        if decision is not None and rec.get("decision") != decision:
            continue
        if uid is not None and process.get("uid") != uid:
            continue
        if file_glob is not None and not fnmatch.fnmatchcase(str(rec.get("file")), file_glob):
            continue
        if since_utc is not None and not _at_or_after(rec.get("time"), since_utc):
            continue
        yield rec


def _at_or_after(stamp: object, since: datetime) -> bool:
    try:
        return datetime.fromisoformat(str(stamp)) >= since
    except (ValueError, TypeError):
        # A record without a readable time cannot be shown to be recent enough.
        return False


def format_record(rec: Mapping) -> str:
    """One human-readable line: time, decision, who, which file, and why."""
    process = rec.get("process") if isinstance(rec.get("process"), dict) else {}
    who = " ".join(f"{field}={process.get(field, '?')}" for field in ("uid", "gid", "pid"))
    cached = " (cached)" if rec.get("cached") else ""
    keys = ",".join(map(str, rec.get("key_ids") or [])) or "-"
    return (
        f"{rec.get('time', '?')} {str(rec.get('decision', '?')).upper():5} {rec.get('file', '?')} "
        f"{who} exe={process.get('exe', '?')} keys={keys}: {rec.get('reason', '')}{cached}"
    )
