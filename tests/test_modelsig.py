"""Signed model directories (OpenSSF model signing, DIR/model.sig): `ctfs keygen/encrypt/sign --model-key`
writes what the upstream verifier accepts, and `ctfs verify --model-pubkey` catches every change to the
directory that the per-file CryptoTensors signatures cannot see: a substituted shard, a changed config,
an added or a removed file."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import flip_file_bit, make_keys, seeded_tensors, split_file, write_plain
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
    load_pem_public_key,
)
from model_signing import hashing, signing
from mounting import CHILD_TIMEOUT, ctfs, write_key_file
from test_cli import OTHER_FILES, assert_fails_cleanly

from ctfs.errors import IntegrityError
from ctfs.files.modelsig import SIGNATURE_NAME, ModelManifest, hash_file

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def make_model(root: Path, seed: int) -> Path:
    """Two shards (tensors from `seed`), a config, a tokenizer and an index."""
    root.mkdir(parents=True)
    write_plain(root / SHARDS[0], seeded_tensors(seed))
    write_plain(root / SHARDS[1], seeded_tensors(seed + 1))
    for name, text in OTHER_FILES.items():
        (root / name).write_text(text)
    return root


def upstream_verify(directory: Path, public_key: Path) -> subprocess.CompletedProcess:
    """model-signing's own command line, unchanged."""
    return subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", str(directory),
         "--signature", str(directory / SIGNATURE_NAME), "--public_key", str(public_key)],
        check=False, capture_output=True, text=True, timeout=CHILD_TIMEOUT, stdin=subprocess.DEVNULL)


def signed_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != SIGNATURE_NAME)


class Signed:
    """Two different models encrypted with the same CryptoTensors keys, each signed with the model key."""

    def __init__(self, root: Path):
        self.keys = write_key_file(root / "keys.jwk", make_keys())
        self.model_key, self.model_pub = root / "model.pem", root / "model.pub.pem"
        result = ctfs("keygen", "--model-key", str(self.model_key))
        assert result.returncode == 0, result.stderr
        self.a, self.b = root / "a.enc", root / "b.enc"
        for seed, dst in ((1, self.a), (5, self.b)):
            plain = make_model(root / f"plain-{seed}", seed)
            result = ctfs("encrypt", str(plain), str(dst), "--keys", str(self.keys), "--model-key", str(self.model_key))
            assert result.returncode == 0, result.stderr

    def copy_of_a(self, tmp_path: Path) -> Path:
        return Path(shutil.copytree(self.a, tmp_path / "a.enc"))

    def verify(self, directory: Path, *options: str):
        return ctfs("verify", str(directory), "--model-pubkey", str(self.model_pub), *options)


@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> Signed:
    return Signed(tmp_path_factory.mktemp("signed"))


# -- the key pair -----------------------------------------------------------------------------------

def test_keygen_writes_a_private_p256_key_and_its_public_half(signed):
    private = load_pem_private_key(signed.model_key.read_bytes(), None)
    public = load_pem_public_key(signed.model_pub.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    assert stat.S_IMODE(signed.model_key.stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite_a_model_key(signed):
    before = signed.model_key.read_bytes()
    assert_fails_cleanly(ctfs("keygen", "--model-key", str(signed.model_key)), "exists", "--force")
    assert signed.model_key.read_bytes() == before


# -- signing: what the upstream verifier accepts ----------------------------------------------------

def test_an_encrypted_directory_is_signed_over_every_file_and_upstream_accepts_it(signed):
    result = upstream_verify(signed.a, signed.model_pub)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout
    manifest = ModelManifest.load(signed.a, signed.model_pub)
    assert manifest.paths == signed_files(signed.a) == sorted([*SHARDS, *OTHER_FILES])
    ok = signed.verify(signed.a)
    assert ok.returncode == 0, ok.stderr
    assert "5 signed file(s)" in ok.stdout


def test_the_signature_names_the_model_after_its_directory_not_a_staging_one(signed):
    bundle = json.loads((signed.a / SIGNATURE_NAME).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["subject"][0]["name"] == signed.a.name


def test_sign_signs_an_existing_directory(tmp_path, signed):
    model = make_model(tmp_path / "plain", 3)
    (model / "sub").mkdir()
    (model / "sub" / "extra.txt").write_text("nested\n")
    result = ctfs("sign", str(model), "--model-key", str(signed.model_key))
    assert result.returncode == 0, result.stderr
    assert upstream_verify(model, signed.model_pub).returncode == 0
    assert ModelManifest.load(model, signed.model_pub).paths == signed_files(model)
    assert signed.verify(model).returncode == 0


def test_a_signing_key_model_signing_cannot_use_is_refused_before_any_work(tmp_path, signed):
    ed = tmp_path / "ed.pem"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                                      NoEncryption()))
    ed.chmod(0o600)
    plain = make_model(tmp_path / "plain", 3)
    assert_fails_cleanly(ctfs("encrypt", str(plain), str(tmp_path / "enc"), "--keys", str(signed.keys),
                              "--model-key", str(ed)), "ed.pem", "P-256")
    assert not (tmp_path / "enc").exists() and not list(tmp_path.glob(".*ctfs-tmp*"))
    readable = tmp_path / "readable.pem"
    shutil.copyfile(signed.model_key, readable)
    readable.chmod(0o644)
    assert_fails_cleanly(ctfs("sign", str(plain), "--model-key", str(readable)), "readable.pem", "group or others")
    assert not (plain / SIGNATURE_NAME).exists()


def test_model_key_on_a_single_file_is_refused(tmp_path, signed):
    plain = make_model(tmp_path / "plain", 3)
    assert_fails_cleanly(ctfs("encrypt", str(plain / SHARDS[0]), str(tmp_path / "one.safetensors"),
                              "--keys", str(signed.keys), "--model-key", str(signed.model_key)), "directory")
    assert not (tmp_path / "one.safetensors").exists()


# -- verifying: every change to the directory is named ----------------------------------------------

def substitute_shard(a: Path, b: Path) -> str:
    """Another model's shard, validly CryptoTensors-signed by the same key, in place of one of ours."""
    shutil.copyfile(b / SHARDS[0], a / SHARDS[0])
    return SHARDS[0]


def change_config(a: Path, b: Path) -> str:
    (a / "config.json").write_text('{"model_type": "evil"}\n')
    return "config.json"


def change_index(a: Path, b: Path) -> str:
    (a / "model.safetensors.index.json").write_text('{"weight_map": {"w": "other.safetensors"}}\n')
    return "model.safetensors.index.json"


def add_file(a: Path, b: Path) -> str:
    (a / "added_tokens.json").write_text("{}\n")
    return "added_tokens.json"


def remove_file(a: Path, b: Path) -> str:
    (a / "tokenizer.json").unlink()
    return "tokenizer.json"


def fifo_for_file(a: Path, b: Path) -> str:
    (a / "tokenizer.json").unlink()
    os.mkfifo(a / "tokenizer.json")  # opening it for reading must not hang the check
    return "tokenizer.json"


@pytest.mark.parametrize(("tamper", "kind"), [
    (substitute_shard, "changed"), (change_config, "changed"), (change_index, "changed"),
    (add_file, "not listed"), (remove_file, "missing"), (fifo_for_file, "changed"),
])
def test_verify_names_each_change_to_the_directory(tmp_path, signed, tamper, kind):
    a = signed.copy_of_a(tmp_path)
    name = tamper(a, signed.b)
    assert_fails_cleanly(signed.verify(a), f"{kind}: {name}")


def test_a_substituted_shard_passes_the_cryptotensors_checks_alone(tmp_path, signed):
    # What the issue reports: each file's own signature is valid, so only model.sig can tell.
    a = signed.copy_of_a(tmp_path)
    substitute_shard(a, signed.b)
    assert ctfs("verify", str(a), "--keys", str(signed.keys)).returncode == 0
    assert_fails_cleanly(signed.verify(a, "--keys", str(signed.keys)), f"changed: {SHARDS[0]}")
    assert upstream_verify(a, signed.model_pub).returncode != 0


def test_every_difference_is_named_on_one_line(tmp_path, signed):
    a = signed.copy_of_a(tmp_path)
    change_config(a, signed.b)
    add_file(a, signed.b)
    remove_file(a, signed.b)
    assert_fails_cleanly(signed.verify(a), "changed: config.json", "not listed: added_tokens.json",
                         "missing: tokenizer.json")


def test_a_signature_by_another_key_or_a_forged_manifest_is_refused(tmp_path, signed):
    a = signed.copy_of_a(tmp_path)
    other = tmp_path / "other.pem"
    assert ctfs("keygen", "--model-key", str(other)).returncode == 0
    assert_fails_cleanly(ctfs("verify", str(a), "--model-pubkey", str(tmp_path / "other.pub.pem")),
                         SIGNATURE_NAME, "other.pub.pem")
    bundle = json.loads((a / SIGNATURE_NAME).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"].pop()  # drop a file from the signed list, keep the signature
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (a / SIGNATURE_NAME).write_text(json.dumps(bundle))
    assert_fails_cleanly(signed.verify(a), SIGNATURE_NAME, "does not verify")


def test_an_unsigned_directory_is_refused(tmp_path, signed):
    a = signed.copy_of_a(tmp_path)
    (a / SIGNATURE_NAME).unlink()
    assert_fails_cleanly(signed.verify(a), SIGNATURE_NAME, "not signed")


def test_cryptotensors_tags_are_checked_only_when_keys_are_given(tmp_path, signed):
    a = signed.copy_of_a(tmp_path)
    shard = a / SHARDS[1]
    _, data = split_file(shard)
    flip_file_bit(shard, shard.stat().st_size - len(data) // 2)
    assert ctfs("sign", str(a), "--model-key", str(signed.model_key)).returncode == 0  # the signer signed it so
    assert signed.verify(a).returncode == 0
    assert_fails_cleanly(signed.verify(a, "--keys", str(signed.keys)), SHARDS[1], "tag")


# -- the library the mount uses -------------------------------------------------------------------------

HASHING_CONFIGS = {
    "sha256 files": lambda: hashing.Config().use_file_serialization(hashing_algorithm="sha256"),
    "sha256 shards": lambda: hashing.Config().use_shard_serialization(hashing_algorithm="sha256", shard_size=1000),
    "blake2 files": lambda: hashing.Config().use_file_serialization(hashing_algorithm="blake2"),
    "blake2 shards": lambda: hashing.Config().use_shard_serialization(hashing_algorithm="blake2", shard_size=1000),
    "blake3 files": lambda: hashing.Config().use_file_serialization(hashing_algorithm="blake3"),
}


@pytest.mark.parametrize("config", HASHING_CONFIGS)
def test_a_files_digest_from_its_fd_equals_what_model_signing_records(tmp_path, signed, config):
    model = make_model(tmp_path / "model", 3)
    (model / "big.bin").write_bytes(bytes(range(256)) * 20)  # 5120 bytes: shards of 1000 with a short last one
    signing.Config().use_elliptic_key_signer(private_key=signed.model_key).set_hashing_config(
        HASHING_CONFIGS[config]().set_ignored_paths(paths=[SIGNATURE_NAME])).sign(model, model / SIGNATURE_NAME)
    manifest = ModelManifest.load(model, signed.model_pub)
    assert manifest.paths == signed_files(model)
    for rel in manifest.paths:
        expected = manifest.expected(rel)
        fd = os.open(model / rel, os.O_RDONLY)
        try:
            assert hash_file(fd, expected.algorithm, expected.shard_size) == expected.parts
            manifest.check(rel, fd)
        finally:
            os.close(fd)
    assert len(manifest.expected("big.bin").parts) == (6 if "shards" in config else 1)


def test_check_hashes_the_version_the_fd_holds_and_names_a_changed_file(tmp_path, signed):
    a = signed.copy_of_a(tmp_path)
    manifest = ModelManifest.load(a, signed.model_pub)
    fd = os.open(a / "config.json", os.O_RDONLY)
    try:
        replacement = a / "config.json.new"
        replacement.write_text('{"model_type": "evil"}\n')
        os.replace(replacement, a / "config.json")  # the held fd still reads the signed version
        manifest.check("/config.json", fd)
    finally:
        os.close(fd)
    fd = os.open(a / "config.json", os.O_RDONLY)
    try:
        with pytest.raises(IntegrityError, match="config.json"):
            manifest.check("config.json", fd)
    finally:
        os.close(fd)


def test_the_manifest_answers_what_may_be_served(tmp_path, signed):
    a = signed.copy_of_a(tmp_path)
    (a / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    manifest = ModelManifest.load(a, signed.model_pub)
    assert manifest.expected("/config.json") == manifest.expected("config.json") is not None
    assert manifest.expected(SIGNATURE_NAME) is None and manifest.expected(".gitattributes") is None
    present = [*SHARDS, "config.json", SIGNATURE_NAME, ".gitattributes", "extra.bin"]
    # The signature and the git metadata the signer declared ignored are not "extra"; neither is served.
    assert manifest.unlisted(present) == ["extra.bin"]
    assert manifest.missing(present) == sorted(["tokenizer.json", "model.safetensors.index.json"])
    fd = os.open(a / ".gitattributes", os.O_RDONLY)
    try:
        with pytest.raises(IntegrityError, match=r"\.gitattributes: not listed"):
            manifest.check(".gitattributes", fd)
    finally:
        os.close(fd)


def test_the_mount_takes_the_model_pubkey_from_its_flag(tmp_path, monkeypatch, signed):
    from ctfs import cli
    from ctfs.daemon import lifecycle

    configs = []
    monkeypatch.setattr(lifecycle, "run_foreground", configs.append)
    monkeypatch.chdir(signed.model_pub.parent)
    result = CliRunner().invoke(cli.main, ["mount", str(signed.a), str(tmp_path / "mnt"), "--foreground",
                                           "--model-pubkey", signed.model_pub.name])
    assert result.exit_code == 0, result.output
    assert configs[0].model_pubkey == str(signed.model_pub)


def test_decrypting_or_reencrypting_a_signed_directory_leaves_its_signature_behind(tmp_path, signed):
    """model.sig records the bytes of the files it signs: the decrypted tree holds other bytes, so a copy of
    it there would be a signature that no longer holds."""
    plain = tmp_path / "plain"
    result = ctfs("decrypt", str(signed.a), str(plain), "--keys", str(signed.keys))
    assert result.returncode == 0, result.stderr
    assert not (plain / SIGNATURE_NAME).exists()
    assert sorted(p.name for p in plain.iterdir()) == sorted([*SHARDS, *OTHER_FILES])
    assert f"left out {SIGNATURE_NAME}" in result.stdout
    signed_plain = make_model(tmp_path / "signed-plain", 3)
    assert ctfs("sign", str(signed_plain), "--model-key", str(signed.model_key)).returncode == 0
    encrypted = tmp_path / "encrypted"
    result = ctfs("encrypt", str(signed_plain), str(encrypted), "--keys", str(signed.keys))
    assert result.returncode == 0, result.stderr
    assert not (encrypted / SIGNATURE_NAME).exists()
    assert f"left out {SIGNATURE_NAME}" in result.stdout
