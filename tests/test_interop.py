"""Interoperability with the reference library, cryptotensors 0.2.3, in both directions (docs/format.md §§1-9)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cryptotensors
import numpy as np
import pytest
import torch
from conftest import (
    Keys,
    assert_same_tensors,
    b64,
    edit_header,
    edit_json_field,
    join_file,
    load_upstream,
    make_keys,
    read_plain,
    read_raw,
    split_file,
    write_plain,
    write_upstream,
    write_upstream_raw,
)
from safetensors.numpy import load_file

from ctfs.errors import UntrustedSigner
from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.encrypted import EncryptedFile
from ctfs.format.encryption import DEFAULT_CHUNK_SIZE

# (version, chunk_size): v1, and v2 with tiny, odd, page-sized and the default (2 MiB) chunks.
MODES = [("1", None), ("2", 1), ("2", 7), ("2", 4096), ("2", None)]
MODE_IDS = ["v1", "v2-chunk1", "v2-chunk7", "v2-chunk4096", "v2-default"]

UNICODE_NAMES = ["é", "名前", "🙂", "line\u2028sep", "tab\tnl\ncr\r", "ctl\x01\x1f\x7f", 'q"b\\s/']
UNICODE_METADATA = {"é": "名前", "emoji": "🙂", "sep": "a\u2028b", "ctl": "\x00\x08\x0c\x1b\x7f", 'q"': "\\/"}

# Upstream's raw dtype name -> (safetensors dtype, shape, byte length).
RAW_DTYPES = {
    "bfloat16": ("BF16", [3, 5], 30),
    "float8_e4m3fn": ("F8_E4M3", [7], 7),
    "float8_e5m2": ("F8_E5M2", [2, 3], 6),
    "float8_e8m0fnu": ("F8_E8M0", [5], 5),
    "float4_e2m1fn_x2": ("F4", [3, 2], 6),
    "complex64": ("C64", [3], 24),
    "float64": ("F64", [2], 16),
    "uint64": ("U64", [2], 16),
    "uint32": ("U32", [3], 12),
    "uint16": ("U16", [5], 10),
    "int16": ("I16", [4], 8),
    "int8": ("I8", [9], 9),
    "bool": ("BOOL", [4], 4),
}


def mode_config(version: str, chunk_size: int | None) -> dict[str, object]:
    return {"version": version, **({"chunk_size": chunk_size} if chunk_size else {})}


def ctfs_encrypt(tmp_path: Path, tensors, keys: Keys, metadata=None, /, **options) -> Path:
    plain = write_plain(tmp_path / "source.safetensors", tensors, metadata)
    dst = tmp_path / "ctfs.cryptotensors"
    encrypt_file(plain, dst, keys.enc, keys.sign, EncryptOptions(**options))
    return dst


def ctfs_decrypt(src: Path, keys: Keys) -> Path:
    dst = src.with_name(src.name + ".plain.safetensors")
    decrypt_file(src, dst, keys.store)
    return dst


def seeded_bytes(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


def zero_size_spans(path: Path) -> list[tuple[int, int]]:
    header, _ = split_file(path)
    return [tuple(e["data_offsets"]) for n, e in header.items() if n != "__metadata__" and e["data_offsets"][0] == e["data_offsets"][1]]


# -- upstream writes, ctfs reads ---------------------------------------------------------------------

@pytest.mark.parametrize(("version", "chunk_size"), MODES, ids=MODE_IDS)
def test_upstream_files_decrypt_to_the_original_tensors(tmp_path, alg_keys, tensors, version, chunk_size):
    src = write_upstream(tmp_path / "m.ct", tensors, alg_keys, {"origin": "upstream"}, **mode_config(version, chunk_size))
    plain = ctfs_decrypt(src, alg_keys)
    assert_same_tensors(load_file(plain), tensors)
    assert read_raw(plain)[0] == {"origin": "upstream"}
    with EncryptedFile(src, alg_keys.store) as ef:
        assert ef.crypto.enc.alg == alg_keys.alg
        assert ef.crypto.chunk_size == ((chunk_size or DEFAULT_CHUNK_SIZE) if version == "2" else None)
        ef.verify_all()
        assert read_plain(ef, 0, ef.view.size) == plain.read_bytes()


def test_upstream_partial_encryption_decrypts_and_leaves_unlisted_tensors_in_plaintext(tmp_path, keys, tensors):
    src = write_upstream(tmp_path / "m.ct", tensors, keys, tensors=["weight", "ids", "absent"], chunk_size=64)
    with EncryptedFile(src, keys.store) as ef:
        assert set(ef.crypto.ciphers) == {"weight", "ids"}
    assert tensors["raw"].tobytes() in src.read_bytes()
    assert tensors["weight"].tobytes() not in src.read_bytes()
    assert_same_tensors(load_file(ctfs_decrypt(src, keys)), tensors)


@pytest.mark.parametrize("version", ["1", "2"])
def test_upstream_files_with_tied_zero_size_tensors_decrypt(tmp_path, keys, version):
    tensors = {"a": np.arange(5, dtype=np.float32), "e1": np.zeros(0, np.float32),
               "e2": np.zeros((3, 0), np.float32), "e3": np.zeros((0,), np.float32)}
    src = write_upstream(tmp_path / "m.ct", tensors, keys, version=version)
    spans = zero_size_spans(src)
    assert len(set(spans)) < len(spans), "precondition: upstream wrote a tie"
    assert_same_tensors(load_file(ctfs_decrypt(src, keys)), tensors)


@pytest.mark.parametrize(("version", "chunk_size"), [("1", None), ("2", 3)], ids=["v1", "v2-chunk3"])
def test_upstream_raw_dtypes_decrypt_byte_for_byte(tmp_path, keys, version, chunk_size):
    raw = {f"t_{dt}": (dt, RAW_DTYPES[dt][1], seeded_bytes(RAW_DTYPES[dt][2], i)) for i, dt in enumerate(RAW_DTYPES)}
    raw["bf16_empty"] = ("bfloat16", [0, 3], b"")
    src = write_upstream_raw(tmp_path / "m.ct", raw, keys, {"k": "v"}, **mode_config(version, chunk_size))
    encrypted_header, _ = split_file(src)
    metadata, got = read_raw(ctfs_decrypt(src, keys))
    assert metadata == {"k": "v"}
    assert sorted(got) == sorted(raw)
    for name, (dtype, shape, data) in got.items():
        entry = encrypted_header[name]
        assert (dtype, shape, data) == (entry["dtype"], entry["shape"], raw[name][2])
    assert got["t_float4_e2m1fn_x2"][:2] == ("F4", [3, 4])
    assert got["t_bfloat16"][0] == "BF16"


@pytest.mark.parametrize("version", ["1", "2"])
def test_upstream_unicode_names_and_metadata_verify_and_decrypt(tmp_path, keys, version):
    tensors = {name: np.full(i + 1, i, np.int16) for i, name in enumerate(UNICODE_NAMES)}
    src = write_upstream(tmp_path / "m.ct", tensors, keys, UNICODE_METADATA, version=version, chunk_size=3)
    plain = ctfs_decrypt(src, keys)
    assert_same_tensors(load_file(plain), tensors)
    assert read_raw(plain)[0] == UNICODE_METADATA


def test_upstream_custom_policy_is_carried_verbatim(tmp_path, keys, tensors):
    policy = {"local": "package model\n\nallow if { 1 + 1 == 2 }", "remote": "package model\nallow = false"}
    src = write_upstream(tmp_path / "m.ct", tensors, keys, policy=policy)
    with EncryptedFile(src, keys.store) as ef:
        assert (ef.crypto.policy_local, ef.crypto.policy_remote) == (policy["local"], policy["remote"])
    assert_same_tensors(load_file(ctfs_decrypt(src, keys)), tensors)


def test_upstream_rewrapped_file_decrypts_with_the_new_keys_only(tmp_path, alg_keys, tensors):
    src = write_upstream(tmp_path / "m.ct", tensors, alg_keys, chunk_size=50)
    new = make_keys(alg_keys.alg, seed=1, enc_kid="enc2", sign_kid="sign2")
    cryptotensors.rewrap_file(str(src), new.config, alg_keys.config)
    assert_same_tensors(load_file(ctfs_decrypt(src, new)), tensors)
    with pytest.raises(UntrustedSigner):
        EncryptedFile(src, alg_keys.store)


def test_v1_header_with_chunk_size_decrypts_chunked(tmp_path, keys, tensors):
    src = write_upstream(tmp_path / "m.ct", tensors, keys, version="2", chunk_size=7)
    edit_header(src, lambda h: edit_json_field(h, "__crypto_keys__", lambda k: k.update(version="1")),
                sign_with=keys.seed)
    with EncryptedFile(src, keys.store) as ef:
        assert (ef.crypto.version, ef.crypto.chunk_size) == ("1", 7)
    assert_same_tensors(load_file(ctfs_decrypt(src, keys)), tensors)
    assert_same_tensors(load_upstream(src, keys), tensors)


def test_v2_header_without_chunk_size_means_2_mib_chunks(tmp_path, keys):
    tensors = {"big": np.arange(5 * 2**20 // 4, dtype=np.int32), "small": np.arange(3, dtype=np.uint8)}
    src = write_upstream(tmp_path / "m.ct", tensors, keys, version="2")
    edit_header(src, lambda h: edit_json_field(h, "__crypto_keys__", lambda k: k.pop("chunk_size")),
                sign_with=keys.seed)
    with EncryptedFile(src, keys.store) as ef:
        assert ef.crypto.chunk_size == DEFAULT_CHUNK_SIZE
        assert len(ef.crypto.ciphers["big"].tags) == 3
    assert_same_tensors(load_file(ctfs_decrypt(src, keys)), tensors)


def test_surplus_tags_are_tolerated(tmp_path, keys, tensors):
    def add_tags(entries):
        for entry in entries.values():
            entry["tags"] = b64(base64.b64decode(entry["tags"]) + bytes(16))  # one more 16-byte tag
    src = write_upstream(tmp_path / "m.ct", tensors, keys, chunk_size=16)
    edit_header(src, lambda h: edit_json_field(h, "__encryption__", add_tags), sign_with=keys.seed)
    assert_same_tensors(load_file(ctfs_decrypt(src, keys)), tensors)
    assert_same_tensors(load_upstream(src, keys), tensors)


# -- ctfs writes, upstream reads ---------------------------------------------------------------------

@pytest.mark.parametrize(("version", "chunk_size"), MODES, ids=MODE_IDS)
def test_ctfs_files_load_in_upstream_to_the_original_tensors(tmp_path, alg_keys, tensors, version, chunk_size):
    src = ctfs_encrypt(tmp_path, tensors, alg_keys, {"origin": "ctfs"},
                       version=version, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE)
    assert_same_tensors(load_upstream(src, alg_keys), tensors)
    with cryptotensors.safe_open(str(src), framework="np", config=alg_keys.config) as f:
        assert f.metadata() == {"origin": "ctfs"}


def test_ctfs_partial_encryption_loads_in_upstream(tmp_path, keys, tensors):
    src = ctfs_encrypt(tmp_path, tensors, keys, tensors=("weight", "mask", "absent"), chunk_size=10)
    assert set(json.loads(split_file(src)[0]["__metadata__"]["__encryption__"])) == {"weight", "mask"}
    assert_same_tensors(load_upstream(src, keys), tensors)


@pytest.mark.parametrize(("version", "chunk_size"), [("1", DEFAULT_CHUNK_SIZE), ("2", 5)], ids=["v1", "v2-chunk5"])
def test_ctfs_raw_dtypes_load_in_upstream_byte_for_byte(tmp_path, keys, version, chunk_size):
    header, data, offset = {}, b"", 0
    for i, (dtype, shape, length) in enumerate(RAW_DTYPES.values()):
        if dtype == "F4":
            shape = [3, 4]  # 12 four-bit values in 6 bytes
        header[f"t_{dtype}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}
        data += seeded_bytes(length, i)
        offset += length
    header["bf16_empty"] = {"dtype": "BF16", "shape": [0, 3], "data_offsets": [offset, offset]}
    plain = join_file(tmp_path / "source.safetensors", header, data)
    src = tmp_path / "m.ct"
    encrypt_file(plain, src, keys.enc, keys.sign, EncryptOptions(version=version, chunk_size=chunk_size))
    _, expected = read_raw(plain)
    with cryptotensors.safe_open(str(src), framework="pt", config=keys.config) as f:
        assert sorted(f.keys()) == sorted(expected)
        for name, (dtype, shape, raw) in expected.items():
            view = f.get_slice(name)
            assert (view.get_dtype(), view.get_shape()) == (dtype, shape)
            if raw:
                tensor = f.get_tensor(name).contiguous().view(-1).view(torch.uint8)
                assert tensor.numpy().tobytes() == raw, name


@pytest.mark.parametrize("version", ["1", "2"])
def test_ctfs_unicode_names_and_metadata_verify_in_upstream(tmp_path, keys, version):
    tensors = {name: np.full(i + 2, -i, np.int32) for i, name in enumerate(UNICODE_NAMES)}
    src = ctfs_encrypt(tmp_path, tensors, keys, {**UNICODE_METADATA, "__other__": "kept"}, version=version, chunk_size=5)
    assert_same_tensors(load_upstream(src, keys), tensors)
    with cryptotensors.safe_open(str(src), framework="np", config=keys.config) as f:
        assert f.metadata() == UNICODE_METADATA  # upstream hides every `__` key, ours included
    assert split_file(src)[0]["__metadata__"]["__other__"] == "kept"


def test_ctfs_allow_policy_loads_in_upstream(tmp_path, keys, tensors):
    src = ctfs_encrypt(tmp_path, tensors, keys, policy="package model\n\nallow if { 1 + 1 == 2 }")
    assert_same_tensors(load_upstream(src, keys), tensors)


def test_ctfs_deny_policy_is_enforced_by_upstream(tmp_path, keys, tensors):
    src = ctfs_encrypt(tmp_path, tensors, keys, policy="package model\nallow = false")
    with pytest.raises(cryptotensors.SafetensorError, match="Policy evaluation denied"):
        load_upstream(src, keys)


def test_ctfs_writer_avoids_zero_size_ties_so_upstream_verifies_every_time(tmp_path, keys):
    tensors = {"a": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.uint8), "c": np.ones(2, np.int64),
               "e1": np.zeros(0, np.float32), "e2": np.zeros((0, 2), np.float32), "e3": np.zeros(0, np.float32)}
    plain = write_plain(tmp_path / "source.safetensors", tensors)
    spans = zero_size_spans(plain)
    assert len(set(spans)) < len(spans), "precondition: the source has ties"
    src = tmp_path / "m.ct"
    encrypt_file(plain, src, keys.enc, keys.sign, EncryptOptions(chunk_size=2))
    spans = zero_size_spans(src)
    assert len(set(spans)) == len(spans) == 3
    for _ in range(20):  # with three tied empties upstream would pass only ~1 open in 6
        assert_same_tensors(load_upstream(src, keys), tensors)


def test_ctfs_rewrapped_by_upstream_still_decrypts(tmp_path, keys, tensors):
    src = ctfs_encrypt(tmp_path, tensors, keys, chunk_size=9)
    new = make_keys(seed=7, enc_kid="enc7", sign_kid="sign7")
    cryptotensors.rewrap_file(str(src), new.config, keys.config)
    assert_same_tensors(load_file(ctfs_decrypt(src, new)), tensors)
