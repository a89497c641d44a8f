"""The life of a mount: it serves when `ctfs mount` returns or fails leaving nothing, unmounts cleanly or
lazily, survives a killed daemon, reloads keys, re-reads changed sources, and guards its memory."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import make_keys, write_plain
from mounting import (
    ctfs,
    daemon_pid,
    force_unmount,
    mounted,
    mountinfo_entry,
    proc_mounts_line,
    process_gone,
    requires_fuse,
    served_tensors,
    start_mount,
    wait_until,
    write_key_file,
)

from ctfs.files.encrypt import EncryptOptions, encrypt_file

pytestmark = requires_fuse

NAME = "model.safetensors"
# Run without CAP_SYS_PTRACE: root keeps it otherwise, and it overrides what non-dumpable protects.
WITHOUT_PTRACE = ("setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace")


def encrypted_tree(root: Path, keys, seed: int = 0, name: str = NAME) -> tuple[Path, bytes]:
    """A source directory with one encrypted file; returns it and the file's plain bytes."""
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    plain = write_plain(root / f"{name}.plain", {"w": served_tensors()["big"] + seed})
    encrypt_file(plain, src / name, keys.enc, keys.sign, EncryptOptions("2", 4096))
    return src, plain.read_bytes()


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # the process ended meanwhile
            continue
    return found


@pytest.fixture
def tree(tmp_path):
    keys = make_keys()
    src, plain = encrypted_tree(tmp_path, keys)
    return tmp_path, src, plain, write_key_file(tmp_path / "keys.jwk", keys)


def test_mount_returns_only_once_serving_and_proc_mounts_names_ctfs(tree):
    root, src, plain, key_file = tree
    with mounted(src, root / "mnt", "--keys", str(key_file)) as mount:
        # No waiting: `ctfs mount` has returned, so the mount must answer now.
        assert (mount.path(NAME)).read_bytes() == plain
        fsname, mountpoint, fstype, options, *_ = proc_mounts_line(mount.mountpoint)
        assert (fsname, mountpoint, fstype) == ("ctfs", str(mount.mountpoint), "fuse.ctfs")
        assert {"ro", "default_permissions"} <= set(options.split(","))
        assert "allow_other" not in options


@pytest.mark.parametrize(("options", "reason"), [
    (("--keys", "/nonexistent/keys.jwk"), "/nonexistent/keys.jwk: cannot read key file"),
    (("--keys", "KEYS", "--trust", "/nonexistent/trust.jwk"), "/nonexistent/trust.jwk: cannot read key file"),
])
def test_a_mount_without_its_keys_fails_with_the_reason_and_leaves_nothing(tree, options, reason):
    root, src, _, key_file = tree
    mountpoint = root / "mnt"
    mountpoint.mkdir()
    options = [str(key_file) if o == "KEYS" else o for o in options]
    result = ctfs("mount", str(src), str(mountpoint), *options)
    assert result.returncode != 0
    assert f"ctfs: error: {reason}" in result.stderr
    assert mountinfo_entry(mountpoint) is None
    assert processes_mentioning(str(mountpoint)) == []


@pytest.mark.parametrize(("source", "target", "reason"), [
    ("missing", "mnt", "source {root}/missing does not exist"),
    ("a-file", "mnt", "source {root}/a-file is not a directory"),
    ("src", "no/such/dir", "mount point {root}/no/such/dir does not exist"),
    ("src", "a-file", "mount point {root}/a-file is not a directory"),
])
def test_a_mount_of_a_bad_source_or_mount_point_fails_with_the_reason_and_leaves_nothing(tree, source, target,
                                                                                         reason):
    root, _, _, key_file = tree
    (root / "a-file").write_text("not a directory")
    (root / "mnt").mkdir()
    mountpoint = root / target
    result = ctfs("mount", str(root / source), str(mountpoint), "--keys", str(key_file))
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"ctfs: error: {reason.format(root=root)}"]
    assert mountinfo_entry(mountpoint) is None
    assert processes_mentioning(str(mountpoint)) == []


def test_a_busy_mount_refuses_umount_clearly_and_detaches_with_lazy(tree):
    root, src, plain, key_file = tree
    with mounted(src, root / "mnt", "--keys", str(key_file)) as mount:
        held = open(mount.path(NAME), "rb")
        try:
            busy = ctfs("umount", str(mount.mountpoint))
            assert busy.returncode != 0
            assert "cannot unmount" in busy.stderr and "busy" in busy.stderr
            assert mount.path(NAME).read_bytes() == plain  # still serving

            lazy = ctfs("umount", "--lazy", str(mount.mountpoint))
            assert lazy.returncode == 0, lazy.stderr
            assert mountinfo_entry(mount.mountpoint) is None
            assert held.read() == plain  # an open file keeps working after a lazy unmount
            assert not process_gone(mount.pid)
        finally:
            held.close()
        assert wait_until(lambda: process_gone(mount.pid)), "the daemon outlived the last open file"


def test_after_the_daemon_is_killed_a_new_mount_at_the_same_point_works(tree):
    root, src, plain, key_file = tree
    first = start_mount(src, root / "mnt", "--keys", str(key_file))
    try:
        os.kill(first.pid, signal.SIGKILL)
        assert wait_until(lambda: process_gone(first.pid))
        with pytest.raises(OSError) as dead:
            os.statvfs(first.mountpoint)  # statfs always asks the daemon; stat may come from a cache
        assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        with mounted(src, first.mountpoint, "--keys", str(key_file), log_file=root / "second.log") as second:
            assert second.path(NAME).read_bytes() == plain
            assert "removing a stale mount left by a daemon that died" in second.log()
    finally:
        force_unmount(first.mountpoint, None)


def test_sigterm_unmounts_cleanly(tree):
    root, src, plain, key_file = tree
    with mounted(src, root / "mnt", "--keys", str(key_file)) as mount:
        assert mount.path(NAME).read_bytes() == plain
        os.kill(mount.pid, signal.SIGTERM)
        assert wait_until(lambda: process_gone(mount.pid))
        assert mountinfo_entry(mount.mountpoint) is None
        assert f"unmounted {mount.mountpoint}" in mount.log()


def memory_opens_for(pid: int) -> bool:
    """Whether a root process without CAP_SYS_PTRACE may open /proc/PID/mem (it may for a dumpable one)."""
    probe = subprocess.run([*WITHOUT_PTRACE, "sh", "-c", f"exec 3< /proc/{pid}/mem"],
                           capture_output=True, text=True, timeout=30)
    return probe.returncode == 0


def test_the_daemon_is_not_dumpable(tree):
    root, src, _, key_file = tree
    # Both sides lack CAP_SYS_PTRACE and are otherwise equal, so only dumpability decides the access.
    control = subprocess.Popen([*WITHOUT_PTRACE, "sleep", "60"])
    try:
        # Until setpriv has exec'd sleep, the control still holds CAP_SYS_PTRACE.
        assert wait_until(lambda: Path(f"/proc/{control.pid}/comm").read_text().strip() == "sleep")
        assert memory_opens_for(control.pid), "the probe cannot open a dumpable process's memory either"
        with mounted(src, root / "mnt", "--keys", str(key_file), prefix=WITHOUT_PTRACE) as mount:
            assert not memory_opens_for(mount.pid)
    finally:
        control.kill()
        control.wait()


def test_a_replaced_source_file_is_read_anew_at_the_next_open(tmp_path):
    keys = make_keys()
    src, first = encrypted_tree(tmp_path / "v1", keys, seed=1)
    key_file = write_key_file(tmp_path / "keys.jwk", keys)
    with mounted(src, tmp_path / "mnt", "--keys", str(key_file)) as mount:
        path = mount.path(NAME)
        assert path.read_bytes() == first
        versions = [first]
        for version, tensors in ((2, {"w": served_tensors()["big"] * 2, "more": served_tensors()["weight"]}),
                                 (3, {"w": served_tensors()["weight"]})):
            plain = write_plain(tmp_path / f"v{version}.plain", tensors)
            staged = tmp_path / f"v{version}.safetensors"
            encrypt_file(plain, staged, keys.enc, keys.sign, EncryptOptions("2", 4096))
            os.replace(staged, src / NAME)  # how a model is updated: a new file renamed over the old
            # At once, no waiting for caches to expire: the new size and the new bytes, nothing old.
            assert os.stat(path).st_size == plain.stat().st_size
            assert path.read_bytes() == plain.read_bytes()
            versions.append(plain.read_bytes())
        assert len({len(v) for v in versions}) == 3  # grew, then shrank


def open_errno(path: Path) -> int | None:
    try:
        path.open("rb").close()
    except OSError as exc:
        return exc.errno
    return None


def wait_for_reload(mount, count: int) -> None:
    """Reloading is asynchronous (a signal): wait for the daemon's `count`th report of a finished reload."""
    assert wait_until(lambda: mount.log().count(" reloaded") >= count), mount.log()


def test_reload_and_sighup_switch_key_sets_for_new_opens(tmp_path):
    old, new = make_keys(), make_keys(seed=1, enc_kid="enc2", sign_kid="sign2")
    src, old_plain = encrypted_tree(tmp_path, old, seed=0, name="old.safetensors")
    _, new_plain = encrypted_tree(tmp_path, new, seed=1, name="new.safetensors")
    key_file = write_key_file(tmp_path / "keys.jwk", old)
    with mounted(src, tmp_path / "mnt", "--keys", str(key_file)) as mount:
        assert mount.path("old.safetensors").read_bytes() == old_plain
        write_key_file(key_file, new)
        reload = ctfs("reload", str(mount.mountpoint))
        assert reload.returncode == 0, reload.stderr
        wait_for_reload(mount, 1)
        assert open_errno(mount.path("old.safetensors")) == errno.EACCES
        assert mount.path("new.safetensors").read_bytes() == new_plain

        write_key_file(key_file, old)
        os.kill(daemon_pid(mount.mountpoint), signal.SIGHUP)
        wait_for_reload(mount, 2)
        assert mount.path("old.safetensors").read_bytes() == old_plain
        assert open_errno(mount.path("new.safetensors")) == errno.EACCES


def test_reloads_keep_one_audit_log_open(tree):
    root, src, plain, key_file = tree
    audit = root / "audit.jsonl"
    with mounted(src, root / "mnt", "--keys", str(key_file), "--audit-log", str(audit)) as mount:
        for count in (1, 2, 3):
            assert ctfs("reload", str(mount.mountpoint)).returncode == 0
            wait_for_reload(mount, count)
        fds = Path(f"/proc/{mount.pid}/fd")
        open_on_audit = [fd for fd in fds.iterdir() if os.path.realpath(fd) == str(audit.resolve())]
        assert len(open_on_audit) == 1
        assert mount.path(NAME).read_bytes() == plain
    assert json.loads(audit.read_text().splitlines()[-1])["decision"] == "allow"
