"""The rules of docs/format.md, checked against files the reference library (cryptotensors 0.2.3) writes
and against what it accepts or refuses to read.

Nothing here goes through ctfs: the header is split with the helpers of conftest.py and the cryptography
is redone with `cryptography` directly, so each assertion is about the reference library's bytes.
Section numbers are those of docs/format.md.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import cryptotensors
import numpy as np
import pytest
from conftest import (
    KEY_LENGTHS,
    Keys,
    b64,
    canonical_signing_bytes,
    edit_header,
    edit_json_field,
    join_file,
    load_upstream,
    make_keys,
    split_file,
    write_plain,
    write_upstream,
)
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

RESERVED = {"__crypto_keys__", "__encryption__", "__policy__", "__signature__"}
DEFAULT_POLICY = "package model\nallow = true"
# Writer order of dtypes (§1.1): descending, so U64 comes first.
DTYPE_RANK = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
              "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64", "uint8": "U8"}
MODES = {"v1": {"version": "1"}, "v2-chunk5": {"version": "2", "chunk_size": 5}, "v2-default": {"version": "2"}}


def spec_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {
        "w": rng.standard_normal((4, 3)).astype(np.float32),  # 48 bytes: 10 chunks of 5
        "b": rng.standard_normal(5).astype(np.float16),
        "ids": rng.integers(0, 2**40, size=3, dtype=np.int64),
        "one": np.array([7], np.uint8),
        "empty": np.zeros((0, 2), np.float32),
    }


# -- an implementation of §§1-5 from scratch ------------------------------------------------------------

def raw_parts(path: Path) -> tuple[int, bytes, bytes]:
    """(N, header bytes, data region) exactly as stored."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8:8 + n], blob[8 + n:]


def crypto_of(header: dict) -> tuple[dict, dict, dict]:
    """The JSON documents inside `__crypto_keys__`, `__encryption__` and `__policy__`."""
    meta = header["__metadata__"]
    return tuple(json.loads(meta[key]) for key in ("__crypto_keys__", "__encryption__", "__policy__"))


def aead(alg: str, key: bytes):
    return ChaCha20Poly1305(key) if alg == "chacha20poly1305" else AESGCM(key)


def unwrap(keys: Keys, entry: dict) -> bytes:
    """§4: the DEK is one AEAD message under the master key, tag stored apart, no associated data."""
    sealed = base64.b64decode(entry["wrapped_key"]) + base64.b64decode(entry["key_tag"])
    return aead(keys.alg, keys.master).decrypt(base64.b64decode(entry["key_iv"]), sealed, None)


def nonce(base_iv: bytes, index: int, *, wrap: bool = False) -> bytes:
    """§5.2: the first 8 bytes kept, the last 4 a big-endian counter, added to. `wrap` makes the nonces
    a writer that wraps the counter around would use, which the format forbids."""
    counter = int.from_bytes(base_iv[8:], "big") + index
    return base_iv[:8] + (counter % 2**32 if wrap else counter).to_bytes(4, "big")


def tensor_bytes(header: dict, data: bytes, name: str) -> bytes:
    start, end = header[name]["data_offsets"]
    return data[start:end]


# -- §1 container -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_container_is_length_prefix_padded_compact_json_and_same_size_data(tmp_path, keys, mode):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, keys, {"u": "v"}, **MODES[mode])
    n, raw, data = raw_parts(path)
    assert n == len(raw) and n % 8 == 0
    text = raw.rstrip(b" ")
    assert 0 <= n - len(text) <= 7 and raw[len(text):] == b" " * (n - len(text))
    header = json.loads(text)
    assert text == json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert list(header)[0] == "__metadata__"
    # Tags live in the header: the data region is exactly the plaintext's size, tensor by tensor.
    assert len(data) == sum(t.nbytes for t in tensors.values())
    for name, array in tensors.items():
        e = header[name]
        assert (e["dtype"], e["shape"]) == (SAFETENSORS_DTYPES[array.dtype.name], list(array.shape))
        ct = tensor_bytes(header, data, name)
        assert len(ct) == array.nbytes
        if array.nbytes:
            assert ct != array.tobytes()


def test_writer_orders_tensors_by_dtype_descending_then_name(tmp_path, keys):
    tensors = {"b_u8": np.ones(3, np.uint8), "a_u8": np.ones(2, np.uint8), "f32": np.ones(1, np.float32),
               "i64": np.ones(1, np.int64), "f16": np.ones(3, np.float16), "bool": np.ones(2, np.bool_)}
    header, _ = split_file(write_upstream(tmp_path / "m.ct", tensors, keys))
    names = [n for n in header if n != "__metadata__"]
    assert names == ["i64", "f32", "f16", "a_u8", "b_u8", "bool"]
    assert names == sorted(names, key=lambda n: (-DTYPE_RANK.index(header[n]["dtype"]), n.encode()))
    assert [header[n]["data_offsets"][0] for n in names] == [0, 8, 12, 18, 20, 23]
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_reader_accepts_an_unpadded_header_and_refuses_a_byte_more_or_less(tmp_path, keys):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, keys)
    n, raw, data = raw_parts(path)
    text = raw.rstrip(b" ") + b" " * 3  # still JSON, but N % 8 != 0 whatever the header's length
    if len(text) % 8 == 0:
        text += b" "
    unpadded = tmp_path / "unpadded.ct"
    unpadded.write_bytes(struct.pack("<Q", len(text)) + text + data)
    np.testing.assert_array_equal(load_upstream(unpadded, keys)["w"], tensors["w"])
    for name, blob in (("long.ct", path.read_bytes() + b"\0"), ("short.ct", path.read_bytes()[:-1])):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(cryptotensors.SafetensorError):
            load_upstream(tmp_path / name, keys)


# -- §1.2, §2 header metadata -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_crypto_keys_hold_descriptors_mode_and_no_key_material(tmp_path, keys, mode):
    metadata = {"u": "v", "__other__": "kept", "__policy__": "dropped", "__signature__": "dropped"}
    config = {"chunk_size": 5, **MODES[mode]} if mode == "v1" else MODES[mode]  # v1: chunk_size ignored
    path = write_upstream(tmp_path / "m.ct", spec_tensors(), keys, metadata, **config)
    n, raw, _ = raw_parts(path)
    header = json.loads(raw)
    meta = header["__metadata__"]
    assert set(meta) == RESERVED | {"u", "__other__"}
    assert all(isinstance(v, str) for v in meta.values())
    assert (meta["u"], meta["__other__"]) == ("v", "kept")
    crypto_keys, _, policy = crypto_of(header)
    expected = {"enc": {"alg": "aes256gcm", "kid": "enc1", "kty": "oct"},
                "sign": {"alg": "ed25519", "kid": "sign1", "kty": "okp"},
                "version": MODES[mode]["version"]}
    if mode != "v1":  # a v1 file never carries chunk_size, even when the writer was given one
        expected["chunk_size"] = MODES[mode].get("chunk_size", 2 * 1024 * 1024)
    assert crypto_keys == expected
    assert meta["__crypto_keys__"] == json.dumps(expected, separators=(",", ":"), sort_keys=True)
    assert policy == {"local": DEFAULT_POLICY, "remote": DEFAULT_POLICY}
    for secret in (keys.master, keys.seed, keys.public):
        assert secret not in raw and b64(secret).encode() not in raw
        assert b64(secret).rstrip("=").encode() not in raw


def test_alg_names_are_stored_as_the_key_spelled_them(tmp_path, keys):
    config = {"enc_key": {**keys.enc_jwk, "alg": "AES-256-GCM"}, "sign_key": {**keys.sign_jwk, "alg": "ED25519"}}
    path = tmp_path / "m.ct"
    cryptotensors.serialize_file({"t": {"dtype": "uint8", "shape": [2], "data": b"ab"}}, str(path), None, config)
    crypto_keys, _, _ = crypto_of(split_file(path)[0])
    assert (crypto_keys["enc"]["alg"], crypto_keys["sign"]["alg"]) == ("AES-256-GCM", "ED25519")


# -- §3, §4 encryption entries and key wrapping -------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_entries_have_the_mode_fields_in_order_with_their_sizes(tmp_path, alg_keys, mode):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, alg_keys, **MODES[mode])
    header, _ = split_file(path)
    _, entries, _ = crypto_of(header)
    assert list(entries) == sorted(tensors)
    chunk = MODES[mode].get("chunk_size", 2 * 1024 * 1024)
    for name, entry in entries.items():
        sizes = {field: len(base64.b64decode(value, validate=True)) for field, value in entry.items()}
        length = tensors[name].nbytes
        head = {"wrapped_key": KEY_LENGTHS[alg_keys.alg], "key_iv": 12, "key_tag": 16}
        if mode == "v1":
            tail = {"iv": 12, "tag": 16} if length else {"iv": 0, "tag": 0}
        else:
            tail = {"base_iv": 12, "tags": 16 * max(1, math.ceil(length / chunk))}
        assert list(sizes.items()) == list({**head, **tail}.items()), name


def test_every_tensor_gets_its_own_dek_wrapped_by_the_master_key_without_aad(tmp_path, alg_keys):
    path = write_upstream(tmp_path / "m.ct", spec_tensors(), alg_keys, chunk_size=5)
    _, entries, _ = crypto_of(split_file(path)[0])
    deks = [unwrap(alg_keys, entry) for entry in entries.values()]
    assert all(len(dek) == KEY_LENGTHS[alg_keys.alg] for dek in deks)
    assert len(set(deks)) == len(deks)
    assert alg_keys.master not in deks
    entry = entries["w"]
    sealed = base64.b64decode(entry["wrapped_key"]) + base64.b64decode(entry["key_tag"])
    with pytest.raises(InvalidTag):  # the tensor name is not associated data
        aead(alg_keys.alg, alg_keys.master).decrypt(base64.b64decode(entry["key_iv"]), sealed, b"w")


# -- §5 data encryption -------------------------------------------------------------------------------

def test_v1_tensor_is_one_aead_message_and_an_empty_one_has_no_iv_or_tag(tmp_path, alg_keys):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, alg_keys, version="1")
    header, data = split_file(path)
    _, entries, _ = crypto_of(header)
    for name, array in tensors.items():
        entry = entries[name]
        if not array.nbytes:
            assert (entry["iv"], entry["tag"]) == ("", "")
            continue
        sealed = tensor_bytes(header, data, name) + base64.b64decode(entry["tag"])
        plain = aead(alg_keys.alg, unwrap(alg_keys, entry)).decrypt(base64.b64decode(entry["iv"]), sealed, None)
        assert plain == array.tobytes()


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 4096])
def test_v2_chunks_are_tensor_relative_with_counter_nonces_and_tags_in_order(tmp_path, alg_keys, chunk_size):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, alg_keys, chunk_size=chunk_size)
    header, data = split_file(path)
    _, entries, _ = crypto_of(header)
    for name, array in tensors.items():
        entry = entries[name]
        cipher = aead(alg_keys.alg, unwrap(alg_keys, entry))
        base_iv, tags = base64.b64decode(entry["base_iv"]), base64.b64decode(entry["tags"])
        ct = tensor_bytes(header, data, name)
        if not array.nbytes:  # no chunk, yet one tag: that of the empty message under base_iv itself
            assert cipher.decrypt(base_iv, tags, None) == b""
            continue
        plain = b"".join(
            cipher.decrypt(nonce(base_iv, i), ct[i * chunk_size:(i + 1) * chunk_size] + tags[16 * i:16 * (i + 1)], None)
            for i in range(len(tags) // 16)
        )
        assert plain == array.tobytes()


def reseal_with_counter(path: Path, keys: Keys, name: str, counter: int) -> None:
    """Re-encrypt one v2 tensor of `path` under a base_iv whose counter starts at `counter` (wrapping
    around past 2**32, as a careless writer would), and re-sign."""
    header, data = split_file(path)
    _, entries, _ = crypto_of(header)
    entry, (start, end) = entries[name], header[name]["data_offsets"]
    chunk = json.loads(header["__metadata__"]["__crypto_keys__"])["chunk_size"]
    cipher = aead(keys.alg, unwrap(keys, entry))
    base_iv = base64.b64decode(entry["base_iv"])
    plain = b"".join(cipher.decrypt(nonce(base_iv, i), data[start + i * chunk:min(start + (i + 1) * chunk, end)]
                                    + base64.b64decode(entry["tags"])[16 * i:16 * (i + 1)], None)
                     for i in range(math.ceil((end - start) / chunk)))
    base_iv = base_iv[:8] + counter.to_bytes(4, "big")
    sealed = [cipher.encrypt(nonce(base_iv, i, wrap=True), plain[i * chunk:(i + 1) * chunk], None)
              for i in range(math.ceil(len(plain) / chunk))]
    data = data[:start] + b"".join(s[:-16] for s in sealed) + data[end:]
    tags = b"".join(s[-16:] for s in sealed)
    edit_json_field(header, "__encryption__", lambda e: e[name].update(base_iv=b64(base_iv), tags=b64(tags)))
    join_file(path, header, data)
    edit_header(path, lambda h: None, sign_with=keys.seed)


def test_chunk_counter_may_reach_but_never_pass_2_to_the_32(tmp_path, keys):
    tensors = {"t": np.arange(8, dtype=np.uint8)}  # two chunks of 4
    for counter, loads in ((0, True), (0xFFFFFFFE, True), (0xFFFFFFFF, False)):
        path = write_upstream(tmp_path / f"{counter}.ct", tensors, keys, chunk_size=4)
        reseal_with_counter(path, keys, "t", counter)
        if loads:
            np.testing.assert_array_equal(load_upstream(path, keys)["t"], tensors["t"])
        else:
            with pytest.raises(cryptotensors.SafetensorError, match="overflow"):
                load_upstream(path, keys)


def test_partial_encryption_lists_only_filtered_tensors_and_an_empty_filter_writes_a_plain_file(tmp_path, keys):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, keys, tensors=["w", "absent"])
    header, data = split_file(path)
    assert set(crypto_of(header)[1]) == {"w"}
    for name in ("b", "ids", "one"):
        assert tensor_bytes(header, data, name) == tensors[name].tobytes()
    plain = write_upstream(tmp_path / "none.ct", tensors, keys, {"u": "v"}, tensors=[])
    assert split_file(plain)[0]["__metadata__"] == {"u": "v"}


def test_unknown_entry_fields_and_surplus_tags_are_ignored(tmp_path, keys):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, keys, chunk_size=16)

    def extend(entries):
        for entry in entries.values():
            entry["future"] = "x"
            entry["tags"] = b64(base64.b64decode(entry["tags"]) + bytes(16))
    edit_header(path, lambda h: edit_json_field(h, "__encryption__", extend), sign_with=keys.seed)
    np.testing.assert_array_equal(load_upstream(path, keys)["w"], tensors["w"])


def test_a_partial_surplus_tag_is_ignored_too(tmp_path, keys):
    """Upstream only reads the tags it needs; ctfs is stricter here and refuses (docs/format.md §5.2)."""
    tensors = {"t": np.arange(20, dtype=np.uint8)}
    path = write_upstream(tmp_path / "m.ct", tensors, keys, chunk_size=10)
    edit_header(path, lambda h: edit_json_field(h, "__encryption__", lambda e: e["t"].update(
        tags=b64(base64.b64decode(e["t"]["tags"]) + b"12345"))), sign_with=keys.seed)
    assert len(base64.b64decode(crypto_of(split_file(path)[0])[1]["t"]["tags"])) == 37
    np.testing.assert_array_equal(load_upstream(path, keys)["t"], tensors["t"])


@pytest.mark.parametrize("side", ["local", "remote"])
def test_policy_must_name_both_sides(tmp_path, keys, side):
    tensors = {"t": np.arange(20, dtype=np.uint8)}
    path = write_upstream(tmp_path / "m.ct", tensors, keys)
    edit_header(path, lambda h: edit_json_field(h, "__policy__", lambda p: p.pop(side)), sign_with=keys.seed)
    with pytest.raises(cryptotensors.SafetensorError, match=f"missing field `{side}`"):
        load_upstream(path, keys)


def test_policy_is_required_in_an_encrypted_file(tmp_path, keys):
    path = write_upstream(tmp_path / "m.ct", {"t": np.arange(3, dtype=np.uint8)}, keys)
    edit_header(path, lambda h: h["__metadata__"].pop("__policy__"), sign_with=keys.seed)
    with pytest.raises(cryptotensors.SafetensorError, match="Missing __policy__"):
        load_upstream(path, keys)


@pytest.mark.parametrize(("version", "error"), [("3", "UnsupportedVersion"), (2, "MissingVersion")])
def test_version_is_the_string_1_or_2(tmp_path, keys, version, error):
    path = write_upstream(tmp_path / "m.ct", {"t": np.arange(3, dtype=np.uint8)}, keys)
    edit_header(path, lambda h: edit_json_field(h, "__crypto_keys__", lambda k: k.update(version=version)),
                sign_with=keys.seed)
    with pytest.raises(cryptotensors.SafetensorError, match=error):
        load_upstream(path, keys)


# -- §6 base64 ----------------------------------------------------------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@pytest.mark.parametrize("spelling", ["padded", "unpadded", "urlsafe", "trailing-bits"])
def test_header_base64_is_standard_and_padded(tmp_path, keys, spelling):
    tensors = {"t": np.arange(64, dtype=np.uint8)}  # 64 tags: 1368 characters, '+' or '/' all but certain
    path = write_upstream(tmp_path / "m.ct", tensors, keys, chunk_size=1)
    respell = {"padded": lambda v: v, "unpadded": lambda v: v.rstrip("="),
               "urlsafe": lambda v: v.replace("+", "-").replace("/", "_"),
               "trailing-bits": lambda v: v[:-3] + B64[B64.index(v[-3]) ^ 1] + "=="}[spelling]
    original = crypto_of(split_file(path)[0])[1]["t"]["tags"]
    assert original.endswith("==")  # 1024 bytes
    edit_header(path, lambda h: edit_json_field(h, "__encryption__", lambda e: e["t"].update(tags=respell(original))),
                sign_with=keys.seed)
    if spelling == "padded":  # the control: re-signing alone changes nothing
        np.testing.assert_array_equal(load_upstream(path, keys)["t"], tensors["t"])
        return
    # Each respelling still decodes to the same bytes in a lenient decoder: only strictness can refuse it.
    assert respell(original) != original
    assert base64.b64decode(respell(original) + "==", altchars=b"-_") == base64.b64decode(original)
    with pytest.raises(cryptotensors.SafetensorError):
        load_upstream(path, keys)


# -- §7 signature -------------------------------------------------------------------------------------

NAMES = ["é", "名前", "🙂", "line\u2028sep", "tab\tnl\ncr\r", "ctl\x01\x1f\x7f", 'q"b\\s/']
METADATA = {"é": "名前", "sep": "a\u2028b", "ctl": "\x00\x08\x0c\x1b\x7f", 'q"': "\\/"}


@pytest.mark.parametrize("version", ["1", "2"])
def test_signature_is_ed25519_over_the_canonical_reserialisation(tmp_path, keys, version):
    tensors = {name: np.full(i + 1, i, np.int16) for i, name in enumerate(NAMES)}
    tensors["z_empty"] = np.zeros(0, np.float32)
    path = write_upstream(tmp_path / "m.ct", tensors, keys, {**METADATA, "__other__": "x"}, version=version)
    _, raw, _ = raw_parts(path)
    header = json.loads(raw)
    signature = base64.b64decode(header["__metadata__"]["__signature__"], validate=True)
    message = canonical_signing_bytes(header)
    assert message.startswith(b'{"__metadata__":{"__crypto_keys__":')
    assert b"__signature__" not in message and "名前".encode() in message and b"\\u001f" in message
    Ed25519PublicKey.from_public_bytes(keys.public).verify(signature, message)
    assert Ed25519PrivateKey.from_private_bytes(keys.seed).sign(message) == signature  # deterministic
    # What is stored is that same form with the signature in its sorted place, then padding.
    assert raw.rstrip(b" ") == json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()


def test_signature_survives_any_reformatting_of_the_header(tmp_path, keys):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, keys, {"名": "値"})
    header, data = split_file(path)
    reordered = {name: header[name] for name in reversed(list(header))}
    reordered["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(reordered, indent=3, ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "re.ct").write_bytes(struct.pack("<Q", len(text)) + text + data)
    assert text != raw_parts(path)[1]
    loaded = load_upstream(tmp_path / "re.ct", keys)
    np.testing.assert_array_equal(loaded["w"], tensors["w"])


@pytest.mark.parametrize("edit", ["metadata", "dtype", "offsets", "policy", "kid"])
def test_signature_covers_every_header_field(tmp_path, keys, edit):
    tensors = {"a": np.arange(4, dtype=np.uint8), "b": np.arange(4, dtype=np.uint8)}
    path = write_upstream(tmp_path / "m.ct", tensors, keys, {"u": "v"})
    edits = {
        "metadata": lambda h: h["__metadata__"].update(u="w"),
        "dtype": lambda h: h["a"].update(dtype="I8"),
        "offsets": lambda h: (h["a"].update(data_offsets=h["b"]["data_offsets"]),
                              h["b"].update(data_offsets=[0, 4])),
        "policy": lambda h: h["__metadata__"].update(__policy__=json.dumps({"local": DEFAULT_POLICY})),
        "kid": lambda h: edit_json_field(h, "__crypto_keys__", lambda k: k["enc"].update(kid="enc9")),
    }
    edit_header(path, edits[edit])
    with pytest.raises(cryptotensors.SafetensorError, match="Signature verification failed"):
        load_upstream(path, keys)


# -- §13 weaknesses, as the reference library shows them ----------------------------------------------

def test_w8_what_the_canonical_form_drops_is_not_signed(tmp_path, keys):
    """An extra field in a tensor entry is left out of the signing bytes, so adding one needs no key."""
    tensors = {"t": np.arange(3, dtype=np.uint8)}
    path = write_upstream(tmp_path / "m.ct", tensors, keys)
    before = canonical_signing_bytes(split_file(path)[0])
    edit_header(path, lambda h: h["t"].update(note="added later"))  # not re-signed
    assert canonical_signing_bytes(split_file(path)[0]) == before
    np.testing.assert_array_equal(load_upstream(path, keys)["t"], tensors["t"])


def test_w2_plaintext_tensor_bytes_are_not_authenticated(tmp_path, keys):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, keys, tensors=["w"])
    header, data = split_file(path)
    start = header["ids"]["data_offsets"][0]
    join_file(path, header, data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1:])
    loaded = load_upstream(path, keys)
    assert loaded["ids"].tobytes()[0] == tensors["ids"].tobytes()[0] ^ 0xFF
    np.testing.assert_array_equal(loaded["w"], tensors["w"])


def test_w4_a_plain_file_is_accepted_where_an_encrypted_one_was_expected(tmp_path, keys):
    tensors = spec_tensors()
    swapped = {**tensors, "w": -tensors["w"]}
    plain = write_plain(tmp_path / "m.ct", swapped)
    np.testing.assert_array_equal(load_upstream(plain, keys)["w"], -tensors["w"])


def test_w16_w17_a_file_validly_signed_for_another_place_or_time_is_accepted(tmp_path, keys):
    old = write_upstream(tmp_path / "old.ct", {"w": np.zeros(3, np.float32)}, keys)
    new = write_upstream(tmp_path / "model-00002.ct", {"w": np.ones(3, np.float32)}, keys)
    new.write_bytes(old.read_bytes())
    np.testing.assert_array_equal(load_upstream(new, keys)["w"], np.zeros(3, np.float32))


def run_isolated(script: str, tmp_path: Path) -> str:
    """Run code that registers key providers (process-global in the reference library) in a child."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_w3_header_kid_and_jku_choose_the_verify_key(tmp_path, keys):
    """Trusting only `sign1`, the reference library still loads a file signed by a key the file names."""
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, keys, tensors=["w"])
    header, data = split_file(path)
    start = header["one"]["data_offsets"][0]
    join_file(path, header, data[:start] + b"\x63" + data[start + 1:])
    mallory = make_keys(seed=66, sign_kid="mallory")
    (tmp_path / "mallory.jwk").write_text(json.dumps({"keys": [mallory.sign_jwk]}))
    edit_header(path, lambda h: edit_json_field(h, "__crypto_keys__", lambda k: k["sign"].update(
        kid="mallory", jku=f"file://{tmp_path / 'mallory.jwk'}")), sign_with=mallory.seed)
    out = run_isolated(f"""
        import cryptotensors
        cryptotensors.register_direct_key_provider(keys=[{keys.enc_jwk!r}, {keys.sign_jwk!r}])
        with cryptotensors.safe_open({str(path)!r}, framework="np") as f:
            print(int(f.get_tensor("one")[0]))
    """, tmp_path)
    assert out.split() == ["99"]


def test_w6_deserialize_returns_ciphertext_when_a_tag_fails(tmp_path, keys):
    tensors = spec_tensors()
    path = write_upstream(tmp_path / "m.ct", tensors, keys, chunk_size=8)
    header, data = split_file(path)
    start, end = header["w"]["data_offsets"]
    stored = bytes([data[start] ^ 1]) + data[start + 1:end]
    join_file(path, header, data[:start] + stored + data[end:])
    out = run_isolated(f"""
        import cryptotensors
        cryptotensors.register_direct_key_provider(keys=[{keys.enc_jwk!r}, {keys.sign_jwk!r}])
        got = dict(cryptotensors.deserialize(open({str(path)!r}, "rb").read()))
        print(bytes(got["w"]["data"]).hex(), bytes(got["one"]["data"]).hex())
    """, tmp_path)
    assert out.split() == [stored.hex(), tensors["one"].tobytes().hex()]


def test_w17_rewrap_keeps_every_dek_and_data_byte(tmp_path, keys):
    """Rotation re-wraps the same DEKs, so the old master key still opens the rewrapped data."""
    path = write_upstream(tmp_path / "m.ct", spec_tensors(), keys, chunk_size=5)
    old_header, old_data = split_file(path)
    new = make_keys(seed=5, enc_kid="enc5", sign_kid="sign5")
    cryptotensors.rewrap_file(str(path), new.config, keys.config)
    new_header, new_data = split_file(path)
    old_entries, new_entries = crypto_of(old_header)[1], crypto_of(new_header)[1]
    assert new_data == old_data
    for name, entry in new_entries.items():
        assert entry["key_iv"] != old_entries[name]["key_iv"]
        assert (entry["base_iv"], entry["tags"]) == (old_entries[name]["base_iv"], old_entries[name]["tags"])
        assert unwrap(new, entry) == unwrap(keys, old_entries[name])
