"""ctfs@.service's own Exec* commands run as systemd runs them: real notify socket, watchdog and credentials."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import make_keys, seeded_tensors, write_plain
from mounting import (
    call_with_timeout,
    force_unmount,
    mountinfo_entry,
    process_gone,
    requires_fuse,
    wait_until,
    write_key_file,
)
from test_systemd_units import CTFS_UNIT, INSTALLED_CTFS, values

from ctfs.daemon.mountpoint import ask_daemon_pid
from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file

pytestmark = requires_fuse

INSTANCE = "demo"
INSTALLED_CONFIG = f"/etc/ctfs/{INSTANCE}.toml"
VENV_CTFS = str(Path(sys.executable).with_name("ctfs"))
# What systemd puts in the environment for WatchdogSec=2s: pings are then due every second.
WATCHDOG_USEC = 2_000_000
START_TIMEOUT = 30.0
MODEL = "model.safetensors"
# Not passed on from the test's own environment: systemd's variables are the test's to set, and only
# the credentials directory may supply keys. No keyring either (as on a headless server): it could
# hold keys that other tests stored.
NOT_INHERITED = ("CRYPTOTENSOR_KEYS", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass(frozen=True)
class UnitCommand:
    argv: list[str]
    may_fail: bool  # the "-" prefix: systemd ignores a non-zero exit


def unit_command(key: str, config: Path) -> UnitCommand:
    """The unit's `key=` line as systemd would run it for ctfs@demo, with the venv's ctfs and `config`
    in place of the installed ones; everything else is taken verbatim."""
    (line,) = values(CTFS_UNIT, key)
    may_fail = line.startswith("-")
    argv = shlex.split(line.removeprefix("-").replace("%i", INSTANCE))
    assert argv[0] == INSTALLED_CTFS and INSTALLED_CONFIG in argv, line
    return UnitCommand([VENV_CTFS, *(str(config) if arg == INSTALLED_CONFIG else arg for arg in argv[1:])],
                       may_fail)


def run_unit_command(key: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(unit_command(key, config).argv, capture_output=True, text=True, timeout=START_TIMEOUT,
                          stdin=subprocess.DEVNULL)


@dataclass
class Datagram:
    pid: int  # the sender, as the kernel stamped it (SO_PASSCRED): what NotifyAccess=main checks
    fields: dict[str, str]
    # For READY=1 only: what reading the model through the mount gave at that very moment.
    read_at_ready: bytes | OSError | None = None


class NotifySocket:
    """systemd's end of $NOTIFY_SOCKET: records every datagram; at each READY=1 it first reads the model
    through the mount, before taking the next datagram, so "ready" is checked as a consumer sees it."""

    def __init__(self, path: Path, read_model: Callable[[], bytes]):
        self.path = path
        self._read_model = read_model
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.datagrams: list[Datagram] = []
        self._arrived = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-socket", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            (pid,) = [struct.unpack("iII", payload[:12])[0] for level, kind, payload in ancillary
                      if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            datagram = Datagram(pid, fields)
            if fields.get("READY") == "1":
                try:
                    datagram.read_at_ready = self._read_model()
                except OSError as exc:
                    datagram.read_at_ready = exc
            with self._arrived:
                self.datagrams.append(datagram)
                self._arrived.notify_all()

    def wait_for(self, name: str, value: str = "1", *, after: int = 0, timeout: float = START_TIMEOUT) -> int:
        """The index of the first datagram from index `after` on that sets `name=value`."""
        def found() -> int | None:
            return next((i for i in range(after, len(self.datagrams))
                         if self.datagrams[i].fields.get(name) == value), None)

        with self._arrived:
            if not self._arrived.wait_for(lambda: found() is not None, timeout):
                pytest.fail(f"no {name}={value} within {timeout:g} s; got {[d.fields for d in self.datagrams]}")
            return found()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


@dataclass
class Service:
    """One ctfs@demo: its config, credentials, and the daemon the unit's ExecStart= started."""

    root: Path
    config: Path
    mountpoint: Path
    credentials: Path
    expected_model: bytes
    notify: NotifySocket | None = None
    daemon: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)

    def read_model(self) -> bytes:
        return (self.mountpoint / MODEL).read_bytes()

    def start(self, *, credentials: bool = True) -> subprocess.Popen:
        """ExecStart= with the environment systemd gives a Type=notify, WatchdogSec=2s service; the shell
        sets WATCHDOG_PID to its own pid and execs, so it names the daemon as systemd's does."""
        self.notify = self.notify or NotifySocket(self.root / "notify.sock", self.read_model)
        env = {name: value for name, value in os.environ.items() if name not in NOT_INHERITED}
        env.update(NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        if credentials:
            env["CREDENTIALS_DIRECTORY"] = str(self.credentials)
        log = self.root / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.daemon = subprocess.Popen(
                ["sh", "-c", 'export WATCHDOG_PID=$$; exec "$@"', "sh", *unit_command("ExecStart", self.config).argv],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        return self.daemon

    def start_ready(self) -> tuple[subprocess.Popen, int]:
        """Start, and wait for READY=1; returns the daemon and the index of its READY=1 datagram."""
        after = len(self.notify.datagrams) if self.notify else 0
        daemon = self.start()
        try:
            return daemon, self.notify.wait_for("READY", after=after)
        except BaseException:
            daemon.kill()
            raise

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon did not exit within {timeout:g} s\n{self.log()}")

    def log(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs if log.exists())

    def tear_down(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        force_unmount(self.mountpoint, None)
        if self.notify is not None:
            self.notify.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """/etc/ctfs/demo.toml's stand-in (no `keys`, as in systemd/example.toml) and a credentials
    directory laid out as systemd's LoadCredential= makes it: 0500, the key set at 0400."""
    keys = make_keys()
    plain = write_plain(tmp_path / "plain.safetensors", seeded_tensors(0))
    source, mountpoint, credentials = tmp_path / "encrypted", tmp_path / "mnt", tmp_path / "credentials"
    for directory in (source, mountpoint, credentials):
        directory.mkdir()
    encrypt_file(plain, source / MODEL, keys.enc, keys.sign, EncryptOptions("2", 4096))
    decrypt_file(source / MODEL, tmp_path / "expected.safetensors", keys.store)
    write_key_file(credentials / "keys.jwks", keys).chmod(0o400)
    credentials.chmod(0o500)
    config = tmp_path / f"{INSTANCE}.toml"
    config.write_text(f'source = "{source}"\nmountpoint = "{mountpoint}"\n')
    svc = Service(tmp_path, config, mountpoint, credentials, (tmp_path / "expected.safetensors").read_bytes())
    try:
        yield svc
    finally:
        svc.tear_down()


def test_ready_is_sent_by_the_main_pid_only_once_the_model_reads_through_the_mount(service):
    daemon, ready = service.start_ready()
    datagram = service.notify.datagrams[ready]
    assert datagram.read_at_ready == service.expected_model, service.log()
    assert datagram.fields["STATUS"].startswith("serving ")
    assert {d.pid for d in service.notify.datagrams} == {daemon.pid}


def test_without_credentials_the_service_fails_and_never_reports_ready(service):
    service.start(credentials=False)
    assert service.wait_exit() != 0
    assert "no encryption key" in service.log()
    assert not any("READY" in d.fields for d in service.notify.datagrams)
    assert mountinfo_entry(service.mountpoint) is None


def test_watchdog_pings_keep_coming_from_the_main_pid_once_ready(service):
    """Their pacing (half of WATCHDOG_USEC) is test_sdnotify's to check, without a clock."""
    daemon, ready = service.start_ready()
    pings = [ready]
    for _ in range(3):
        pings.append(service.notify.wait_for("WATCHDOG", after=pings[-1] + 1))
    assert {service.notify.datagrams[i].pid for i in pings[1:]} == {daemon.pid}


def test_reload_reports_reloading_then_ready_and_keeps_serving(service):
    daemon, ready = service.start_ready()
    result = subprocess.run([VENV_CTFS, "reload", str(service.mountpoint)], capture_output=True, text=True,
                            timeout=START_TIMEOUT)
    assert result.returncode == 0, result.stderr
    reloading = service.notify.wait_for("RELOADING", after=ready + 1)
    ready_again = service.notify.wait_for("READY", after=reloading + 1)
    assert {service.notify.datagrams[i].pid for i in (reloading, ready_again)} == {daemon.pid}
    assert service.notify.datagrams[ready_again].read_at_ready == service.expected_model


def test_sigterm_reports_stopping_exits_0_and_unmounts(service):
    daemon, ready = service.start_ready()
    daemon.send_signal(signal.SIGTERM)
    assert service.wait_exit() == 0, service.log()
    stopping = service.notify.wait_for("STOPPING", after=ready + 1)
    assert service.notify.datagrams[stopping].pid == daemon.pid
    assert mountinfo_entry(service.mountpoint) is None


def test_exec_stop_unmounts_and_a_sigterm_right_after_still_exits_cleanly(service):
    """systemd sends SIGTERM to whatever is left once ExecStop= returns: the daemon may be anywhere in its
    shutdown then. Signals keep coming from the moment the mount is gone until the daemon has exited."""
    daemon, _ready = service.start_ready()
    exec_stop = subprocess.Popen(unit_command("ExecStop", service.config).argv, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: mountinfo_entry(service.mountpoint) is None, START_TIMEOUT)
    signals = 0
    while daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        signals += 1
        time.sleep(0.001)
    assert daemon.returncode == 0, f"exit status {daemon.returncode} after {signals} SIGTERMs\n{service.log()}"
    _out, err = exec_stop.communicate(timeout=START_TIMEOUT)
    assert exec_stop.returncode == 0, err
    service.notify.wait_for("STOPPING")


def test_a_busy_mount_survives_exec_stop_and_the_sigterm_after_it_ends_the_session(service):
    """A file held open does not keep the daemon from stopping, nor its mount from going."""
    daemon, _ready = service.start_ready()
    with open(service.mountpoint / MODEL, "rb") as held:
        result = run_unit_command("ExecStop", service.config)
        assert result.returncode != 0 and "busy" in result.stderr, result.stderr
        assert held.read(8) == service.expected_model[:8]
        daemon.send_signal(signal.SIGTERM)
        assert service.wait_exit() == 0, service.log()
        assert mountinfo_entry(service.mountpoint) is None


def test_exec_stop_on_an_absent_mount_says_so_and_the_unit_ignores_its_status(service):
    result = run_unit_command("ExecStop", service.config)
    assert result.returncode != 0
    assert result.stderr.strip() == f"ctfs: error: {service.mountpoint} is not mounted"
    assert unit_command("ExecStop", service.config).may_fail


def test_exec_start_pre_leaves_an_absent_or_a_live_mount_alone(service):
    result = run_unit_command("ExecStartPre", service.config)
    assert (result.returncode, result.stderr) == (0, "")
    daemon, _ready = service.start_ready()
    result = run_unit_command("ExecStartPre", service.config)
    assert (result.returncode, result.stderr) == (0, "")
    assert service.read_model() == service.expected_model
    assert ask_daemon_pid(str(service.mountpoint), 5.0) == daemon.pid
    assert not unit_command("ExecStartPre", service.config).may_fail


def test_after_a_crash_exec_start_pre_clears_the_dead_mount_and_the_service_starts_again(service):
    daemon, _ready = service.start_ready()
    daemon.kill()
    daemon.wait()
    assert mountinfo_entry(service.mountpoint) is not None
    with pytest.raises(OSError) as dead:
        os.statvfs(service.mountpoint)
    assert dead.value.errno == errno.ENOTCONN  # what a restarted daemon would meet without ExecStartPre=
    result = run_unit_command("ExecStartPre", service.config)
    assert result.returncode == 0, result.stderr
    assert mountinfo_entry(service.mountpoint) is None
    daemon, ready = service.start_ready()
    assert service.notify.datagrams[ready].read_at_ready == service.expected_model


def all_threads_stopped(pid: int) -> bool:
    """SIGSTOP has taken effect: a thread still running could answer the daemon's requests."""
    try:
        states = [stat.read_text().rpartition(")")[2].split()[0] for stat in Path(f"/proc/{pid}/task").glob("*/stat")]
    except FileNotFoundError:  # a thread exited while we looked: it was not stopped yet
        return False
    return all(state == "T" for state in states)


def test_the_health_probe_reaches_the_daemon_where_a_stat_of_the_mount_does_not(service):
    """The watchdog's health check must fail on a hung daemon; the kernel answers a stat of the mount root
    from its attribute cache without asking the daemon, but sends every getxattr to it."""
    daemon, _ready = service.start_ready()
    mountpoint = str(service.mountpoint)
    os.stat(mountpoint)
    daemon.send_signal(signal.SIGSTOP)
    try:
        assert wait_until(lambda: all_threads_stopped(daemon.pid)), "SIGSTOP did not stop the daemon"
        # Either call would hang for good on a question the stopped daemon must answer: the bound
        # only turns that into a failure.
        call_with_timeout(lambda: os.stat(mountpoint), START_TIMEOUT)
        assert call_with_timeout(lambda: ask_daemon_pid(mountpoint, 0.5), START_TIMEOUT) is None
    finally:
        daemon.send_signal(signal.SIGCONT)
    assert ask_daemon_pid(mountpoint, 5.0) == daemon.pid
    assert not process_gone(daemon.pid)
