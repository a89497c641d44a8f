"""A killed encrypt, decrypt or rewrap leaves no plaintext and no litter; the next run clears what a run
killed in its last step left, and nothing else."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_tensors, make_keys, seeded_tensors, write_plain
from mounting import ctfs, write_key_file
from safetensors.numpy import load_file

from ctfs.files import atomic
from ctfs.files.atomic import atomic_output, write_all
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.encrypted import EncryptedFile
from ctfs.files.modeldir import transform_tree

KEYS = make_keys(seed=0)
NEW_KEYS = make_keys(seed=1, enc_kid="enc2", sign_kid="sign2")
MIB = 1024 * 1024
# Big enough that a child is far from done at every kill point below (decrypt writes 32 MiB batches).
SHARD_MIB = 48
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
CONFIG = '{"model_type": "llama"}\n'

# inode -> the largest size seen of each file a child has open for writing in the watched directory
Sizes = dict[int, int]


def big_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"embed": rng.standard_normal((SHARD_MIB * 256, 1024), dtype=np.float32), **seeded_tensors(seed)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A plain model directory (two shards and a config), its encrypted twin, and the key files."""
    root = tmp_path_factory.mktemp("models")
    plain, encrypted = root / "plain", root / "encrypted"
    plain.mkdir()
    encrypted.mkdir()
    for seed, name in enumerate(SHARDS, 1):
        write_plain(plain / name, big_tensors(seed))
        encrypt_file(plain / name, encrypted / name, KEYS.enc, KEYS.sign, EncryptOptions())
    for tree in (plain, encrypted):
        (tree / "config.json").write_text(CONFIG)
    return {"plain": plain, "encrypted": encrypted,
            "keys": write_key_file(root / "keys.jwk", KEYS), "new_keys": write_key_file(root / "new.jwk", NEW_KEYS)}


@pytest.fixture
def out(tmp_path) -> Path:
    """The destination's parent, holding one unrelated file that must come through untouched."""
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "notes.txt").write_text("not ctfs's")
    return directory


def tree(root: Path) -> set[str]:
    """Every path below `root`, hidden ones included."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- killing a child at points observed from outside -----------------------------------------------------

def open_for_writing(pid: int, directory: Path) -> Sizes:
    """inode -> size of each regular file the process has open for writing in or below `directory`,
    named or not (an unnamed file shows as `DIR/#INODE (deleted)`)."""
    found: Sizes = {}
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return found
    for fd in fds:
        try:
            if not os.readlink(f"{fd_dir}/{fd}").startswith(f"{directory}/"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = int(re.search(r"^flags:\s+(\d+)", info.read(), re.MULTILINE).group(1), 8)
            st = os.stat(f"{fd_dir}/{fd}")
        except FileNotFoundError:  # closed while we looked
            continue
        if flags & os.O_ACCMODE != os.O_RDONLY and stat.S_ISREG(st.st_mode):
            found[st.st_ino] = st.st_size
    return found


def kill_at(point: Callable[[Sizes], bool], watched: Path, *args: str) -> int:
    """Run `ctfs ARGS` in a child and SIGKILL it as soon as `point` holds for what it has written in
    `watched`; returns its (now dead) pid. The child runs at a lower priority, so on a busy machine it
    is the child, not this observer, that waits: it cannot run far past the point."""
    child = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "ctfs", *args],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: Sizes = {}
    try:
        while not point(seen):
            if child.poll() is not None:
                pytest.fail(f"the child ended ({child.returncode}) before the kill point: {child.stderr.read()!r}")
            for inode, size in open_for_writing(child.pid, watched.resolve()).items():
                seen[inode] = max(seen.get(inode, 0), size)
            time.sleep(0.001)  # only to leave the CPU to others between looks: the kill waits on `point`
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return child.pid


def first_bytes(sizes: Sizes) -> bool:
    return any(sizes.values())


def half_of(total: int) -> Callable[[Sizes], bool]:
    return lambda sizes: any(size >= total // 2 for size in sizes.values())


def shards_begun(count: int) -> Callable[[Sizes], bool]:
    """`count` big files under way: with two, the first is complete (files are written one by one)."""
    return lambda sizes: sum(size >= MIB for size in sizes.values()) >= count


def leave_litter(directory: Path, name: str, pid: int) -> None:
    """What a run killed in its last step leaves: complete files under its temporary names."""
    staging = directory / f".{name}.{pid}.0123abcd.ctfs-tmp"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"complete plaintext of a killed run")
    (directory / f".{name}.{pid}.4567cdef.ctfs-tmp").write_bytes(b"a complete temporary file")


def assert_runs_again_clean(directory: Path, before: set[str], name: str, pid: int, *args: str) -> None:
    """The next run clears the killed run's litter, succeeds, and adds exactly its output."""
    leave_litter(directory, name, pid)
    result = ctfs(*args)
    assert result.returncode == 0, result.stderr
    added = tree(directory) - before
    assert added and all(path.split("/")[0] == name for path in added), added
    assert before <= tree(directory)


# -- the commands, killed --------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["first bytes", "half written"])
def test_a_killed_decrypt_of_a_file_leaves_no_plaintext(models, out, point):
    src, dst = models["encrypted"] / SHARDS[0], out / "model.safetensors"
    args = ("decrypt", str(src), str(dst), "--keys", str(models["keys"]))
    before = tree(out)
    full = (models["plain"] / SHARDS[0]).stat().st_size
    pid = kill_at(first_bytes if point == "first bytes" else half_of(full), out, *args)
    assert tree(out) == before
    assert_runs_again_clean(out, before, dst.name, pid, *args)
    assert_same_tensors(load_file(dst), load_file(models["plain"] / SHARDS[0]))


@pytest.mark.parametrize("point", ["first shard under way", "first shard complete"])
def test_a_killed_decrypt_of_a_model_directory_leaves_no_plaintext(models, out, point):
    dst = out / "decrypted"
    args = ("decrypt", str(models["encrypted"]), str(dst), "--keys", str(models["keys"]))
    before = tree(out)
    pid = kill_at(shards_begun(1 if point == "first shard under way" else 2), out, *args)
    assert tree(out) == before
    assert_runs_again_clean(out, before, dst.name, pid, *args)
    assert tree(dst) == tree(models["plain"])
    for name in SHARDS:
        assert_same_tensors(load_file(dst / name), load_file(models["plain"] / name))


@pytest.mark.parametrize("point", ["first shard under way", "first shard complete"])
def test_a_killed_encrypt_of_a_model_directory_leaves_nothing(models, out, point):
    dst = out / "encrypted"
    args = ("encrypt", str(models["plain"]), str(dst), "--keys", str(models["keys"]))
    before = tree(out)
    pid = kill_at(shards_begun(1 if point == "first shard under way" else 2), out, *args)
    assert tree(out) == before
    assert_runs_again_clean(out, before, dst.name, pid, *args)
    with EncryptedFile(dst / SHARDS[1], KEYS.store) as ef:
        ef.verify_all()


def test_a_killed_encrypt_of_a_file_leaves_nothing(models, out):
    dst = out / "model.safetensors"
    args = ("encrypt", str(models["plain"] / SHARDS[0]), str(dst), "--keys", str(models["keys"]))
    before = tree(out)
    pid = kill_at(first_bytes, out, *args)
    assert tree(out) == before
    assert_runs_again_clean(out, before, dst.name, pid, *args)


@pytest.mark.parametrize("point", ["first bytes", "half written"])
def test_a_killed_rewrap_leaves_the_old_file_and_nothing_else(models, out, point):
    target = out / "model.safetensors"
    shutil.copyfile(models["encrypted"] / SHARDS[0], target)
    original = target.read_bytes()
    args = ("rewrap", str(target), "--keys", str(models["keys"]), "--new-keys", str(models["new_keys"]))
    before = tree(out)
    pid = kill_at(first_bytes if point == "first bytes" else half_of(len(original)), out, *args)
    assert tree(out) == before and target.read_bytes() == original
    leave_litter(out, target.name, pid)
    result = ctfs(*args)
    assert result.returncode == 0, result.stderr
    assert tree(out) == before
    with EncryptedFile(target, NEW_KEYS.store) as ef:
        ef.verify_all()


# -- clearing litter: ours and dead only -----------------------------------------------------------------

def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_the_next_run_clears_only_litter_of_dead_ctfs_runs_of_this_user(models, out):
    gone = dead_pid()
    stale = [f".model.safetensors.{gone}.89abcdef.ctfs-tmp", f".other.{gone}.0badcafe.ctfs-tmp"]
    kept = [
        f".model.safetensors.{os.getpid()}.01234567.ctfs-tmp",  # its owner is alive: a run under way
        ".model.safetensors.k3j4h5g6.ctfs-tmp",  # no owner named: not provably ours
        f"model.{gone}.89abcdef.ctfs-tmp",  # not hidden: not a name ctfs gives
        f".model.{gone}.89abcdef.ctfs-tmp.bak",
        f".model.{gone}.xyz.ctfs-tmp",
    ]
    for name in stale + kept:
        (out / name).write_bytes(b"x")
    (out / stale[0]).unlink()
    (out / stale[0]).mkdir()
    (out / stale[0] / "model.safetensors").write_bytes(b"plaintext")
    # A dead pid, yet a live holder: a run in another pid namespace.
    locked = out / f".model.safetensors.{gone}.fedcba98.ctfs-tmp"
    locked.write_bytes(b"x")
    kept.append(locked.name)
    with open(locked, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = ctfs("decrypt", str(models["encrypted"] / SHARDS[1]), str(out / "model.safetensors"),
                      "--keys", str(models["keys"]))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == sorted([*kept, "notes.txt", "model.safetensors"])


# -- how an output is written ----------------------------------------------------------------------------

def test_an_output_has_no_name_until_it_is_complete(tmp_path):
    target = tmp_path / "keys.jwk"
    with atomic_output(target) as fd:
        write_all(fd, b"secret")
        assert os.listdir(tmp_path) == []
    assert target.read_bytes() == b"secret" and os.listdir(tmp_path) == ["keys.jwk"]


@pytest.fixture
def no_unnamed_files(monkeypatch):
    """open(O_TMPFILE) fails as on FUSE and some network filesystems."""
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", no_tmpfile)


def test_where_unnamed_files_are_unsupported_a_named_temp_file_stands_in(tmp_path, no_unnamed_files):
    target = tmp_path / "keys.jwk"
    target.write_text("old")
    with atomic_output(target) as fd:
        write_all(fd, b"new")
        [temp] = [name for name in os.listdir(tmp_path) if name != "keys.jwk"]
        assert re.fullmatch(rf"\.keys\.jwk\.{os.getpid()}\.[0-9a-f]{{8}}\.ctfs-tmp", temp)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["keys.jwk"]
    with pytest.raises(RuntimeError), atomic_output(target) as fd:
        write_all(fd, b"never")
        raise RuntimeError
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["keys.jwk"]


def test_where_unnamed_files_are_unsupported_a_tree_is_built_from_named_temp_files(tmp_path, no_unnamed_files):
    src, dst = tmp_path / "src", tmp_path / "out" / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.safetensors").write_text("b")
    seen_during: list[list[str]] = []

    def transform(source: Path, output) -> None:
        with atomic_output(output) as fd:
            write_all(fd, source.read_bytes().upper())
        seen_during.append(sorted(os.listdir(dst.parent)))

    assert transform_tree(src, dst, transform) == [Path("sub/b.safetensors")]
    temp_name = rf"\.dst\.{os.getpid()}\.[0-9a-f]{{8}}\.ctfs-tmp"
    assert [len(names) for names in seen_during] == [2]
    assert all(re.fullmatch(temp_name, name) for name in seen_during[0])
    assert os.listdir(dst.parent) == ["dst"]
    assert (dst / "a.txt").read_text() == "a" and (dst / "sub" / "b.safetensors").read_text() == "B"


def test_a_tree_too_large_for_the_open_file_limit_fails_clearly_and_leaves_nothing(tmp_path, models):
    src = tmp_path / "many"
    src.mkdir()
    for index in range(60):
        (src / f"file{index:02}.txt").write_text(str(index))
    limit = 100  # 60 held files and the spare descriptors a run needs do not fit

    def run(soft: int, hard: int, dst: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "ctfs", "encrypt", str(src), str(dst), "--keys", str(models["keys"])]
        return subprocess.run(command, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))

    refused = run(limit, limit, tmp_path / "refused")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "open files" in refused.stderr and "ulimit -n" in refused.stderr
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".*ctfs-tmp"))
    # Under a higher hard limit the soft one is raised as far as the tree needs.
    assert run(limit, 4096, tmp_path / "raised").returncode == 0
    assert tree(tmp_path / "raised") == tree(src)
