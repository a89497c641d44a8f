"""A mount fails closed: tampered, untrusted, undecryptable and plain files are refused with the right errno,
each refusal logged with its reason, and consumers fail in a known way rather than read wrong bytes."""

from __future__ import annotations

import errno
import shutil
import signal

import pytest
from conftest import edit_header, flip_file_bit, make_keys, split_file, write_plain
from mounting import (
    SERVED_CHUNK_SIZE,
    call_with_timeout,
    consume,
    mounted,
    requires_fuse,
    served_tensors,
    write_key_file,
)

from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file

pytestmark = requires_fuse

GOOD = "good.safetensors"
FLIPPED = "flipped.safetensors"  # one ciphertext bit flipped in the middle of tensor "big"
HEADER = "header.safetensors"  # user metadata edited, signature left as it was
FOREIGN_SIGNER = "foreign-signer.safetensors"  # signed by a key this mount does not trust
FOREIGN_KEY = "foreign-key.safetensors"  # signed by the trusted key, encrypted with a master key not given
PLAIN = "plain.safetensors"
# Where the flipped bit lies in the plain view: reads before it succeed.
FLIP_AT_TENSOR_BYTE = 150_000


def tensor_file_offset(path, tensor: str) -> int:
    """Where the bytes of `tensor` start in the file at `path`."""
    header, data = split_file(path)
    return path.stat().st_size - len(data) + header[tensor]["data_offsets"][0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tamper")
    keys, other = make_keys(), make_keys(seed=1, enc_kid="enc2", sign_kid="sign2")
    src = root / "src"
    src.mkdir()
    plain = write_plain(root / "plain.safetensors", served_tensors())
    good = src / GOOD
    encrypt_file(plain, good, keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    shutil.copy(good, src / FLIPPED)
    flip_file_bit(src / FLIPPED, tensor_file_offset(good, "big") + FLIP_AT_TENSOR_BYTE)
    edit_header(good, lambda h: h["__metadata__"].update(origin="edited"), dst=src / HEADER)
    encrypt_file(plain, src / FOREIGN_SIGNER, other.enc, other.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    encrypt_file(plain, src / FOREIGN_KEY, other.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    shutil.copy(plain, src / PLAIN)
    view = root / "good.plain"  # what the mount serves for GOOD
    decrypt_file(good, view, keys.store)
    return {
        "root": root, "src": src, "plain": view.read_bytes(),
        "flip_offset": tensor_file_offset(view, "big") + FLIP_AT_TENSOR_BYTE,
        "keys": write_key_file(root / "keys.jwk", keys),
        "other_public": write_key_file(root / "other-public.jwk", other, private=False),
    }


@pytest.fixture(scope="module")
def default_mount(tree):
    with mounted(tree["src"], tree["root"] / "mnt", "--keys", str(tree["keys"])) as mount:
        yield mount


def open_errno(path) -> int | None:
    """The errno an open of `path` fails with, or None if it opens."""
    def attempt():
        try:
            with open(path, "rb"):
                return None
        except OSError as exc:
            return exc.errno
    return call_with_timeout(attempt)


def new_log_lines(mount, action) -> list[str]:
    before = len(mount.log().splitlines())
    action()
    return mount.log().splitlines()[before:]


def assert_refused_once(mount, name: str, code: int, reason: str) -> None:
    """Opening `name` fails with `code`, and the daemon logs exactly one line naming the file and why."""
    outcome = {}
    lines = new_log_lines(mount, lambda: outcome.setdefault("errno", open_errno(mount.path(name))))
    assert outcome["errno"] == code
    about_the_file = [line for line in lines if name in line]
    assert len(about_the_file) == 1, lines
    assert reason in about_the_file[0] and f"refused ({errno.errorcode[code]})" in about_the_file[0], lines


def test_an_intact_file_is_served(default_mount, tree):
    assert call_with_timeout(default_mount.path(GOOD).read_bytes) == tree["plain"]


def test_a_flipped_ciphertext_byte_is_eio_on_read_never_wrong_bytes(default_mount, tree):
    path = default_mount.path(FLIPPED)
    outcome = {}

    def read_around_the_flip():
        with open(path, "rb", buffering=0) as f:
            outcome["before"] = f.read(tree["flip_offset"] - SERVED_CHUNK_SIZE)  # the chunks before the bad one
            try:
                outcome["rest"] = f.read()
            except OSError as exc:
                outcome["errno"] = exc.errno

    lines = new_log_lines(default_mount, lambda: call_with_timeout(read_around_the_flip))
    assert outcome["before"] == tree["plain"][:len(outcome["before"])]
    assert "rest" not in outcome and outcome["errno"] == errno.EIO
    assert lines and all(FLIPPED in line and "authentication tag mismatch" in line for line in lines), lines


def test_consumers_of_a_flipped_file_fail_in_known_ways(default_mount):
    path = default_mount.path(FLIPPED)
    # mmap readers: the kernel turns the failed page read into SIGBUS, which kills the process.
    for kind in ("safe_open_np", "safe_open_pt", "memmap_r"):
        run = consume(kind, path)
        assert run.returncode == -signal.SIGBUS, (kind, run.returncode, run.results)
    # pread and read() readers get a catchable error.
    pread = consume("safe_open_pread", path).result
    assert pread["error"] == "SafetensorError" and "Input/output error (os error 5)" in pread["message"]
    assert consume("read", path).result == {"error": "OSError", "errno": errno.EIO,
                                            "message": "[Errno 5] Input/output error"}


def test_a_tampered_header_is_refused_at_open_as_corrupt(default_mount):
    # The rule: refusals are EACCES, corrupt files EIO; a header whose signature fails is corrupt.
    assert_refused_once(default_mount, HEADER, errno.EIO, "header signature verification failed")


def test_a_file_from_an_untrusted_signer_is_refused(default_mount):
    assert_refused_once(default_mount, FOREIGN_SIGNER, errno.EACCES, "which is not a trusted verify key")


def test_a_file_whose_master_key_is_missing_is_refused(default_mount):
    assert_refused_once(default_mount, FOREIGN_KEY, errno.EACCES, "no aes256gcm encryption key with kid 'enc2'")


def test_a_plain_file_is_refused_as_a_downgrade(default_mount):
    assert_refused_once(default_mount, PLAIN, errno.EACCES, "plain safetensors file refused (downgrade)")


def test_safetensors_reports_a_refused_open_as_file_not_found(default_mount):
    # safetensors maps every open error to FileNotFoundError, whatever the errno: what users will see.
    for name in (HEADER, FOREIGN_SIGNER, FOREIGN_KEY, PLAIN):
        for kind in ("safe_open_np", "safe_open_pread"):
            run = consume(kind, default_mount.path(name))
            assert run.returncode == 0
            assert run.result["error"] == "FileNotFoundError", (name, kind, run.result)


def test_with_allow_plain_a_plain_file_is_served(tree, tmp_path):
    with mounted(tree["src"], tmp_path / "mnt", "--keys", str(tree["keys"]), "--allow-plain") as mount:
        assert call_with_timeout(mount.path(PLAIN).read_bytes) == (tree["src"] / PLAIN).read_bytes()
        assert open_errno(mount.path(HEADER)) == errno.EIO  # the other checks still hold


def test_trusting_another_signer_refuses_files_of_the_usual_one(tree, tmp_path):
    with mounted(tree["src"], tmp_path / "mnt", "--keys", str(tree["keys"]),
                 "--trust", str(tree["other_public"])) as mount:
        assert_refused_once(mount, GOOD, errno.EACCES, "signed by kid 'sign1', which is not a trusted verify key")


@pytest.mark.parametrize("options", [("--verify", "full"), ("--memory-budget", "1G")],
                         ids=["verify-full-chunk-cache", "memory-image"])
def test_a_flipped_file_is_refused_at_open_so_mmap_readers_never_see_sigbus(tree, tmp_path, options):
    with mounted(tree["src"], tmp_path / "mnt", "--keys", str(tree["keys"]), *options) as mount:
        assert_refused_once(mount, FLIPPED, errno.EIO, "authentication tag mismatch")
        run = consume("safe_open_np", mount.path(FLIPPED))
        assert run.returncode == 0 and run.result["error"] == "FileNotFoundError"
        assert call_with_timeout(mount.path(GOOD).read_bytes) == tree["plain"]
