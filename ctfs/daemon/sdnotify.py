"""Talk to systemd over $NOTIFY_SOCKET: readiness, status lines, stopping, watchdog keep-alive pings."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | None:
    """$NOTIFY_SOCKET as an AF_UNIX address: a path, or "@name" for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def notify(state: str) -> bool:
    """Send one sd_notify datagram ("READY=1", "STATUS=…", newline-separated assignments).

    Returns False, without raising, when not run under systemd or when the send fails: a service
    manager that cannot be told something must never take the mount down. The environment is
    read at every call and left in place, so any thread (the FUSE init callback included) can
    notify at any time; systemd's NotifyAccess=main accepts the datagram from any thread of the
    main process because the kernel stamps it with the process id, not the thread id.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _socket_address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state.split("\n", 1)[0], exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment: a status text must not be able to send READY=1.
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Tell systemd the mount serves (Type=notify then starts units ordered After= this one)."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")


def reloading() -> bool:
    """Announce a reload (keys on SIGHUP); send ready() when it is done."""
    return notify("RELOADING=1")


def stopping() -> bool:
    """Announce a clean shutdown, so systemd does not mistake the unmount for a crash."""
    return notify("STOPPING=1")


def watchdog_timeout() -> float | None:
    """The watchdog timeout in seconds systemd expects pings within, or None when none is expected.

    None when $WATCHDOG_USEC is unset or malformed, and when $WATCHDOG_PID names another process
    (the variables leaked into a child, e.g. a key command, are not addressed to it).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 1_000_000


class Watchdog:
    """Pings WATCHDOG=1 at half the timeout from a daemon thread while `healthy()` says so.

    `healthy` is the liveness test (e.g. "the daemon answers through its mount"). It may block: a check
    stuck on a hung mount sends no ping, which is exactly how systemd learns to restart us. An
    exception from it counts as unhealthy. Without a watchdog configured, start() does nothing.

    `wait(stopped, seconds)` paces the pings: it returns True once `stopped` is set, False when the
    seconds have passed (Event.wait; tests pass one that lets periods pass on their say-so).
    """

    def __init__(self, healthy: Callable[[], bool] | None = None,
                 wait: Callable[[threading.Event, float], bool] = threading.Event.wait):
        self._healthy = healthy
        self._wait = wait
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start pinging (the first ping at once); False when systemd expects no pings."""
        timeout = watchdog_timeout()
        if timeout is None or self._thread is not None:
            return False
        self._stopped.clear()
        self._thread = threading.Thread(
            target=self._run, args=(timeout / 2,), name="ctfs-watchdog", daemon=True
        )
        self._thread.start()
        return True

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop pinging; waits up to `timeout` for a health check in flight to return."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _is_healthy(self) -> bool:
        if self._healthy is None:
            return True
        try:
            return bool(self._healthy())
        except Exception:
            log.exception("watchdog health check failed")
            return False

    def _run(self, period: float) -> None:
        was_healthy = True
        while True:
            healthy = self._is_healthy()
            if healthy != was_healthy:
                log.warning("health check %s: watchdog pings %s",
                            "passes again" if healthy else "fails", "resume" if healthy else "withheld")
                was_healthy = healthy
            # Checked again after the health check, which may have been slow: no ping after stop().
            if healthy and not self._stopped.is_set():
                notify("WATCHDOG=1")
            if self._wait(self._stopped, period):
                return
