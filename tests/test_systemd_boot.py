"""ctfs@.service under a real systemd, booted as PID 1 in its own namespaces over a throwaway overlay of /."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_keys, seeded_tensors, write_plain
from mounting import wait_until, write_key_file
from test_systemd_units import CTFS_UNIT, INSTALLED_CTFS

from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file

SYSTEMD = Path("/lib/systemd/systemd")
BOOT_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0
INSTANCE = "demo"
SOURCE = f"/srv/encrypted/{INSTANCE}"
MOUNTPOINT = f"/srv/models/{INSTANCE}"
MODEL = "model.safetensors"
# Units of the host's own that would act on this machine's kernel or devices (binfmt, sysctl, modules,
# partitions, clock, consoles), not just on the overlay: none has anything to do with ctfs.
HOST_AFFECTING_UNITS = (
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "systemd-sysctl.service",
    "systemd-modules-load.service", "systemd-repart.service", "systemd-firstboot.service",
    "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service", "systemd-timesyncd.service",
    "console-getty.service", "getty@tty1.service", "kmod-static-nodes.service",
)

# Runs as PID 1 of new pid, mount and cgroup namespaces, and becomes systemd. Every mount is made in
# that mount namespace (private from the first line), so all of them vanish with it. The container gets
# a /dev of its own with only the device nodes it needs, and read-only kernel knobs, as
# systemd-nspawn gives one. cgroup2 is mounted for it (rooted at the cgroup namespace): left to
# itself, systemd 252 sees the host's cgroup v1 controllers in use, picks the hybrid layout and makes
# its cgroups at the roots of the host's v1 hierarchies. Mounts are shared within the container, as
# systemd expects of one: it moves credential mounts into place from a helper namespace.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
INNER_SCRIPT = r"""
set -eu
work=$1 project=$2; shift 2
mount --make-rprivate /
# This namespace's copies of the host's FUSE mounts would keep those alive, and their daemons running,
# after their owners unmount them.
while read -r _ _ _ _ point rest; do
    case " $rest " in *" - fuse"*) umount -l "$point" 2>/dev/null || true ;; esac
done < /proc/self/mountinfo
mount -t tmpfs -o mode=0755 tmpfs "$work/layer"
mkdir "$work/layer/upper" "$work/layer/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/layer/upper,workdir=$work/layer/work" "$work/root"
root=$work/root
mount -t proc proc "$root/proc"
for knob in sys sysrq-trigger; do
    [ -e "$root/proc/$knob" ] || continue
    mount --bind "$root/proc/$knob" "$root/proc/$knob"
    mount -o remount,bind,ro "$root/proc/$knob"
done
mount -t sysfs -o ro sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount -t tmpfs -o mode=0755 tmpfs "$root/dev"
for node in null zero full random urandom tty fuse; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
touch "$root/dev/console"
mount --bind "$work/console" "$root/dev/console"
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
# ctfs runs from this checkout (its venv, an editable install): seen at the same path inside wherever
# the checkout lies, /tmp included, read-only.
mkdir -p "$root$project"
mount --bind "$project" "$root$project"
mount -o remount,bind,ro "$root$project"
for unit in "$@"; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
mount --make-rshared "$root"
cd "$root"
exec chroot . /usr/bin/env -i container=ctfs-test /lib/systemd/systemd --unit=multi-user.target
"""


def _cgroup2_dir() -> Path | None:
    """The cgroup2 directory this process belongs to, where the unified hierarchy is mounted."""
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            mount = Path(fields[4])
    own = [line.removeprefix("0::") for line in Path("/proc/self/cgroup").read_text().splitlines()
           if line.startswith("0::")]
    return mount / own[0].lstrip("/") if mount and own else None


def _missing() -> str | None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return "it needs root and /dev/fuse"
    if not SYSTEMD.exists() or not all(shutil.which(tool) for tool in ("unshare", "nsenter", "systemd-creds")):
        return f"it needs {SYSTEMD}, unshare, nsenter and systemd-creds"
    if _cgroup2_dir() is None:
        return "it needs a cgroup2 (unified) hierarchy for the booted systemd"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "it needs overlayfs"
    return None


_MISSING = _missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"SYSTEMD BOOT TEST NOT RUN: {_MISSING}")


def unit_cgroups() -> set[Path]:
    """The host's cgroup directories named like systemd units, in every hierarchy: the boot must leave
    none behind (other cgroups may come and go meanwhile, made by whoever runs this machine)."""
    return {Path(top) / name for top, dirs, _files in os.walk("/sys/fs/cgroup") for name in dirs
            if name.endswith((".slice", ".scope", ".service", ".mount"))}


def host_enabled_units() -> list[str]:
    """Units this host enables for itself (its postgresql, its timers): the booted copy must not run them."""
    etc = Path("/etc/systemd/system")
    names = {link.name for pattern in ("*.wants/*", "*.requires/*") for link in etc.glob(pattern)}
    return sorted(name for name in names if not name.endswith(".target"))


@dataclass
class Booted:
    """A systemd booted in its own namespaces; `root` is its / as seen from here (/proc/PID/root)."""

    init_pid: int
    root: Path

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A command inside the container (its mounts, pids and root), as its own root user."""
        result = subprocess.run(["nsenter", "-t", str(self.init_pid), "-m", "-p", "-r", "-w", *argv],
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            journal = self.run("journalctl", "-b", "--no-pager", "-n", "60", check=False).stdout
            pytest.fail(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}\n{journal}")
        return result

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", unit, "-p", prop, "--value").stdout.strip()

    def mounted(self, path: str) -> bool:
        mountinfo = Path(f"/proc/{self.init_pid}/mountinfo").read_text()  # paths as its root sees them
        return any(line.split()[4] == path for line in mountinfo.splitlines())


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:  # it has exited already
        return None
    return int(children[0]) if children else None


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None


def _remove_cgroup_tree(top: Path) -> bool:
    """rmdir `top` and everything under it, deepest first; False while some process is still dying."""
    for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            directory.rmdir()
        except OSError:
            return False
    try:
        top.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[Booted]:
    """Boot; afterwards kill every process of the container (its own cgroup holds them all), reap, and
    remove that cgroup: no process, mount or cgroup is left on the host."""
    work = tmp_path / "boot"
    for name in ("layer", "root"):
        (work / name).mkdir(parents=True)
    (work / "console").touch()
    script = work / "inner.sh"
    script.write_text(INNER_SCRIPT)
    cgroups_before = unit_cgroups()
    cgroup = _cgroup2_dir() / f"ctfs-boot-test-{os.getpid()}-{secrets.token_hex(3)}"
    cgroup.mkdir()
    # The shell enters the new cgroup before unshare makes it the container's cgroup root, so that
    # systemd's own cgroups are made under it and go with it.
    output = work / "output"
    with open(output, "wb") as out:
        launcher = subprocess.Popen(
            ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec unshare --pid --mount --cgroup --fork "$@"',
             "sh", "sh", str(script), str(work), str(PROJECT_ROOT), *host_enabled_units(), *HOST_AFFECTING_UNITS],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    init_pid = None
    try:
        assert wait_until(lambda: launcher.poll() is not None or _child_of(launcher.pid) is not None, BOOT_TIMEOUT)
        init_pid = _child_of(launcher.pid) if launcher.poll() is None else None
        assert init_pid is not None, output.read_text(errors="replace")
        assert wait_until(lambda: launcher.poll() is not None or _comm(init_pid) == "systemd", BOOT_TIMEOUT)
        assert launcher.poll() is None, output.read_text(errors="replace")
        booted = Booted(init_pid, Path(f"/proc/{init_pid}/root"))
        assert wait_until(lambda: (booted.root / "run/systemd/private").exists(), BOOT_TIMEOUT)
        booted.run("systemctl", "is-system-running", "--wait", check=False)
        yield booted
    finally:
        # The namespace's init first: the kernel kills everything else in it, and unshare, still alive,
        # reaps it. Then anything that escaped into the cgroup some other way.
        if init_pid is not None:
            os.kill(init_pid, signal.SIGKILL)
        if launcher.poll() is None and init_pid is None:
            launcher.kill()
        launcher.wait(COMMAND_TIMEOUT)
        if (cgroup / "cgroup.procs").read_text().strip():
            (cgroup / "cgroup.kill").write_text("1")
        assert wait_until(lambda: _remove_cgroup_tree(cgroup), COMMAND_TIMEOUT), f"{cgroup} is left behind"
        assert unit_cgroups() <= cgroups_before
        assert str(work) not in Path("/proc/self/mountinfo").read_text()


def install_demo(booted: Booted, tmp_path: Path) -> bytes:
    """What docs/server.md has an operator do, inside the container: the unit, /etc/ctfs/demo.toml, the
    encrypted model, and the key set as an encrypted credential (sealed to the container's host key).
    Returns the plain bytes the mount must serve."""
    keys = make_keys()
    plain = write_plain(tmp_path / "plain.safetensors", seeded_tensors(0))
    root = booted.root
    (root / SOURCE.lstrip("/")).mkdir(parents=True)
    (root / MOUNTPOINT.lstrip("/")).mkdir(parents=True)
    encrypt_file(plain, root / SOURCE.lstrip("/") / MODEL, keys.enc, keys.sign, EncryptOptions("2", 4096))
    decrypt_file(root / SOURCE.lstrip("/") / MODEL, tmp_path / "expected", keys.store)
    ctfs_bin = root / INSTALLED_CTFS.lstrip("/")
    ctfs_bin.parent.mkdir(parents=True)
    ctfs_bin.symlink_to(Path(sys.executable).with_name("ctfs"))
    shutil.copy(CTFS_UNIT, root / "etc/systemd/system" / CTFS_UNIT.name)
    (root / "etc/ctfs").mkdir()
    (root / f"etc/ctfs/{INSTANCE}.toml").write_text(f'source = "{SOURCE}"\nmountpoint = "{MOUNTPOINT}"\n')
    write_key_file(root / "run/keys.jwks", keys)
    (root / "etc/credstore.encrypted").mkdir(mode=0o700)
    booted.run("systemd-creds", "encrypt", "--name=keys.jwks", "/run/keys.jwks",
               f"/etc/credstore.encrypted/ctfs-{INSTANCE}.jwks")
    (root / "run/keys.jwks").unlink()
    booted.run("systemctl", "daemon-reload")
    return (tmp_path / "expected").read_bytes()


def test_start_restart_crash_and_stop_under_systemd(booted, tmp_path):
    unit = f"ctfs@{INSTANCE}.service"
    served = booted.root / MOUNTPOINT.lstrip("/") / MODEL
    expected = install_demo(booted, tmp_path)

    # Type=notify: start returns once READY=1 came, so the model must read at once.
    booted.run("systemctl", "start", unit)
    assert booted.run("systemctl", "is-active", unit).stdout.strip() == "active"
    assert served.read_bytes() == expected
    assert booted.show(unit, "StatusText").startswith("serving ")
    first = booted.show(unit, "MainPID")

    booted.run("systemctl", "restart", unit)
    assert booted.show(unit, "MainPID") != first
    assert served.read_bytes() == expected

    # A crash leaves a dead mount; Restart=on-failure and ExecStartPre= bring the service back.
    booted.run("systemctl", "kill", "--signal=SIGKILL", unit)
    assert wait_until(lambda: booted.show(unit, "NRestarts") == "1" and booted.show(unit, "ActiveState") == "active",
                      COMMAND_TIMEOUT), booted.run("journalctl", "-u", unit, "--no-pager").stdout
    assert served.read_bytes() == expected

    booted.run("systemctl", "stop", unit)
    assert booted.show(unit, "ActiveState") == "inactive"
    assert booted.show(unit, "Result") == "success"
    assert not booted.mounted(MOUNTPOINT)
