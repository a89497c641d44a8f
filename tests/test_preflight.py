"""The check at mount start: which encrypted files the mount's keys cannot open, and the one line that says so."""

from __future__ import annotations

from conftest import make_keys, seeded_tensors, write_plain

from ctfs.daemon.chunk_cache import ChunkCache
from ctfs.daemon.preflight import describe_unopenable
from ctfs.daemon.preflight import unopenable_files as check_source
from ctfs.daemon.source import ModelSource, SourceOptions
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.keys.store import KeyStore

OWNER = make_keys(seed=0)
OTHER = make_keys(seed=1)  # the same kids as OWNER, other key bytes


def source_dir(tmp_path, count: int):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    plain = write_plain(tmp_path / "plain.safetensors", seeded_tensors(0))
    for i in range(count):
        encrypt_file(plain, src / "sub" / f"model-{i}.safetensors", OWNER.enc, OWNER.sign, EncryptOptions())
    write_plain(src / "plain.safetensors", seeded_tensors(1))  # plain files are not the keys' business
    (src / "config.json").write_text("{}")
    return src


def unopenable_files(src: str, keys: KeyStore, follow: tuple[str, ...] = ()) -> tuple[dict[str, str], int]:
    """The check as a mount of `src` runs it: over what that mount serves."""
    return check_source(ModelSource(src, keys, ChunkCache(1 << 20), SourceOptions(follow=follow)))


def test_the_right_keys_open_every_file(tmp_path):
    assert unopenable_files(str(source_dir(tmp_path, 2)), OWNER.store) == ({}, 2)


def test_a_wrong_or_missing_master_key_and_an_untrusted_signer_are_named(tmp_path):
    src = source_dir(tmp_path, 2)
    assert unopenable_files(str(src), KeyStore([OTHER.enc, OWNER.sign])) == (
        {"sub/model-0.safetensors": "wrong master key", "sub/model-1.safetensors": "wrong master key"}, 2)
    problems, _ = unopenable_files(str(src), KeyStore([make_keys(enc_kid="elsewhere").enc, OWNER.sign]))
    assert set(problems.values()) == {"master key missing"}
    problems, _ = unopenable_files(str(src), KeyStore([OWNER.enc], trusted=[]))
    assert set(problems.values()) == {"signer not trusted"}
    problems, _ = unopenable_files(str(src), KeyStore([OWNER.enc], trusted=[OTHER.sign]))
    assert set(problems.values()) == {"signature does not verify with the trusted signers"}


def test_the_line_names_a_few_files_and_counts_the_rest(tmp_path):
    problems, encrypted = unopenable_files(str(source_dir(tmp_path, 5)), KeyStore([OTHER.enc, OWNER.sign]))
    line = describe_unopenable(problems, encrypted)
    assert line == ("5 of 5 encrypted file(s) cannot be opened with these keys: "
                    "sub/model-0.safetensors (wrong master key), sub/model-1.safetensors (wrong master key), "
                    "sub/model-2.safetensors (wrong master key) and 2 more")


def test_it_checks_what_the_mount_serves_through_symlinked_directories(tmp_path):
    """A symlinked directory is served as what it points to when that lies in the source or a followed root
    (a Hugging Face cache's snapshots), so it is checked too; one pointing elsewhere is not served, so not
    checked; a link back up the tree is walked once."""
    src = source_dir(tmp_path, 1)
    elsewhere = source_dir(tmp_path / "elsewhere", 1)
    (src / "linked").symlink_to(elsewhere / "sub")
    (src / "sub" / "loop").symlink_to(src)
    wrong = KeyStore([OTHER.enc, OWNER.sign])
    assert unopenable_files(str(src), wrong) == ({"sub/model-0.safetensors": "wrong master key"}, 1)
    assert unopenable_files(str(src), wrong, follow=(str(elsewhere),)) == (
        {"linked/model-0.safetensors": "wrong master key", "sub/model-0.safetensors": "wrong master key"}, 2)
