"""sd_notify against a real AF_UNIX datagram socket in systemd's place: exact datagrams, watchdog pacing."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import uuid

import pytest

from ctfs.daemon import sdnotify

# Only keeps a broken test from hanging: nothing here waits on the clock.
HANG_TIMEOUT = 10.0


class FakeManager:
    """The receiving end systemd would hold: a bound SOCK_DGRAM socket that also reports the sender's pid."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # systemd sets SO_PASSCRED so the kernel attaches the sender's pid: what NotifyAccess=main checks.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def receive(self, timeout: float = HANG_TIMEOUT) -> tuple[bytes, int]:
        """The next datagram and its sender's pid; raises TimeoutError when none comes."""
        self.sock.settimeout(timeout)
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pids = [struct.unpack("iII", payload[:12])[0] for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        return data, pids[0]

    def pending(self) -> list[bytes]:
        """Every datagram already sent, without waiting: a send to a datagram socket has queued it here
        by the time sendto() returns."""
        self.sock.setblocking(False)
        received = []
        try:
            while True:
                received.append(self.sock.recv(4096))
        except BlockingIOError:
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


def test_reloading_and_stopping_datagrams(manager):
    sdnotify.reloading()
    sdnotify.stopping()
    assert [manager.receive()[0] for _ in range(2)] == [b"RELOADING=1", b"STOPPING=1"]


def test_a_status_text_cannot_smuggle_another_assignment(manager):
    sdnotify.ready("bad file\nSTOPPING=1")
    assert manager.receive()[0] == b"READY=1\nSTATUS=bad file STOPPING=1"


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


class Periods:
    """The watchdog's wait between pings, driven by the test instead of the clock: the first `passing` waits
    return at once, as if their period had passed; the next one holds the watchdog until stop()."""

    def __init__(self, passing: int):
        self.asked: list[float] = []  # the seconds each wait was for
        self.stopped: threading.Event | None = None  # the watchdog's stop flag, once it first waits
        self.holding = threading.Event()  # set when the watchdog waits for stop()
        self._passing = passing

    def __call__(self, stopped: threading.Event, seconds: float) -> bool:
        self.asked.append(seconds)
        self.stopped = stopped
        if len(self.asked) <= self._passing:
            return stopped.is_set()
        self.holding.set()
        return stopped.wait()


def expect_watchdog(monkeypatch, usec: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))


def run_watchdog(periods: Periods, healthy=None) -> None:
    """Start a watchdog, let it ping through the periods that pass, then stop it."""
    watchdog = sdnotify.Watchdog(healthy, wait=periods)
    assert watchdog.start() is True
    try:
        assert periods.holding.wait(HANG_TIMEOUT), "the watchdog never came to wait for stop()"
    finally:
        watchdog.stop()


def test_watchdog_pings_at_once_then_at_half_the_timeout_and_not_after_stop(manager, monkeypatch):
    expect_watchdog(monkeypatch, "30000000")
    periods = Periods(passing=3)
    run_watchdog(periods)
    assert periods.asked == [15.0] * 4
    # One ping before the first wait, one after each of the three periods; none once stopped.
    assert manager.pending() == [b"WATCHDOG=1"] * 4


def test_a_health_check_in_flight_at_stop_sends_no_ping(manager, monkeypatch):
    expect_watchdog(monkeypatch, "30000000")
    in_flight, finish = threading.Event(), threading.Event()
    checks = itertools.count()

    def second_check_outlives_stop() -> bool:
        if next(checks) == 1:
            in_flight.set()
            finish.wait(HANG_TIMEOUT)
        return True

    periods = Periods(passing=1)
    watchdog = sdnotify.Watchdog(second_check_outlives_stop, wait=periods)
    assert watchdog.start() is True
    assert in_flight.wait(HANG_TIMEOUT)
    stopper = threading.Thread(target=watchdog.stop)
    stopper.start()
    assert periods.stopped.wait(HANG_TIMEOUT)
    finish.set()
    stopper.join()
    assert manager.pending() == [b"WATCHDOG=1"]  # the first check's ping only


def test_watchdog_does_nothing_when_systemd_expects_no_pings(manager):
    periods = Periods(passing=0)
    watchdog = sdnotify.Watchdog(wait=periods)
    assert watchdog.start() is False
    watchdog.stop()
    assert (manager.pending(), periods.asked) == ([], [])


def test_watchdog_addressed_to_another_process_stays_silent(manager, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    periods = Periods(passing=0)
    watchdog = sdnotify.Watchdog(wait=periods)
    assert watchdog.start() is False
    watchdog.stop()
    assert (manager.pending(), periods.asked) == ([], [])


def test_watchdog_withholds_pings_while_unhealthy_and_resumes_when_healthy_again(manager, monkeypatch):
    expect_watchdog(monkeypatch, "100000")
    answers = iter([False, False, True, True, False, True])
    run_watchdog(Periods(passing=5), lambda: next(answers))
    assert manager.pending() == [b"WATCHDOG=1"] * 3


@pytest.mark.parametrize("error", [OSError("Transport endpoint is not connected"), KeyError("a bug")])
def test_a_failing_health_check_counts_as_unhealthy(manager, monkeypatch, error):
    expect_watchdog(monkeypatch, "100000")

    def broken() -> bool:
        raise error

    run_watchdog(Periods(passing=2), broken)
    assert manager.pending() == []
