"""sd_notify against a real AF_UNIX datagram socket in systemd's place: exact datagrams, watchdog timing."""

from __future__ import annotations

import os
import socket
import statistics
import struct
import threading
import time
import uuid

import pytest

from ctfs.daemon import sdnotify


class FakeManager:
    """The receiving end systemd would hold: a bound SOCK_DGRAM socket that also reports the sender's pid."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # systemd sets SO_PASSCRED so the kernel attaches the sender's pid: what NotifyAccess=main checks.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def receive(self, timeout: float = 2.0) -> tuple[bytes, int]:
        """The next datagram and its sender's pid; raises TimeoutError when none comes."""
        self.sock.settimeout(timeout)
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pids = [struct.unpack("iII", payload[:12])[0] for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        return data, pids[0]

    def datagrams_within(self, seconds: float) -> list[tuple[float, bytes]]:
        """Every datagram arriving in the next `seconds`, with its arrival time."""
        received = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                data, _pid = self.receive(timeout=left)
            except TimeoutError:
                break
            received.append((time.monotonic(), data))
        return received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path, monkeypatch):
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    else:
        name = f"ctfs-test-{uuid.uuid4().hex}"
        address = "\0" + name
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    fake = FakeManager(address)
    yield fake
    fake.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready("serving") is False


def test_ready_sends_ready_and_status_in_one_datagram(manager):
    assert sdnotify.ready("serving /srv/models/llama") is True
    assert manager.receive() == (b"READY=1\nSTATUS=serving /srv/models/llama", os.getpid())


def test_ready_without_status(manager):
    assert sdnotify.ready() is True
    assert manager.receive()[0] == b"READY=1"


def test_status_reloading_and_stopping_datagrams(manager):
    sdnotify.status("opening keys")
    sdnotify.reloading()
    sdnotify.stopping()
    assert [manager.receive()[0] for _ in range(3)] == [b"STATUS=opening keys", b"RELOADING=1", b"STOPPING=1"]


def test_a_status_text_cannot_smuggle_another_assignment(manager):
    sdnotify.status("bad file\nREADY=1")
    assert manager.receive()[0] == b"STATUS=bad file READY=1"


def test_notify_from_another_thread_carries_the_process_pid_and_keeps_the_environment(manager):
    # The daemon sends READY=1 from the FUSE init callback, on a libfuse thread; later notifications
    # (status, watchdog, stopping) need the variables still set.
    sent = []
    thread = threading.Thread(target=lambda: sent.append(sdnotify.ready("mounted")))
    thread.start()
    thread.join()
    assert sent == [True]
    assert manager.receive() == (b"READY=1\nSTATUS=mounted", os.getpid())
    assert "NOTIFY_SOCKET" in os.environ
    assert sdnotify.stopping() is True
    assert manager.receive()[0] == b"STOPPING=1"


def test_a_vanished_manager_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.notify("READY=1") is False


def test_an_unusable_notify_socket_value_is_ignored(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path.sock")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("0", None, None),
    ("not-a-number", None, None),
    ("30000000", None, 30.0),
    ("30000000", "self", 30.0),
    ("30000000", "other", None),
])
def test_watchdog_timeout_follows_usec_and_pid(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid))):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert sdnotify.watchdog_timeout() == expected


def test_watchdog_pings_at_half_the_timeout_and_stops(manager, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    watchdog = sdnotify.Watchdog()
    started = time.monotonic()
    assert watchdog.start() is True
    pings = manager.datagrams_within(0.65)
    watchdog.stop()

    assert {data for _, data in pings} == {b"WATCHDOG=1"}
    assert pings[0][0] - started < 0.05, "the first ping goes out at once"
    assert 5 <= len(pings) <= 8
    gaps = [later - earlier for (earlier, _), (later, _) in zip(pings, pings[1:])]
    assert 0.08 <= statistics.median(gaps) <= 0.13

    manager.datagrams_within(0.05)  # a ping already in flight at stop()
    assert manager.datagrams_within(0.3) == []


def test_watchdog_does_nothing_when_systemd_expects_no_pings(manager):
    watchdog = sdnotify.Watchdog()
    assert watchdog.start() is False
    assert manager.datagrams_within(0.2) == []
    watchdog.stop()


def test_watchdog_addressed_to_another_process_stays_silent(manager, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    watchdog = sdnotify.Watchdog()
    assert watchdog.start() is False
    assert manager.datagrams_within(0.2) == []
    watchdog.stop()


def test_watchdog_withholds_pings_while_unhealthy(manager, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    healthy = threading.Event()
    with sdnotify.Watchdog(healthy.is_set):
        assert manager.datagrams_within(0.3) == []
        healthy.set()
        pings = manager.datagrams_within(0.3)
    assert len(pings) >= 2
    assert {data for _, data in pings} == {b"WATCHDOG=1"}


def test_a_failing_health_check_counts_as_unhealthy(manager, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")

    def broken() -> bool:
        raise OSError("Transport endpoint is not connected")

    with sdnotify.Watchdog(broken):
        assert manager.datagrams_within(0.3) == []
