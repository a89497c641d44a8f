"""Names a reader or a publisher can choose: odd bytes never crash the daemon, content (not the name) decides
what is safetensors, and symlinks into the source or a followed root (a Hugging Face cache) are served."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, make_keys, write_plain
from mounting import (
    CHILD_TIMEOUT,
    daemon_pid,
    mounted,
    requires_fuse,
    served_tensors,
    write_key_file,
)

from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.modeldir import transform_tree
from demo.tiny_llama import DEMO_TOKEN_IDS, make_tiny_llama

pytestmark = requires_fuse

ODD_NAMES = [b"dir\xff/model.safetensors", b"new\nline.safetensors", b"-leading.safetensors",
             b"x" * 243 + b".safetensors", b"tab\tand space .safetensors"]


def open_errno(path: Path | bytes) -> int | None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return exc.errno
    return None


@pytest.fixture
def odd_tree(tmp_path):
    keys = make_keys()
    src, views = tmp_path / "src", tmp_path / "views"
    src.mkdir()
    views.mkdir()
    plain = write_plain(tmp_path / "plain.safetensors", served_tensors())
    for i, name in enumerate(ODD_NAMES):
        target = os.path.join(os.fsencode(src), name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        encrypt_file(plain, tmp_path / "staged", keys.enc, keys.sign, EncryptOptions("2", 4096))
        os.rename(tmp_path / "staged", target)
        decrypt_file(os.fsdecode(target), views / f"{i}.plain", keys.store)
    return tmp_path, src, views, write_key_file(tmp_path / "keys.jwk", keys)


def write_policy(root: Path, rule: str) -> Path:
    path = root / "operator.rego"
    path.write_text(f"package model\n\n{rule}\n")
    return path


@pytest.mark.parametrize("hide_denied", [False, True])
def test_odd_names_are_listed_and_read_and_never_crash_the_daemon(odd_tree, hide_denied):
    root, src, views, key_file = odd_tree
    policy = write_policy(root, "allow if input.file.name != \"\"")
    options = ["--keys", str(key_file), "--policy", str(policy), *(["--hide-denied"] if hide_denied else [])]
    with mounted(src, root / "mnt", *options) as mount:
        mnt = os.fsencode(mount.mountpoint)
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(os.fsencode(src)))
        assert os.listdir(os.path.join(mnt, b"dir\xff")) == [b"model.safetensors"]
        for i, name in enumerate(ODD_NAMES):
            with open(os.path.join(mnt, name), "rb") as f:
                assert f.read() == (views / f"{i}.plain").read_bytes(), name
        assert daemon_pid(mount.mountpoint) == mount.pid


def test_a_policy_sees_a_non_utf8_path_escaped_as_documented(odd_tree):
    root, src, views, key_file = odd_tree
    # docs/policy.md: bytes that are not UTF-8 appear as the four characters \xHH; file.utf8 is false.
    policy = write_policy(root, 'allow if input.file.utf8\nallow if input.file.path == "/dir\\\\xff/model.safetensors"')
    with mounted(src, root / "mnt", "--keys", str(key_file), "--policy", str(policy)) as mount:
        mnt = os.fsencode(mount.mountpoint)
        assert open_errno(os.path.join(mnt, b"dir\xff/model.safetensors")) is None
    policy = write_policy(root, "allow if input.file.utf8")
    with mounted(src, root / "mnt2", "--keys", str(key_file), "--policy", str(policy), "--hide-denied") as mount:
        mnt = os.fsencode(mount.mountpoint)
        assert os.listdir(os.path.join(mnt, b"dir\xff")) == []  # hidden from this reader, not a crash
        assert open_errno(os.path.join(mnt, b"dir\xff/model.safetensors")) == errno.ENOENT
        assert open_errno(os.path.join(mnt, b"-leading.safetensors")) is None
        assert daemon_pid(mount.mountpoint) == mount.pid


PLAIN_DISGUISES = ["evil.bin", "model.SAFETENSORS", "model.safetensors.bak", "README"]


@pytest.fixture
def disguised(tmp_path):
    keys = make_keys()
    src = tmp_path / "src"
    src.mkdir()
    plain = write_plain(tmp_path / "plain.safetensors", served_tensors())
    for name in PLAIN_DISGUISES:
        shutil.copyfile(plain, src / name)
    encrypt_file(plain, src / "weights.bin", keys.enc, keys.sign, EncryptOptions("2", 4096))
    decrypt_file(src / "weights.bin", tmp_path / "weights.view", keys.store)
    (src / "config.json").write_text('{"model_type": "llama"}\n')
    return tmp_path, src, plain, write_key_file(tmp_path / "keys.jwk", keys)


def test_plain_safetensors_under_any_name_is_refused_as_a_downgrade(disguised):
    root, src, plain, key_file = disguised
    with mounted(src, root / "mnt", "--keys", str(key_file)) as mount:
        for name in PLAIN_DISGUISES:
            assert open_errno(mount.path(name)) == errno.EACCES, name
        # Content decides both ways: an encrypted file with another suffix is served as its plain view.
        assert mount.path("weights.bin").read_bytes() == (root / "weights.view").read_bytes()
        assert mount.path("config.json").read_bytes() == (src / "config.json").read_bytes()
        assert all(name in mount.log() for name in PLAIN_DISGUISES)


def test_with_allow_plain_a_disguised_plain_file_is_served(disguised):
    root, src, plain, key_file = disguised
    with mounted(src, root / "mnt", "--keys", str(key_file), "--allow-plain") as mount:
        assert mount.path("evil.bin").read_bytes() == plain.read_bytes()


# -- a Hugging Face cache: snapshots/REV/NAME are relative symlinks to ../../blobs/HASH ------------------

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hf_cache_of(model_dir: Path, cache_root: Path, repo: str = "models--acme--tiny") -> tuple[Path, Path]:
    """The layout huggingface_hub's downloads leave: each file's bytes once in blobs/ (named by its hash),
    the snapshot made of relative symlinks into them, and refs/main naming the revision."""
    repo_dir = cache_root / repo
    snapshot = repo_dir / "snapshots" / REVISION
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo_dir / "blobs" / digest)
        link = snapshot / path.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / digest, link.parent))
    return repo_dir, snapshot


LOAD_AND_RUN = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
with torch.no_grad():
    torch.save(model(torch.tensor(eval(sys.argv[2]))).logits, sys.argv[3])
"""


def logits_through(directory: Path, out: Path) -> torch.Tensor:
    run = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(directory), repr(DEMO_TOKEN_IDS), str(out)],
                         capture_output=True, text=True, timeout=3 * CHILD_TIMEOUT, cwd=REPO_ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    keys = make_keys()
    model = make_tiny_llama(root / "plain", shards=2)
    with torch.no_grad():
        want = model(torch.tensor(DEMO_TOKEN_IDS)).logits
    transform_tree(root / "plain", root / "encrypted",
                   lambda s, d: encrypt_file(s, d, keys.enc, keys.sign, EncryptOptions("2", 16 * 1024)))
    repo_dir, snapshot = hf_cache_of(root / "encrypted", root / "hub")
    return root, repo_dir, snapshot, want, write_key_file(root / "keys.jwk", keys)


def test_a_hugging_face_snapshot_mounts_with_its_repo_followed_and_loads_with_transformers(hf_cache, tmp_path):
    root, repo_dir, snapshot, want, key_file = hf_cache
    with mounted(snapshot, tmp_path / "mnt", "--keys", str(key_file), "--follow", str(repo_dir)) as mount:
        names = sorted(os.listdir(mount.mountpoint))
        assert names == sorted(os.listdir(snapshot)) and "model.safetensors.index.json" in names
        assert all(os.path.isfile(mount.path(n)) and not os.path.islink(mount.path(n)) for n in names)
        assert torch.equal(logits_through(mount.mountpoint, tmp_path / "logits.pt"), want)


def test_a_whole_cache_repo_mounts_without_follow_since_its_links_stay_inside(hf_cache, tmp_path):
    root, repo_dir, snapshot, want, key_file = hf_cache
    with mounted(repo_dir, tmp_path / "mnt", "--keys", str(key_file)) as mount:
        served = mount.mountpoint / "snapshots" / REVISION
        assert torch.equal(logits_through(served, tmp_path / "logits.pt"), want)


def test_a_symlink_out_of_the_source_is_refused_with_one_log_line(hf_cache, tmp_path):
    root, repo_dir, snapshot, want, key_file = hf_cache
    source = tmp_path / "src"
    shutil.copytree(snapshot, source, symlinks=True)  # its links now point outside: ../../blobs is gone
    for link in source.iterdir():
        link.unlink()
        link.symlink_to(snapshot.resolve() / link.name)  # absolute, out of the source
    (source / "passwd").symlink_to("/etc/passwd")
    with mounted(source, tmp_path / "mnt", "--keys", str(key_file)) as mount:
        assert os.listdir(mount.mountpoint) == []  # refused links are not listed
        assert open_errno(mount.path("passwd")) == errno.EACCES
        assert open_errno(mount.path("config.json")) == errno.EACCES
        refusals = [line for line in mount.log().splitlines() if "/passwd: symlink" in line]
        assert len(refusals) == 1 and "refused" in refusals[0]
