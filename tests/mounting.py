"""Real mounts for tests: the daemon always in a child process, every mount undone, every child timed out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import Keys, seeded_tensors, write_plain, write_upstream

from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file

TESTS_DIR = Path(__file__).parent
CONSUMERS_SCRIPT = TESTS_DIR / "consumers.py"
# Generous for 2 busy cores, yet a hung mount fails the test instead of hanging the run.
CHILD_TIMEOUT = 90.0
DAEMON_EXIT_TIMEOUT = 10.0


def _fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "not root: they mount file systems and probe the daemon process as root"
    return None


_FUSE_UNAVAILABLE = _fuse_unavailable()
requires_fuse = pytest.mark.skipif(
    _FUSE_UNAVAILABLE is not None,
    reason=f"REAL-MOUNT TESTS NOT RUN: {_FUSE_UNAVAILABLE}. They need /dev/fuse and root.",
)


def ctfs(*args: str, timeout: float = CHILD_TIMEOUT, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the ctfs CLI as a child process (`prefix` wraps it, e.g. in setpriv)."""
    return subprocess.run([*prefix, sys.executable, "-m", "ctfs", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def write_key_file(path: Path, *keys: Keys, private: bool = True) -> Path:
    """A JWK Set (mode 0600) with each pair's master key and signing key, or only the verify keys."""
    entries = []
    for pair in keys:
        if private:
            entries += [pair.enc_jwk, pair.sign_jwk]
        else:
            entries.append({k: v for k, v in pair.sign_jwk.items() if k != "d"})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"keys": entries}, out)
    return path


def mountinfo_entry(mountpoint: Path) -> list[str] | None:
    """Our own reading of /proc/self/mountinfo (paths in tests have no characters that need escaping)."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            found = fields
    return found


def proc_mounts_line(mountpoint: Path) -> list[str] | None:
    lines = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    matches = [fields for fields in lines if fields[1] == str(mountpoint)]
    return matches[-1] if matches else None


def daemon_pid(mountpoint: Path) -> int:
    return int(os.getxattr(mountpoint, "user.ctfs.pid"))


def process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for an init that reaps it whenever it likes."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_until(condition: Callable[[], bool], timeout: float = DAEMON_EXIT_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def force_unmount(mountpoint: Path, pid: int | None) -> None:
    """Leave nothing behind whatever state the mount is in: umount, then lazily, then kill the daemon."""
    if mountinfo_entry(mountpoint) is not None and ctfs("umount", str(mountpoint), timeout=30).returncode != 0:
        ctfs("umount", "--lazy", str(mountpoint), timeout=30)
    if pid is not None and not wait_until(lambda: process_gone(pid)):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if mountinfo_entry(mountpoint) is not None:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, timeout=30)


@dataclass
class Mount:
    source: Path
    mountpoint: Path
    log_file: Path
    pid: int

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def path(self, name: str) -> Path:
        return self.mountpoint / name


def start_mount(source: Path, mountpoint: Path, *options: str, log_file: Path | None = None,
                prefix: tuple[str, ...] = ()) -> Mount:
    """`ctfs mount` in a child process; fails the test with the daemon's log if the mount does not serve."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    log_file = log_file or mountpoint.with_name(mountpoint.name + ".log")
    result = ctfs("mount", str(source), str(mountpoint), *options, "--log-file", str(log_file), prefix=prefix)
    if result.returncode != 0:
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        force_unmount(mountpoint, None)
        pytest.fail(f"ctfs mount failed ({result.returncode}): {result.stderr.strip()}\n{log}")
    return Mount(source, mountpoint, log_file, daemon_pid(mountpoint))


@contextmanager
def mounted(source: Path, mountpoint: Path, *options: str, log_file: Path | None = None,
            prefix: tuple[str, ...] = ()) -> Iterator[Mount]:
    """A serving mount for the `with` body, always unmounted afterwards, even when the body fails."""
    mount = start_mount(source, mountpoint, *options, log_file=log_file, prefix=prefix)
    try:
        yield mount
    finally:
        force_unmount(mountpoint, mount.pid)


@dataclass
class ConsumerRun:
    """How a consumer child ended: its exit status (negative: killed by that signal), what it reported
    for each file it finished, in order, and its stderr."""

    returncode: int
    results: list[dict]
    stderr: str

    @property
    def result(self) -> dict | None:
        """The report on the only (or the last) file."""
        return self.results[-1] if self.results else None


def consume(kind: str, *args: str | Path, timeout: float = CHILD_TIMEOUT) -> ConsumerRun:
    """Read the files in `args` the way consumer `kind` of tests/consumers.py does, in a child process."""
    proc = subprocess.run([sys.executable, str(CONSUMERS_SCRIPT), kind, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return ConsumerRun(proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr)


def call_with_timeout(func: Callable[[], object], timeout: float = CHILD_TIMEOUT) -> object:
    """Run `func` in a thread: a read stuck in the kernel fails the test instead of hanging the run
    (the mount's teardown then kills the daemon, which releases the stuck thread)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = func()
        except BaseException as exc:  # handed to the test's thread below
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        pytest.fail(f"no answer from the mount within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# -- a served directory: one tensor set written by ctfs and by the reference library, v1 and v2 -------------

# An odd chunk size: chunks straddle pages and kernel requests.
SERVED_CHUNK_SIZE = 10_000
SERVED_METADATA = {"origin": "ctfs mount tests"}
SERVED_NAMES = ("ctfs-v1.safetensors", "ctfs-v2.safetensors", "upstream-v1.safetensors", "upstream-v2.safetensors")


def served_tensors() -> dict[str, np.ndarray]:
    """The seeded tensors plus one of ~300 KB, so files span many pages, chunks and kernel requests."""
    big = np.random.default_rng(7).standard_normal((257, 301)).astype(np.float32)
    return {**seeded_tensors(0), "big": big}


def make_served_dir(root: Path, keys: Keys) -> tuple[Path, dict[str, Path]]:
    """`root/src` holding the same tensors encrypted by ctfs (v1, v2) and by the reference library (v1, v2),
    plus a config.json to pass through; and for each file, the plain view the mount must serve byte for
    byte, written by the offline `decrypt_file`."""
    src, plain_dir = root / "src", root / "plain"
    src.mkdir(parents=True)
    plain_dir.mkdir()
    tensors = served_tensors()
    plain = write_plain(plain_dir / "plain.safetensors", tensors, SERVED_METADATA)
    encrypt_file(plain, src / SERVED_NAMES[0], keys.enc, keys.sign, EncryptOptions("1"))
    encrypt_file(plain, src / SERVED_NAMES[1], keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    write_upstream(src / SERVED_NAMES[2], tensors, keys, SERVED_METADATA, version="1")
    write_upstream(src / SERVED_NAMES[3], tensors, keys, SERVED_METADATA, version="2", chunk_size=SERVED_CHUNK_SIZE)
    (src / "config.json").write_text('{"model_type": "test"}\n')
    views = {}
    for name in SERVED_NAMES:
        views[name] = plain_dir / f"{name}.plain"
        decrypt_file(src / name, views[name], keys.store)
    return src, views
