"""The writer: upstream's exact header form, the safe choices of docs/format.md §11 (★), streaming and atomicity."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ALGS,
    Keys,
    assert_same_tensors,
    b64,
    canonical_signing_bytes,
    edit_header,
    edit_json_field,
    flip_b64,
    load_upstream,
    make_keys,
    split_file,
    write_plain,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from safetensors.numpy import load_file

import ctfs.files.decrypt
import ctfs.files.encrypt
from ctfs.errors import CtfsError, FormatError, IntegrityError, PlainFileError
from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.encrypted import EncryptedFile
from ctfs.keys.jwk import parse_jwk


def encrypt(tmp_path: Path, tensors, keys: Keys, metadata=None, /, **options) -> Path:
    source = write_plain(tmp_path / "source.safetensors", tensors, metadata)
    dst = tmp_path / "out.ct"
    encrypt_file(source, dst, keys.enc, keys.sign, EncryptOptions(**options))
    return dst


def entries(path: Path) -> dict:
    return json.loads(split_file(path)[0]["__metadata__"]["__encryption__"])


def aead(alg: str, key: bytes):
    return ChaCha20Poly1305(key) if alg == "chacha20poly1305" else AESGCM(key)


def unwrap(keys: Keys, entry: dict) -> bytes:
    """The DEK of an entry, unwrapped independently of ctfs."""
    sealed = base64.b64decode(entry["wrapped_key"]) + base64.b64decode(entry["key_tag"])
    return aead(keys.alg, keys.master).decrypt(base64.b64decode(entry["key_iv"]), sealed, None)


# -- the header --------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1", "2"])
def test_the_header_is_the_canonical_form_with_the_signature_and_space_padding(tmp_path, keys, tensors, version):
    path = encrypt(tmp_path, tensors, keys, {"zeta": "z", "alpha": "é\u2028"}, version=version, chunk_size=16)
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    raw = blob[8:8 + size]
    assert size % 8 == 0 and len(raw) - len(raw.rstrip(b" ")) < 8
    header = json.loads(raw)
    signature = base64.b64decode(header["__metadata__"]["__signature__"])
    Ed25519PublicKey.from_public_bytes(keys.public).verify(signature, canonical_signing_bytes(header))
    canonical = json.loads(canonical_signing_bytes(header))
    canonical["__metadata__"] = dict(sorted({**canonical["__metadata__"], "__signature__": b64(signature)}.items()))
    assert raw.rstrip(b" ") == json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()


def test_crypto_keys_hold_public_descriptors_in_upstream_form(tmp_path, tensors):
    keys = make_keys("chacha20poly1305")
    sign = parse_jwk({**keys.sign_jwk, "jku": "https://keys.example/s.jwk"})
    source = write_plain(tmp_path / "s.safetensors", tensors)
    for version, chunk in (("2", 4096), ("1", 4096)):
        encrypt_file(source, tmp_path / "o.ct", keys.enc, sign, EncryptOptions(version=version, chunk_size=chunk))
        expected = ('{"chunk_size":4096,' if version == "2" else "{") + (
            '"enc":{"alg":"chacha20poly1305","kid":"enc1","kty":"oct"},'
            '"sign":{"alg":"ed25519","jku":"https://keys.example/s.jwk","kid":"sign1","kty":"okp"},'
            f'"version":"{version}"}}')
        assert split_file(tmp_path / "o.ct")[0]["__metadata__"]["__crypto_keys__"] == expected


def test_no_key_material_is_written(tmp_path, keys, tensors):
    blob = encrypt(tmp_path, tensors, keys).read_bytes()
    for secret in (keys.master, keys.seed, keys.public):
        assert b64(secret).encode() not in blob and secret not in blob


@pytest.mark.parametrize(("version", "fields"), [
    ("2", ["wrapped_key", "key_iv", "key_tag", "base_iv", "tags"]),
    ("1", ["wrapped_key", "key_iv", "key_tag", "iv", "tag"]),
])
def test_encryption_entries_have_upstream_fields_in_upstream_order(tmp_path, keys, tensors, version, fields):
    found = entries(encrypt(tmp_path, tensors, keys, version=version, chunk_size=100))
    assert list(found) == sorted(tensors)
    assert all(list(entry) == fields for entry in found.values())
    assert len(base64.b64decode(found["weight"]["tags" if version == "2" else "tag"])) == (16 * 6 if version == "2" else 16)


def test_user_metadata_is_kept_and_reserved_names_are_replaced(tmp_path, keys, tensors):
    metadata = {"k": "v", "__other__": "kept", "__policy__": "forged", "__signature__": "forged",
                "__crypto_keys__": "forged"}
    path = encrypt(tmp_path, tensors, keys, metadata, policy="package model\nallow if { true }")
    header_meta = split_file(path)[0]["__metadata__"]
    assert header_meta["k"] == "v" and header_meta["__other__"] == "kept"
    assert json.loads(header_meta["__policy__"]) == {"local": "package model\nallow if { true }",
                                                     "remote": "package model\nallow = true"}
    with EncryptedFile(path, keys.store) as ef:
        assert ef.crypto.sign.kid == "sign1"
    plain = tmp_path / "plain"
    decrypt_file(path, plain, keys.store)
    assert split_file(plain)[0]["__metadata__"] == {"k": "v", "__other__": "kept"}


# -- the safe choices --------------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ALGS)
def test_every_tensor_gets_a_fresh_data_key_and_fresh_nonces(tmp_path, alg, tensors):
    keys = make_keys(alg)
    found = entries(encrypt(tmp_path, tensors, keys, chunk_size=8))
    deks = [unwrap(keys, entry) for entry in found.values()]
    assert all(len(dek) == len(keys.master) for dek in deks)
    assert len(set(deks)) == len(deks)
    assert len({entry["key_iv"] for entry in found.values()}) == len(found)
    assert len({base64.b64decode(entry["base_iv"])[:8] for entry in found.values()}) == len(found)


def test_the_chunk_counter_starts_at_zero_so_it_cannot_overflow(tmp_path, keys, tensors):
    for entry in entries(encrypt(tmp_path, tensors, keys, chunk_size=1)).values():
        assert base64.b64decode(entry["base_iv"])[8:] == bytes(4)


@pytest.mark.parametrize("version", ["1", "2"])
def test_empty_tensors_carry_an_authenticated_tag(tmp_path, keys, tensors, version):
    path = encrypt(tmp_path, tensors, keys, version=version, chunk_size=16)
    entry = entries(path)["empty"]
    iv = base64.b64decode(entry["base_iv" if version == "2" else "iv"])
    tag = base64.b64decode(entry["tags" if version == "2" else "tag"])
    assert len(iv) == 12 and tag == aead(keys.alg, unwrap(keys, entry)).encrypt(iv, b"", None)
    field = "tags" if version == "2" else "tag"
    edit_header(path, lambda h: edit_json_field(h, "__encryption__", lambda e: e["empty"].update(
        {field: flip_b64(e["empty"][field])})), sign_with=keys.seed)
    with EncryptedFile(path, keys.store) as ef, pytest.raises(IntegrityError, match="'empty'"):
        ef.verify_all()
    with pytest.raises(IntegrityError, match="'empty'"):
        decrypt_file(path, tmp_path / "plain", keys.store)
    assert_no_output(tmp_path, tmp_path / "plain")


def test_zero_size_tensors_are_spread_so_that_none_share_an_offset_when_possible(tmp_path, keys):
    tensors = {"a": np.ones(3, np.float32), "b": np.ones(2, np.int8),
               **{f"e{i}": np.zeros((0, i), np.float32) for i in range(3)}}
    header, _ = split_file(encrypt(tmp_path, tensors, keys))
    spans = [tuple(e["data_offsets"]) for n, e in header.items() if n.startswith("e")]
    assert len(set(spans)) == 3
    offsets = sorted(tuple(e["data_offsets"]) for n, e in header.items() if n != "__metadata__")
    assert all(prev[1] == cur[0] for prev, cur in zip(offsets, offsets[1:]))


def test_a_tensor_filter_encrypts_only_the_named_tensors_and_copies_the_rest(tmp_path, keys, tensors):
    path = encrypt(tmp_path, tensors, keys, tensors=["weight", "nonexistent"], chunk_size=32)
    assert list(entries(path)) == ["weight"]
    header, data = split_file(path)
    for name in ("bias", "ids", "raw"):
        start, end = header[name]["data_offsets"]
        assert data[start:end] == tensors[name].tobytes()
    assert_same_tensors(load_upstream(path, keys), tensors)


# -- refusals and atomicity --------------------------------------------------------------------------

def assert_no_output(directory: Path, dst: Path) -> None:
    assert not dst.exists()
    assert [p.name for p in directory.iterdir() if p.name.endswith(".ctfs-tmp")] == []


@pytest.mark.parametrize("options", [EncryptOptions(version="3"), EncryptOptions(chunk_size=0),
                                     EncryptOptions(tensors=["nothing-matches"]), EncryptOptions(tensors=[])],
                         ids=["version", "chunk-size", "filter-misses", "empty-filter"])
def test_bad_options_are_refused_without_output(tmp_path, keys, tensors, options):
    source = write_plain(tmp_path / "s.safetensors", tensors)
    with pytest.raises(CtfsError):
        encrypt_file(source, tmp_path / "o.ct", keys.enc, keys.sign, options)
    assert_no_output(tmp_path, tmp_path / "o.ct")


def test_an_encrypted_source_is_refused(tmp_path, keys, tensors):
    path = encrypt(tmp_path, tensors, keys)
    with pytest.raises(FormatError, match="already encrypted"):
        encrypt_file(path, tmp_path / "twice.ct", keys.enc, keys.sign)
    assert_no_output(tmp_path, tmp_path / "twice.ct")


def test_a_damaged_source_is_refused(tmp_path, keys, tensors):
    source = write_plain(tmp_path / "s.safetensors", tensors)
    with source.open("ab") as f:
        f.write(b"x")
    with pytest.raises(FormatError, match="trailing"):
        encrypt_file(source, tmp_path / "o.ct", keys.enc, keys.sign)
    assert_no_output(tmp_path, tmp_path / "o.ct")


def test_a_failure_midway_leaves_an_existing_destination_untouched(tmp_path, keys, tensors):
    source = write_plain(tmp_path / "s.safetensors", tensors)
    dst = tmp_path / "o.ct"
    dst.write_bytes(b"previous")

    def explode(_):
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        encrypt_file(source, dst, keys.enc, keys.sign, EncryptOptions(chunk_size=4), on_bytes=explode)
    assert dst.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".ctfs-tmp")] == []


def test_decrypting_a_plain_file_is_refused_as_a_downgrade(tmp_path, keys, tensors):
    source = write_plain(tmp_path / "s.safetensors", tensors)
    with pytest.raises(PlainFileError):
        decrypt_file(source, tmp_path / "plain", keys.store)
    assert_no_output(tmp_path, tmp_path / "plain")


def test_output_modes_follow_the_source_and_plaintext_is_private(tmp_path, keys, tensors):
    source = write_plain(tmp_path / "s.safetensors", tensors)
    source.chmod(0o640)
    encrypt_file(source, tmp_path / "o.ct", keys.enc, keys.sign)
    assert stat.S_IMODE(os.stat(tmp_path / "o.ct").st_mode) == 0o640
    decrypt_file(tmp_path / "o.ct", tmp_path / "plain", keys.store)
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o600


# -- streaming ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("version", "chunk_size"), [("1", 1), ("2", 7), ("2", 64)], ids=["v1", "v2-chunk7", "v2-chunk64"])
def test_tensors_larger_than_the_io_block_stream_correctly(tmp_path, alg_keys, monkeypatch, version, chunk_size):
    """Blocks of 100 bytes split ChaCha20 and GCM blocks mid-way, and chunks across blocks."""
    monkeypatch.setattr(ctfs.files.encrypt, "BLOCK_SIZE", 100)
    monkeypatch.setattr(ctfs.files.decrypt, "STREAM_BLOCK", 100)
    monkeypatch.setattr(ctfs.files.decrypt, "BATCH_BYTES", 100)
    rng = np.random.default_rng(3)
    tensors = {"big": rng.standard_normal(1003).astype(np.float32), "odd": rng.integers(0, 255, 257, dtype=np.uint8)}
    path = encrypt(tmp_path, tensors, alg_keys, version=version, chunk_size=chunk_size)
    assert_same_tensors(load_upstream(path, alg_keys), tensors)
    decrypt_file(path, tmp_path / "plain", alg_keys.store)
    assert_same_tensors(load_file(tmp_path / "plain"), tensors)


def test_decrypt_pipelines_batches_across_encrypted_and_plaintext_tensors(tmp_path, keys, monkeypatch):
    """A batch still being written when the next tensor starts must be neither lost nor overwritten,
    whether the next tensor decrypts into the other buffer or is copied as stored plaintext."""
    monkeypatch.setattr(ctfs.files.decrypt, "BATCH_BYTES", 30)
    write_all = ctfs.files.decrypt.write_all

    def slow_write(*args):  # as on a slow disk: the next batch finishes decrypting before this write starts
        time.sleep(0.005)
        write_all(*args)
    monkeypatch.setattr(ctfs.files.decrypt, "write_all", slow_write)
    rng = np.random.default_rng(5)
    tensors = {name: rng.integers(0, 255, size, dtype=np.uint8)
               for name, size in [("a", 301), ("b", 95), ("c", 64), ("d", 7), ("e", 250)]}
    path = encrypt(tmp_path, tensors, keys, tensors=["a", "c", "d", "e"], chunk_size=7)
    decrypt_file(path, tmp_path / "plain", keys.store)
    assert_same_tensors(load_file(tmp_path / "plain"), tensors)


def test_a_tensor_over_16_mib_round_trips_through_upstream(tmp_path):
    keys = make_keys("chacha20poly1305")
    tensors = {"big": np.random.default_rng(4).integers(0, 255, 17 * 2**20 + 3, dtype=np.uint8)}
    for version in ("1", "2"):
        path = encrypt(tmp_path, tensors, keys, version=version)
        assert_same_tensors(load_upstream(path, keys), tensors)
        decrypt_file(path, tmp_path / "plain", keys.store)
        assert_same_tensors(load_file(tmp_path / "plain"), tensors)


def test_progress_reports_every_data_byte_once(tmp_path, keys, tensors):
    total = sum(t.nbytes for t in tensors.values())
    seen: list[int] = []
    source = write_plain(tmp_path / "s.safetensors", tensors)
    encrypt_file(source, tmp_path / "o.ct", keys.enc, keys.sign, EncryptOptions(chunk_size=8), on_bytes=seen.append)
    assert sum(seen) == total
    seen.clear()
    decrypt_file(tmp_path / "o.ct", tmp_path / "plain", keys.store, on_bytes=seen.append)
    assert sum(seen) == total
