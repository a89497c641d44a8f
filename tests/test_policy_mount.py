"""Policies are enforced by a real mount with the reader's real context: uid, executable, time, labels,
embedded policies written by the reference library, and an audit line for every decision."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import make_keys, write_plain, write_upstream
from mounting import (
    CHILD_TIMEOUT,
    mounted,
    requires_fuse,
    served_tensors,
    write_key_file,
)

from ctfs.files.encrypt import EncryptOptions, encrypt_file

pytestmark = requires_fuse

READER_UID = 4242  # an unprivileged reader: no such user needs to exist for setpriv
MODEL = "model.safetensors"


@pytest.fixture
def world(tmp_path):
    """A directory every user can traverse: the mount point must be reachable by the other uid."""
    root = Path(tempfile.mkdtemp(prefix="ctfs-policy-", dir="/tmp"))
    root.chmod(0o755)
    keys = make_keys()
    key_file = write_key_file(tmp_path / "keys.jwk", keys)
    plain = write_plain(tmp_path / "plain.safetensors", served_tensors())
    yield root, keys, key_file, plain
    shutil.rmtree(root, ignore_errors=True)


def encrypted_dir(root: Path, keys, plain: Path, policy: str | None = None) -> Path:
    src = root / "src"
    src.mkdir(mode=0o755)
    encrypt_file(plain, src / MODEL, keys.enc, keys.sign, EncryptOptions(policy=policy))
    return src


def read_as(path: Path, uid: int | None = None, exe: str = "cat") -> subprocess.CompletedProcess:
    """Read a file through the mount as another process: `cat` or `head`, optionally as another uid."""
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
    return subprocess.run([*prefix, exe, str(path)], capture_output=True, timeout=CHILD_TIMEOUT)


def write_policy(root: Path, text: str) -> Path:
    path = root / "operator.rego"
    path.write_text(text)
    return path


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_operator_policy_admits_one_uid_and_refuses_another_with_eacces(world):
    root, keys, key_file, plain = world
    src = encrypted_dir(root, keys, plain)
    policy = write_policy(root, "package model\nimport rego.v1\nallow if input.process.uid == 0\n")
    audit = root / "audit.log"
    with mounted(src, root / "mnt", "--keys", str(key_file), "--allow-other", "--policy", str(policy),
                 "--audit-log", str(audit)) as mount:
        assert read_as(mount.path(MODEL)).returncode == 0
        denied = read_as(mount.path(MODEL), uid=READER_UID)
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        assert "denied by policy" in mount.log()
    decisions = {(r["process"]["uid"], r["decision"]) for r in audit_records(audit)}
    assert (0, "allow") in decisions and (READER_UID, "deny") in decisions


def test_policy_on_the_executable_admits_cat_but_not_head(world):
    root, keys, key_file, plain = world
    cat = shutil.which("cat")
    src = encrypted_dir(root, keys, plain)
    policy = write_policy(root, f'package model\nimport rego.v1\nallow if input.process.exe == "{os.path.realpath(cat)}"\n')
    with mounted(src, root / "mnt", "--keys", str(key_file), "--policy", str(policy)) as mount:
        assert read_as(mount.path(MODEL), exe="cat").returncode == 0
        head = read_as(mount.path(MODEL), exe="head")
        assert head.returncode != 0 and b"Permission denied" in head.stderr


@pytest.mark.parametrize("window, allowed", [((-3600, 3600), True), ((-7200, -3600), False)])
def test_embedded_time_window_written_by_the_reference_library(world, window, allowed):
    root, keys, key_file, plain = world
    now = int(time.time())
    start, end = now + window[0], now + window[1]
    rego = f"package model\nimport rego.v1\nallow if {{\n  input.time.unix >= {start}\n  input.time.unix < {end}\n}}\n"
    src = root / "src"
    src.mkdir(mode=0o755)
    write_upstream(src / MODEL, served_tensors(), keys, None, policy={"local": rego})
    with mounted(src, root / "mnt", "--keys", str(key_file)) as mount:
        assert (read_as(mount.path(MODEL)).returncode == 0) is allowed


@pytest.mark.parametrize("label, allowed", [("env=prod", True), ("env=dev", False)])
def test_embedded_policy_on_an_operator_label(world, label, allowed):
    root, keys, key_file, plain = world
    src = encrypted_dir(root, keys, plain, 'package model\nimport rego.v1\nallow if input.labels.env == "prod"\n')
    with mounted(src, root / "mnt", "--keys", str(key_file), "--label", label) as mount:
        assert (read_as(mount.path(MODEL)).returncode == 0) is allowed


def test_an_embedded_policy_with_a_syntax_error_denies(world):
    root, keys, key_file, plain = world
    src = root / "src"
    src.mkdir(mode=0o755)
    # The reference library embeds policies without validating them, so such files exist.
    write_upstream(src / MODEL, served_tensors(), keys, None, policy={"local": "package model\nallow if {"})
    with mounted(src, root / "mnt", "--keys", str(key_file)) as mount:
        result = read_as(mount.path(MODEL))
        assert result.returncode != 0 and b"Permission denied" in result.stderr
        assert "denied by policy" in mount.log()


def test_hide_denied_removes_denied_files_from_listings_for_that_reader_only(world):
    root, keys, key_file, plain = world
    src = encrypted_dir(root, keys, plain)
    (src / "config.json").write_text("{}")
    policy = write_policy(root, "package model\nimport rego.v1\nallow if input.process.uid == 0\n")
    with mounted(src, root / "mnt", "--keys", str(key_file), "--allow-other", "--policy", str(policy),
                 "--hide-denied") as mount:
        as_root = subprocess.run(["ls", str(mount.mountpoint)], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        as_reader = read_as(mount.mountpoint, uid=READER_UID, exe="ls")
        assert as_root.stdout.split() == ["config.json", MODEL]
        assert as_reader.stdout.decode().split() == ["config.json"]


def test_audit_lines_name_keys_by_id_and_hold_no_key_material(world):
    root, keys, key_file, plain = world
    src = encrypted_dir(root, keys, plain)
    audit = root / "audit.log"
    with mounted(src, root / "mnt", "--keys", str(key_file), "--audit-log", str(audit)) as mount:
        assert read_as(mount.path(MODEL)).returncode == 0
    text = audit.read_text()
    record = audit_records(audit)[0]
    assert record["decision"] == "allow" and record["file"] == f"/{MODEL}"
    assert set(record["key_ids"]) == {keys.enc_kid, keys.sign_kid}
    for secret in (keys.enc_jwk["k"], keys.sign_jwk["d"], keys.master.hex(), keys.seed.hex()):
        assert secret not in text


def test_a_policy_matches_a_venv_python_on_cmdline_not_on_exe(world, tmp_path):
    """A venv's bin/python is a symlink: process.exe is the base interpreter it resolves to, so a policy names
    the venv by cmdline[0], the path the reader was started as (docs/policy.md)."""
    root, keys, key_file, plain = world
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=CHILD_TIMEOUT)
    venv_python = venv / "bin" / "python"
    assert venv_python.is_symlink()
    src = encrypted_dir(root, keys, plain)
    by_cmdline = write_policy(root, f'package model\nimport rego.v1\nallow if input.process.cmdline[0] == "{venv_python}"\n')
    read = [str(venv_python), "-c", "import sys; sys.stdout.write(str(len(open(sys.argv[1], 'rb').read())))"]
    audit = root / "audit.log"
    with mounted(src, root / "mnt", "--keys", str(key_file), "--policy", str(by_cmdline),
                 "--audit-log", str(audit)) as mount:
        assert subprocess.run([*read, mount.path(MODEL)], capture_output=True, timeout=CHILD_TIMEOUT).returncode == 0
        assert read_as(mount.path(MODEL), exe="cat").returncode != 0
    record = next(r for r in audit_records(audit) if r["decision"] == "allow")
    assert record["process"]["exe"] == os.path.realpath(venv_python) != str(venv_python)

    by_exe = write_policy(root, f'package model\nimport rego.v1\nallow if input.process.exe == "{venv_python}"\n')
    with mounted(src, root / "mnt", "--keys", str(key_file), "--policy", str(by_exe)) as mount:
        assert subprocess.run([*read, mount.path(MODEL)], capture_output=True, timeout=CHILD_TIMEOUT).returncode != 0
