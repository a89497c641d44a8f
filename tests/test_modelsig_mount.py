"""A mount with --model-pubkey serves a signed model directory only as signed: a substituted shard, a changed
config or index is refused at open (EIO), an unlisted file is not served, a missing one stops the mount; each
with one log line naming the file."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_plain
from mounting import ctfs, force_unmount, mounted, requires_fuse
from test_modelsig import (
    SHARDS,
    Signed,
    add_file,
    change_config,
    change_index,
    substitute_shard,
)

from ctfs.files.modelsig import SIGNATURE_NAME

pytestmark = requires_fuse


@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> Signed:
    return Signed(tmp_path_factory.mktemp("signed-mount"))


def open_errno(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as exc:
        return exc.errno
    return None


def mount_signed(signed: Signed, source: Path, mountpoint: Path):
    return mounted(source, mountpoint, "--keys", str(signed.keys), "--model-pubkey", str(signed.model_pub))


def lines_naming(mount, name: str) -> list[str]:
    return [line for line in mount.log().splitlines() if name in line and ("ERROR" in line or "WARNING" in line)]


def test_the_genuine_signed_directory_is_served_whole(tmp_path, signed):
    with mount_signed(signed, signed.a, tmp_path / "mnt") as mount:
        served = sorted(os.listdir(mount.mountpoint))
        assert served == sorted(n for n in os.listdir(signed.a) if n != SIGNATURE_NAME)
        for name in served:
            assert open_errno(mount.path(name)) is None, name


@pytest.mark.parametrize("tamper", [substitute_shard, change_config, change_index])
def test_a_changed_file_is_refused_at_open_with_one_line_naming_it(tmp_path, signed, tamper):
    source = Path(shutil.copytree(signed.a, tmp_path / "src"))
    name = tamper(source, signed.b)
    with mount_signed(signed, source, tmp_path / "mnt") as mount:
        assert open_errno(mount.path(name)) == errno.EIO
        assert open_errno(mount.path(name)) == errno.EIO  # and again: a bad version stays refused
        refused = lines_naming(mount, name)
        assert len(refused) == 2 and "differ from the digest" in refused[0]
        untouched = next(s for s in SHARDS if s != name)
        assert open_errno(mount.path(untouched)) is None


def test_an_unlisted_file_is_not_served(tmp_path, signed):
    source = Path(shutil.copytree(signed.a, tmp_path / "src"))
    name = add_file(source, signed.b)
    with mount_signed(signed, source, tmp_path / "mnt") as mount:
        assert name not in os.listdir(mount.mountpoint)
        assert open_errno(mount.path(name)) == errno.ENOENT
        assert len(lines_naming(mount, name)) == 1


def test_a_missing_file_stops_the_mount_with_its_name(tmp_path, signed):
    source = Path(shutil.copytree(signed.a, tmp_path / "src"))
    (source / SHARDS[1]).unlink()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        result = ctfs("mount", str(source), str(mountpoint), "--keys", str(signed.keys),
                      "--model-pubkey", str(signed.model_pub), "--log-file", str(tmp_path / "log"))
    finally:
        force_unmount(mountpoint, None)
    assert result.returncode != 0
    assert SHARDS[1] in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_large_substituted_shard_is_refused_and_its_verdict_remembered(tmp_path, signed):
    """A shard above the small-file size is hashed once per version (ahead of time, at mount start)."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for seed, name in enumerate(SHARDS):
        write_plain(plain / name, {"w": np.random.default_rng(seed).standard_normal(600_000).astype(np.float32)})
    encrypted = tmp_path / "enc"
    made = ctfs("encrypt", str(plain), str(encrypted), "--keys", str(signed.keys), "--model-key", str(signed.model_key))
    assert made.returncode == 0, made.stderr
    assert (encrypted / SHARDS[0]).stat().st_size > 1 << 20
    shutil.copyfile(encrypted / SHARDS[1], encrypted / SHARDS[0])  # same keys, validly signed, another shard
    with mount_signed(signed, encrypted, tmp_path / "mnt") as mount:
        assert open_errno(mount.path(SHARDS[1])) is None
        for _ in range(2):
            assert open_errno(mount.path(SHARDS[0])) == errno.EIO
        assert len(lines_naming(mount, SHARDS[0])) == 2
