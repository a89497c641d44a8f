"""The offline commands as a user runs them: keygen, encrypt, decrypt, inspect, verify. Each failure is one
line on stderr with a non-zero exit, leaves no output behind and never touches its source."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import cryptotensors
import numpy as np
import pytest
from conftest import (
    assert_same_tensors,
    flip_file_bit,
    seeded_tensors,
    split_file,
    write_plain,
)
from mounting import ctfs
from safetensors.numpy import load_file

OTHER_FILES = {"config.json": '{"model_type": "llama"}\n', "tokenizer.json": '{"version": "1.0"}\n',
               "model.safetensors.index.json": '{"weight_map": {}}\n'}


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_fails_cleanly(result, *fragments: str) -> None:
    """One line on stderr naming the problem, a non-zero exit, and no traceback."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctfs: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model directory: two shards, a config, a tokenizer and an index."""
    root = tmp_path / "model"
    root.mkdir()
    write_plain(root / "model-00001-of-00002.safetensors", seeded_tensors(1), {"format": "np"})
    write_plain(root / "model-00002-of-00002.safetensors", seeded_tensors(2))
    for name, text in OTHER_FILES.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "keys.jwk"
    assert ctfs("keygen", str(path), "--kid", "team").returncode == 0
    return path


def test_keygen_writes_a_private_jwk_set_in_the_reference_shape(tmp_path, key_file):
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    keys = json.loads(key_file.read_text())["keys"]
    assert {(k["kty"], k["alg"], k["kid"]) for k in keys} == {("oct", "aes256gcm", "team-enc"),
                                                                ("okp", "ed25519", "team-sign")}
    # The reference library takes the same key set and reads what ctfs writes with it.
    plain = write_plain(tmp_path / "plain.safetensors", seeded_tensors(3))
    assert ctfs("encrypt", str(plain), str(tmp_path / "enc.safetensors"), "--keys", str(key_file)).returncode == 0
    by_kty = {k["kty"]: k for k in keys}
    config = {"enc_key": by_kty["oct"], "sign_key": by_kty["okp"]}
    with cryptotensors.safe_open(str(tmp_path / "enc.safetensors"), framework="np", config=config) as f:
        assert_same_tensors({name: f.get_tensor(name) for name in f.keys()}, seeded_tensors(3))


def test_keygen_refuses_to_overwrite_without_force(key_file):
    before = key_file.read_bytes()
    assert_fails_cleanly(ctfs("keygen", str(key_file)), "exists")
    assert key_file.read_bytes() == before
    assert ctfs("keygen", str(key_file), "--force", "--alg", "chacha20poly1305").returncode == 0
    assert json.loads(key_file.read_text())["keys"][0]["alg"] == "chacha20poly1305"


def test_a_model_directory_round_trips_and_other_files_are_copied_unchanged(tmp_path, model_dir, key_file):
    source_before = digest_tree(model_dir)
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    assert ctfs("encrypt", str(model_dir), str(enc), "--keys", str(key_file), "--chunk-size", "4096").returncode == 0
    assert ctfs("verify", str(enc), "--keys", str(key_file)).returncode == 0
    assert ctfs("decrypt", str(enc), str(dec), "--keys", str(key_file)).returncode == 0
    assert sorted(digest_tree(enc)) == sorted(source_before)
    for name in OTHER_FILES:
        assert (enc / name).read_text() == OTHER_FILES[name] == (dec / name).read_text()
    for shard in model_dir.glob("*.safetensors"):
        assert_same_tensors(load_file(dec / shard.name), load_file(shard))
        assert split_file(enc / shard.name)[0]["__metadata__"]["__encryption__"]
    assert digest_tree(model_dir) == source_before
    assert not list(tmp_path.glob(".*ctfs-tmp*"))


def test_encrypt_options_reach_the_file(tmp_path, model_dir, key_file):
    shard = model_dir / "model-00001-of-00002.safetensors"
    policy = tmp_path / "policy.rego"
    policy.write_text("package model\n\nallow if input.labels.env == \"prod\"\n")
    out = tmp_path / "v1.safetensors"
    chosen = sorted(seeded_tensors(1))[0]
    result = ctfs("encrypt", str(shard), str(out), "--keys", str(key_file), "--format-version", "1",
                  "--tensors", chosen, "--policy", str(policy))
    assert result.returncode == 0, result.stderr
    report = json.loads(ctfs("inspect", str(out), "--keys", str(key_file), "--json").stdout)
    assert report["version"] == "1" and report["chunk_size"] is None
    assert report["policy"] == policy.read_text()
    assert report["signature"].startswith("valid")
    assert {t["name"] for t in report["tensors"] if t["encrypted"]} == {chosen}


def test_an_invalid_policy_is_refused_before_anything_is_written(tmp_path, model_dir, key_file):
    policy = tmp_path / "bad.rego"
    policy.write_text("package model\nallow { true }\n")  # Rego v0: the reference library refuses it too
    out = tmp_path / "out.safetensors"
    result = ctfs("encrypt", str(model_dir / "model-00002-of-00002.safetensors"), str(out), "--keys",
                  str(key_file), "--policy", str(policy))
    assert_fails_cleanly(result)
    assert not out.exists()


def test_inspect_without_keys_describes_and_with_an_untrusted_key_says_invalid(tmp_path, model_dir, key_file):
    out = tmp_path / "enc.safetensors"
    ctfs("encrypt", str(model_dir / "model-00002-of-00002.safetensors"), str(out), "--keys", str(key_file))
    plain_report = json.loads(ctfs("inspect", str(out), "--json").stdout)
    assert plain_report["encrypted"] and plain_report["algorithm"] == "aes256gcm"
    assert plain_report["enc_kid"] == "team-enc" and plain_report["sign_kid"] == "team-sign"
    assert plain_report["signature"].startswith("not checked")
    other = tmp_path / "other.jwk"
    ctfs("keygen", str(other), "--kid", "team")  # the same kids, other key bytes
    assert json.loads(ctfs("inspect", str(out), "--keys", str(other), "--json").stdout)["signature"].startswith("INVALID")


def test_verify_names_the_tampered_file(tmp_path, model_dir, key_file):
    enc = tmp_path / "enc"
    ctfs("encrypt", str(model_dir), str(enc), "--keys", str(key_file))
    victim = enc / "model-00002-of-00002.safetensors"
    header, data = split_file(victim)
    flip_file_bit(victim, victim.stat().st_size - len(data) // 2)
    assert_fails_cleanly(ctfs("verify", str(enc), "--keys", str(key_file)), victim.name, "tag")


@pytest.mark.parametrize("command", ["decrypt", "verify"])
def test_a_wrong_key_fails_cleanly_and_leaves_nothing(tmp_path, model_dir, key_file, command):
    enc = tmp_path / "enc"
    ctfs("encrypt", str(model_dir), str(enc), "--keys", str(key_file))
    wrong = tmp_path / "wrong.jwk"
    ctfs("keygen", str(wrong), "--kid", "team")
    before = digest_tree(enc)
    args = [str(enc), str(tmp_path / "dec")] if command == "decrypt" else [str(enc)]
    assert_fails_cleanly(ctfs(command, *args, "--keys", str(wrong)))
    assert not (tmp_path / "dec").exists() and not list(tmp_path.glob(".*ctfs-tmp*"))
    assert digest_tree(enc) == before


def test_a_failure_midway_through_a_directory_leaves_no_partial_output(tmp_path, model_dir, key_file):
    broken = model_dir / "model-00002-of-00002.safetensors"
    broken.write_bytes(broken.read_bytes()[:-1])  # truncated: the second file fails after the first is done
    before = digest_tree(model_dir)
    result = ctfs("encrypt", str(model_dir), str(tmp_path / "enc"), "--keys", str(key_file))
    assert_fails_cleanly(result, broken.name, "truncated")
    assert not (tmp_path / "enc").exists() and not list(tmp_path.glob(".*ctfs-tmp*"))
    assert digest_tree(model_dir) == before


def test_the_source_is_never_the_destination(tmp_path, model_dir, key_file):
    shard = model_dir / "model-00001-of-00002.safetensors"
    before = digest_tree(model_dir)
    # A directory destination means "under the same name in there": here, the source itself.
    assert_fails_cleanly(ctfs("encrypt", str(shard), str(model_dir), "--keys", str(key_file)), "outside the source")
    assert_fails_cleanly(ctfs("encrypt", str(model_dir), str(model_dir / "enc"), "--keys", str(key_file)),
                         "outside the source")
    assert digest_tree(model_dir) == before


def test_a_non_empty_destination_directory_is_refused(tmp_path, model_dir, key_file):
    dst = tmp_path / "enc"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_fails_cleanly(ctfs("encrypt", str(model_dir), str(dst), "--keys", str(key_file)), "not an empty directory")
    assert os.listdir(dst) == ["keep.txt"]


def test_encrypting_an_encrypted_file_is_refused(tmp_path, model_dir, key_file):
    enc = tmp_path / "enc.safetensors"
    ctfs("encrypt", str(model_dir / "model-00002-of-00002.safetensors"), str(enc), "--keys", str(key_file))
    assert_fails_cleanly(ctfs("encrypt", str(enc), str(tmp_path / "twice.safetensors"), "--keys", str(key_file)),
                         "already encrypted")
    assert not (tmp_path / "twice.safetensors").exists()


def test_decrypted_output_is_private_to_its_owner(tmp_path, model_dir, key_file):
    enc, dec = tmp_path / "enc.safetensors", tmp_path / "dec.safetensors"
    ctfs("encrypt", str(model_dir / "model-00002-of-00002.safetensors"), str(enc), "--keys", str(key_file))
    assert ctfs("decrypt", str(enc), str(dec), "--keys", str(key_file)).returncode == 0
    assert stat.S_IMODE(dec.stat().st_mode) == 0o600
    assert np.array_equal(load_file(dec)[sorted(seeded_tensors(2))[0]], seeded_tensors(2)[sorted(seeded_tensors(2))[0]])
