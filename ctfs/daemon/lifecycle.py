"""Run a mount: start the daemon, report readiness, reload keys on SIGHUP, stop cleanly on SIGTERM."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ctfs.daemon import sdnotify
from ctfs.daemon.chunk_cache import ChunkCache
from ctfs.daemon.config import AUDIT_TO_JOURNAL, MountConfig
from ctfs.daemon.fuse_ops import Operations, mount_options
from ctfs.daemon.images import Backing, ImageStore, private_tmpfs
from ctfs.daemon.integrity import ModelGuard
from ctfs.daemon.lowlevel import Session
from ctfs.daemon.mountpoint import (
    abort_and_detach,
    ask_daemon_pid,
    clean_stale,
    is_stale,
    mount_entry,
    raise_readahead,
)
from ctfs.daemon.preflight import describe_unopenable, unopenable_files
from ctfs.daemon.source import ModelSource, SourceOptions
from ctfs.errors import CtfsError
from ctfs.keys.chain import KeyChain, KeyOptions
from ctfs.policy.audit import AuditLog
from ctfs.policy.gate import PolicyGate

log = logging.getLogger("ctfs")

READY_FD_ENV = "CTFS_READY_FD"  # set by `ctfs mount` for the daemon it starts in the background
READ_AHEAD_KB = 16 * 1024
READY_TIMEOUT = 60.0
# Long enough for a busy daemon, short enough that a hung one is logged well before the watchdog fires.
HEALTH_CHECK_TIMEOUT = 5.0
# Every signal the daemon acts on is taken by one thread of ours with sigwait(): SIGHUP reloads, the
# others stop. They stay blocked in every thread for the life of the process: libfuse puts back their
# default action (death) as soon as its loop ends, where a SIGTERM sent right after an unmount (systemd
# sends one once ExecStop= returns) would meet it; and Python handlers never run while the main thread
# sits inside libfuse.
RELOAD_SIGNAL = signal.SIGHUP
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
PR_SET_DUMPABLE = 4


def make_undumpable() -> None:
    """No core dumps and no ptrace by other users: the daemon's memory holds keys and plaintext."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise CtfsError(f"cannot make the daemon non-dumpable: {os.strerror(ctypes.get_errno())}")


def build_keys(config: MountConfig) -> KeyChain:
    """The mount's key chain (docs/keys.md); built again on every reload, which empties its caches."""
    chain = KeyOptions.of(config).chain()
    if not chain.may_decrypt():
        raise CtfsError("no encryption key: give --keys, a systemd credential, CRYPTOTENSOR_KEYS, "
                        "a keyring entry or a key command")
    if not chain.may_verify():
        raise CtfsError("no trusted signer: give a signing key's public half with --trust, or the key set")
    return chain


def open_audit_log(config: MountConfig) -> AuditLog | None:
    if config.audit_log == AUDIT_TO_JOURNAL:
        return AuditLog.to_journal()
    return AuditLog.to_file(config.audit_log) if config.audit_log else None


def build_gate(config: MountConfig, audit: AuditLog | None) -> PolicyGate:
    """The policy gate; built again on every reload, with the same audit log (opened once per daemon)."""
    operator_policy = Path(config.policy).read_text("utf-8") if config.policy else None
    return PolicyGate(operator_policy=operator_policy, labels=config.labels,
                      cache_ttl=config.policy_cache_ttl, audit=audit)


class Daemon:
    """One mount's daemon, in the foreground of its process."""

    def __init__(self, config: MountConfig):
        self.config = config
        self.mountpoint = os.path.abspath(config.mountpoint)
        self.cache = ChunkCache(config.cache_size)
        self.audit = open_audit_log(config)
        self.source = ModelSource(
            config.source, build_keys(config), self.cache,
            SourceOptions(allow_plain=config.allow_plain, verify_full=config.verify == "full",
                          hide_denied=config.hide_denied, follow=tuple(config.follow)),
            build_gate(config, self.audit),
        )
        self.watchdog = sdnotify.Watchdog(healthy=self._healthy)
        self.ready = threading.Event()
        self.stop_requested = threading.Event()
        # The device of our mount once it serves: a stop signal aborts that mount only, never one made at
        # the same path after ours has gone.
        self._served_dev: str | None = None
        self._served_lock = threading.Lock()

    def _healthy(self) -> bool:
        # A question only the daemon can answer: the kernel may answer a stat of the mount root from its
        # attribute cache, so a hung daemon would pass that one.
        return ask_daemon_pid(self.mountpoint, HEALTH_CHECK_TIMEOUT) == os.getpid()

    def _prepare_mountpoint(self) -> None:
        _require_directory("source", self.config.source)
        clean_stale(self.mountpoint)
        _require_directory("mount point", self.mountpoint)
        if mount_entry(self.mountpoint) is not None:
            raise CtfsError(f"{self.mountpoint} is already a mount point; unmount it first")

    def _check_keys_open_the_source(self) -> None:
        """Say now, not at each open, which files these keys cannot open; with `strict`, refuse to start."""
        problems, encrypted = unopenable_files(self.source)
        if not problems:
            return
        line = describe_unopenable(problems, encrypted)
        if self.config.strict:
            raise CtfsError(line)
        log.warning("%s", line)

    def _on_init(self) -> None:
        # Called by libfuse from inside the mount: readiness is announced from another thread once a
        # question through the kernel reaches this daemon and comes back, i.e. once the mount serves.
        threading.Thread(target=self._announce_ready, name="ctfs-ready", daemon=True).start()

    def _announce_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.stop_requested.is_set() and (mount_entry(self.mountpoint) is None or not self._healthy()):
            if time.monotonic() > deadline:
                log.error("mount did not become ready within %.0f s", READY_TIMEOUT)
                return
            time.sleep(0.01)
        entry = mount_entry(self.mountpoint)
        with self._served_lock:
            self._served_dev = entry["dev"] if entry else None
        # A stop signal taken before the line above found nothing to abort: it is ours to act on.
        if self.stop_requested.is_set():
            self._abort_mount()
            return
        raise_readahead(self.mountpoint, READ_AHEAD_KB)
        log.info("serving %s at %s", self.config.source, self.mountpoint)
        _report_to_parent("ready")
        sdnotify.ready(f"serving {self.config.source} at {self.mountpoint}")
        self.watchdog.start()
        self.ready.set()

    def reload(self) -> None:
        """SIGHUP / `ctfs reload`: re-read every key source and the operator policy; if either fails,
        keep serving with the previous ones."""
        sdnotify.reloading()
        try:
            keys, gate = build_keys(self.config), build_gate(self.config, self.audit)
        except (CtfsError, OSError) as exc:
            log.error("reload failed, keeping the previous keys and policy: %s", exc)
        else:
            self.source.reload(keys, gate)
            self.cache.drop(lambda key: True)
            log.info("keys and policy reloaded")
        sdnotify.ready("keys and policy reloaded")

    def _take_signals(self) -> None:
        while True:
            if signal.sigwait({RELOAD_SIGNAL, *STOP_SIGNALS}) == RELOAD_SIGNAL:
                self.reload()
            else:
                self.stop_requested.set()
                self._abort_mount()

    def _abort_mount(self) -> None:
        """Stop serving now, as libfuse's own SIGTERM handler would: the loop then ends and run() returns."""
        with self._served_lock:
            dev = self._served_dev
        entry = mount_entry(self.mountpoint)
        if dev is None or entry is None or entry["dev"] != dev:
            return  # not serving yet (_announce_ready acts on the request), or already unmounted
        log.info("stop requested: unmounting %s", self.mountpoint)
        try:
            abort_and_detach(self.mountpoint)
        except CtfsError as exc:
            log.error("%s", exc)

    def _serve_from_memory(self, session: Session) -> None:
        """Answer the kernel's INIT, asking for FUSE passthrough; once granted, encrypted files are served
        from memory images the kernel reads itself (docs/performance.md)."""
        budget = self.config.memory_budget
        if not budget:
            return
        if not session.negotiate_passthrough():
            log.info("the kernel does not offer FUSE passthrough: every file is served through the chunk cache")
            return
        directory = -1
        try:  # both take CAP_SYS_ADMIN
            directory = private_tmpfs()
            probe = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=directory)
            try:
                session.close_backing(session.open_backing(probe))
            finally:
                os.close(probe)
        except OSError as exc:
            if directory >= 0:
                os.close(directory)
            log.info("no FUSE passthrough (%s): every file is served through the chunk cache", exc.strerror)
            return
        self.source.images = ImageStore(budget, Backing(session.open_backing, session.close_backing), directory)
        log.info("encrypted files are served from memory images (budget %d MiB)", budget >> 20)

    def run(self) -> None:
        """Serve until unmounted or stopped; the caller has blocked RELOAD_SIGNAL and STOP_SIGNALS."""
        threading.Thread(target=self._take_signals, name="ctfs-signals", daemon=True).start()
        self._prepare_mountpoint()
        if self.config.model_pubkey:
            self.source.guard = ModelGuard.load(self.source.root, self.config.model_pubkey)
        self._check_keys_open_the_source()
        if self.stop_requested.is_set():
            return
        ops = Operations(self.source, self._on_init)
        session = ops.session = Session(ops.struct, mount_options(fsname="ctfs", allow_other=self.config.allow_other))
        try:
            session.mount(self.mountpoint)
            self._serve_from_memory(session)
            session.serve(max_threads=self.config.threads or default_threads(), clone_fd=False)
        finally:
            sdnotify.stopping()
            self.watchdog.stop()
            session.close()
            self.cache.close()
            if self.source.images is not None:
                self.source.images.close()
            if self.source.guard is not None:
                self.source.guard.close()
            if self.audit is not None:
                self.audit.close()
        if not self.ready.is_set() and not self.stop_requested.is_set():
            raise CtfsError(f"could not mount {self.mountpoint} (see the messages above)")
        log.info("unmounted %s", self.mountpoint)


def default_threads() -> int:
    """FUSE worker threads: readers waiting on a chunk's decryption hold one each, so more than cores."""
    return max(8, 2 * (os.cpu_count() or 1))


def _require_directory(what: str, path: str) -> None:
    if not os.path.exists(path):
        raise CtfsError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise CtfsError(f"{what} {path} is not a directory")


def _report_to_parent(message: str) -> bool:
    """Tell the `ctfs mount` that started us (if any) how the start went, once; True if it was told."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return False
    try:
        os.write(int(fd), (message.replace("\n", " ") + "\n").encode())
        os.close(int(fd))
    except OSError:
        return False
    return True


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="ctfs[%(process)d]: %(levelname)s %(message)s")


def run_foreground(config: MountConfig) -> None:
    """The daemon's main: serve until unmounted. Errors before readiness reach the parent, if any."""
    setup_logging(config.log_level)
    # Before any thread starts, so every thread inherits the mask (see STOP_SIGNALS).
    signal.pthread_sigmask(signal.SIG_BLOCK, {RELOAD_SIGNAL, *STOP_SIGNALS})
    try:
        make_undumpable()
        Daemon(config).run()
    except CtfsError as exc:
        if not _report_to_parent(f"error: {exc}"):
            raise
        raise SystemExit(1) from None  # the `ctfs mount` that started us reports it, once


def start_background(argv: list[str], mountpoint: str, log_file: str) -> None:
    """Start `argv` (a foreground mount) detached, everything it prints going to `log_file`, and return
    once it serves; raise with its reason if it fails, leaving nothing mounted."""
    Path(log_file).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(log_file, "ab") as log_out:
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(
                argv, pass_fds=(write_end,), env={**os.environ, READY_FD_ENV: str(write_end)},
                stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out, start_new_session=True,
            )
        finally:
            os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.readline().decode(errors="replace").strip()
    if message == "ready":
        return
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    if mount_entry(mountpoint) is not None and is_stale(mountpoint):
        clean_stale(mountpoint)
    reason = message.removeprefix("error: ") if message else f"daemon exited with status {code} (log: {log_file})"
    with open(log_file, "a") as log_out:
        log_out.write(f"ctfs mount: not started: {reason}\n")
    raise CtfsError(reason)
