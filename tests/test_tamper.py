"""Tampered, damaged and wrongly keyed files fail closed with a typed error and never yield wrong plaintext."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    Keys,
    b64,
    edit_header,
    edit_json_field,
    flip_b64,
    flip_file_bit,
    make_keys,
    read_plain,
    split_file,
    write_plain,
    write_upstream,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from ctfs.errors import (
    CtfsError,
    FormatError,
    IntegrityError,
    PlainFileError,
    UntrustedSigner,
)
from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.encrypted import EncryptedFile
from ctfs.keys.store import KeyStore

CHUNK = 64
KINDS = ["cryptotensors-v2", "cryptotensors-v1", "ctfs-v2", "ctfs-v1"]


def victim_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {
        "weight": rng.standard_normal((13, 11)).astype(np.float32),  # 572 bytes: 9 chunks of 64
        "weight_t": rng.standard_normal((11, 13)).astype(np.float32),  # the same size, to swap with
        "bias": rng.standard_normal(17).astype(np.float16),
        "plain": rng.integers(0, 256, 31, dtype=np.uint8),
        "empty": np.zeros((0, 4), np.float32),
    }


def write_victim(path: Path, kind: str, keys: Keys, encrypt: list[str] | None = None) -> Path:
    writer, version = kind.split("-v")
    tensors = victim_tensors()
    if writer == "cryptotensors":
        extra = {"tensors": encrypt} if encrypt else {}
        return write_upstream(path, tensors, keys, {"note": "original"}, version=version, chunk_size=CHUNK, **extra)
    plain = write_plain(path.with_suffix(".source"), tensors, {"note": "original"})
    encrypt_file(plain, path, keys.enc, keys.sign, EncryptOptions(version=version, chunk_size=CHUNK, tensors=encrypt))
    return path


@pytest.fixture(params=KINDS)
def victim(request, tmp_path, keys) -> Path:
    """A small encrypted file, written by each library in each format version."""
    return write_victim(tmp_path / "victim.ct", request.param, keys)


def leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".ctfs-tmp")]


def assert_fails_closed(path: Path, store: KeyStore, error: type[CtfsError], match: str | None = None) -> None:
    """Reading, verifying and exporting all raise `error`; no plaintext file is left behind."""
    with pytest.raises(error, match=match):
        with EncryptedFile(path, store) as ef:
            read_plain(ef, 0, ef.view.size)
    with pytest.raises(error, match=match):
        with EncryptedFile(path, store) as ef:
            ef.verify_all()
    dst = path.with_name("exported.safetensors")
    with pytest.raises(error, match=match):
        decrypt_file(path, dst, store)
    assert not dst.exists()
    assert leftovers(path.parent) == []


def data_offset(path: Path, tensor: str) -> int:
    """The absolute file offset where `tensor`'s bytes start."""
    header, data = split_file(path)
    return path.stat().st_size - len(data) + header[tensor]["data_offsets"][0]


def field_names(path: Path) -> dict[str, str]:
    """The version-specific names of the data nonce and tag fields."""
    entry = json.loads(split_file(path)[0]["__metadata__"]["__encryption__"])["weight"]
    return {"data_iv": "base_iv", "data_tag": "tags"} if "base_iv" in entry else {"data_iv": "iv", "data_tag": "tag"}


def flip_entry_field(path: Path, field: str, sign_with: bytes | None = None, bit: int = 5) -> None:
    name = field_names(path).get(field, field)

    def flip(entries):
        entries["weight"][name] = flip_b64(entries["weight"][name], bit)
    edit_header(path, lambda h: edit_json_field(h, "__encryption__", flip), sign_with=sign_with)


# -- data region -------------------------------------------------------------------------------------

def test_a_flipped_ciphertext_bit_fails_closed(victim, keys):
    flip_file_bit(victim, data_offset(victim, "weight") + 100, bit=3)
    assert_fails_closed(victim, keys.store, IntegrityError, match="tag mismatch")


def test_a_damaged_chunk_does_not_poison_the_other_chunks(tmp_path, keys):
    path = write_victim(tmp_path / "v.ct", "cryptotensors-v2", keys)
    flip_file_bit(path, data_offset(path, "weight") + 2 * CHUNK + 1)
    expected = victim_tensors()["weight"].tobytes()
    with EncryptedFile(path, keys.store) as ef:
        start = len(ef.view.prefix) + ef.header.tensor("weight").start
        with pytest.raises(IntegrityError):
            read_plain(ef, start + 2 * CHUNK + 10, 1)
        assert read_plain(ef, start, 2 * CHUNK) == expected[:2 * CHUNK]
        assert read_plain(ef, start + 3 * CHUNK, 100) == expected[3 * CHUNK:3 * CHUNK + 100]


def victim_with_first_two_chunks_swapped(tmp_path, keys):
    path = write_victim(tmp_path / "v.ct", "cryptotensors-v2", keys)
    blob = bytearray(path.read_bytes())
    at = data_offset(path, "weight")
    blob[at:at + 2 * CHUNK] = blob[at + CHUNK:at + 2 * CHUNK] + blob[at:at + CHUNK]
    path.write_bytes(bytes(blob))
    return path


def test_swapped_chunks_fail_closed(tmp_path, keys):
    path = victim_with_first_two_chunks_swapped(tmp_path, keys)
    assert_fails_closed(path, keys.store, IntegrityError)


def test_swapped_chunks_with_their_tags_fail_even_when_re_signed(tmp_path, keys):
    """The chunk index is bound through the nonce, so moving a chunk together with its tag is caught."""
    path = victim_with_first_two_chunks_swapped(tmp_path, keys)

    def swap_tags(entries):
        tags = base64.b64decode(entries["weight"]["tags"])
        entries["weight"]["tags"] = b64(tags[16:32] + tags[:16] + tags[32:])
    edit_header(path, lambda h: edit_json_field(h, "__encryption__", swap_tags), sign_with=keys.seed)
    assert_fails_closed(path, keys.store, IntegrityError, match="chunk 0")


@pytest.mark.parametrize("kind", ["cryptotensors-v2", "ctfs-v1"])
def test_tensors_with_swapped_offsets_fail_even_when_re_signed(tmp_path, keys, kind):
    path = write_victim(tmp_path / "v.ct", kind, keys)

    def swap(h):
        h["weight"]["data_offsets"], h["weight_t"]["data_offsets"] = h["weight_t"]["data_offsets"], h["weight"]["data_offsets"]
    edit_header(path, swap, sign_with=keys.seed)
    assert_fails_closed(path, keys.store, IntegrityError, match="tag mismatch")


# -- header fields: the signature catches every edit -------------------------------------------------

@pytest.mark.parametrize("field", ["data_tag", "data_iv", "wrapped_key", "key_iv", "key_tag"])
def test_a_flipped_crypto_field_bit_is_caught_by_the_signature(victim, keys, field):
    flip_entry_field(victim, field)
    assert_fails_closed(victim, keys.store, IntegrityError, match="signature")


@pytest.mark.parametrize("field", ["data_tag", "data_iv", "wrapped_key", "key_iv", "key_tag"])
def test_a_flipped_crypto_field_bit_is_caught_by_the_aead_even_when_re_signed(victim, keys, field):
    flip_entry_field(victim, field, sign_with=keys.seed)
    assert_fails_closed(victim, keys.store, IntegrityError, match="tag mismatch")


def test_a_flipped_signature_bit_fails_closed(victim, keys):
    edit_header(victim, lambda h: h["__metadata__"].update(__signature__=flip_b64(h["__metadata__"]["__signature__"], 77)))
    assert_fails_closed(victim, keys.store, IntegrityError, match="signature")


def test_rewriting_the_header_without_changing_it_still_verifies(victim, keys):
    """The control for the edits below: the surgery itself does not break the signature."""
    edit_header(victim, lambda h: None)
    with EncryptedFile(victim, keys.store) as ef:
        ef.verify_all()


def _retype(h):
    h["weight"]["dtype"] = "I32"


def _reshape(h):
    h["weight"]["shape"] = [11, 13]


def _rename(h):
    h["renamed"] = h.pop("weight")
    edit_json_field(h, "__encryption__", lambda e: e.update(renamed=e.pop("weight")))


def _edit_metadata(h):
    h["__metadata__"]["note"] = "tampered"


def _add_metadata(h):
    h["__metadata__"]["extra"] = ""


def _drop_metadata(h):
    del h["__metadata__"]["note"]


def _edit_policy(h):
    edit_json_field(h, "__policy__", lambda p: p.update(local="package model\nallow = false"))


def _repoint_jku(h):
    edit_json_field(h, "__crypto_keys__", lambda k: k["sign"].update(jku="file:///tmp/attacker.jwk"))


def _declassify_tensor(h):
    edit_json_field(h, "__encryption__", lambda e: e.pop("weight"))


def _change_chunking(h):
    edit_json_field(h, "__crypto_keys__", lambda k: k.update(version="2", chunk_size=k.get("chunk_size", 1) * 2))


HEADER_EDITS = [_retype, _reshape, _rename, _edit_metadata, _add_metadata, _drop_metadata, _edit_policy,
                _repoint_jku, _declassify_tensor]


@pytest.mark.parametrize("edit", HEADER_EDITS, ids=lambda f: f.__name__.lstrip("_"))
def test_header_edits_are_caught_by_the_signature(victim, keys, edit):
    edit_header(victim, edit)
    assert_fails_closed(victim, keys.store, IntegrityError, match="signature")


def test_a_changed_chunk_size_is_caught_by_the_signature(tmp_path, keys):
    path = write_victim(tmp_path / "v.ct", "cryptotensors-v2", keys)
    edit_header(path, _change_chunking)
    assert_fails_closed(path, keys.store, IntegrityError, match="signature")


def test_stripping_the_crypto_metadata_is_refused_as_a_downgrade(victim, keys):
    def strip(h):
        h["__metadata__"] = {"note": "original"}
    edit_header(victim, strip)
    assert_fails_closed(victim, keys.store, PlainFileError)


# -- size damage -------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [-1, 100, 9, 8, 5, 0], ids=["last-byte", "mid-header", "one-header-byte",
                                                             "prefix-only", "short-prefix", "empty"])
def test_a_truncated_file_fails_closed(victim, keys, keep):
    blob = victim.read_bytes()
    victim.write_bytes(blob[:keep])
    assert_fails_closed(victim, keys.store, FormatError)


def test_one_appended_byte_fails_closed(victim, keys):
    with victim.open("ab") as f:
        f.write(b"\0")
    assert_fails_closed(victim, keys.store, FormatError, match="trailing")


# -- wrong keys --------------------------------------------------------------------------------------

def test_a_wrong_master_key_fails_closed(victim, keys):
    wrong = make_keys(seed=99)  # same alg and kid, other bytes
    assert wrong.master != keys.master
    store = KeyStore([wrong.enc, keys.sign])
    assert_fails_closed(victim, store, IntegrityError, match="data key")
    with EncryptedFile(victim, store) as ef, pytest.raises(IntegrityError):
        ef.unwrap_all()


def test_a_file_signed_by_an_untrusted_key_with_a_trusted_kid_fails_closed(victim, keys):
    mallory = make_keys(seed=66)  # kid "sign1" too
    edit_header(victim, lambda h: None, sign_with=mallory.seed)
    assert_fails_closed(victim, keys.store, IntegrityError, match="signature")


def test_a_file_signed_under_an_unknown_kid_is_untrusted(tmp_path, keys):
    mallory = make_keys(seed=66, sign_kid="mallory")
    plain = write_plain(tmp_path / "s.safetensors", victim_tensors())
    path = tmp_path / "v.ct"
    encrypt_file(plain, path, keys.enc, mallory.sign, EncryptOptions())
    assert_fails_closed(path, KeyStore([keys.enc, keys.sign, mallory.sign.verify_only()], trusted=[keys.sign]),
                        UntrustedSigner)


def test_holding_the_signing_key_does_not_make_it_trusted(victim, keys):
    assert_fails_closed(victim, KeyStore([keys.enc, keys.sign], trusted=[]), UntrustedSigner)


def test_forged_jku_pointing_at_an_attacker_key_file_is_refused(tmp_path, keys):
    """docs/format.md §13 W3: re-point sign.jku to an attacker JWK with the trusted kid, change a plaintext
    tensor, re-sign with the attacker key. ctfs never reads keys named by the file."""
    path = write_victim(tmp_path / "v.ct", "cryptotensors-v2", keys, encrypt=["weight", "bias"])
    mallory = make_keys(seed=66)
    attacker_file = tmp_path / "attacker.jwk"
    attacker_file.write_text(json.dumps({"keys": [mallory.sign_jwk]}))
    attacker_file.chmod(0o600)
    blob = bytearray(path.read_bytes())
    blob[data_offset(path, "plain")] ^= 0xFF
    path.write_bytes(bytes(blob))
    edit_header(path, lambda h: edit_json_field(
        h, "__crypto_keys__", lambda k: k["sign"].update(jku=f"file://{attacker_file}")), sign_with=mallory.seed)

    assert_fails_closed(path, keys.store, IntegrityError, match="signature")
    # The forgery itself is well formed: whoever trusts the attacker's key gets the altered tensor.
    with EncryptedFile(path, KeyStore([keys.enc], trusted=[mallory.sign])) as ef:
        start = len(ef.view.prefix) + ef.header.tensor("plain").start
        assert read_plain(ef, start, 1)[0] == victim_tensors()["plain"][0] ^ 0xFF


# -- any single bit, anywhere ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    """Per kind: (encrypted file bytes, decrypted plain file bytes), for fully encrypted files."""
    keys, out = make_keys(), {}
    for kind in KINDS:
        base = tmp_path_factory.mktemp(kind)
        path = write_victim(base / "v.ct", kind, keys)
        decrypt_file(path, base / "plain", keys.store)
        out[kind] = (path.read_bytes(), (base / "plain").read_bytes())
    return out


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(KINDS), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_single_bit_flip_fails_closed_or_changes_nothing(pristine, kind, where, bit):
    """Header malleability (docs/format.md W8) may let a flip through, but only if the plaintext is identical."""
    blob, expected = pristine[kind]
    damaged = bytearray(blob)
    damaged[int(where * len(blob))] ^= 1 << bit
    keys = make_keys()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "v.ct", Path(tmp) / "plain"
        src.write_bytes(bytes(damaged))
        try:
            decrypt_file(src, dst, keys.store)
        except CtfsError:
            assert not dst.exists()
        else:
            assert dst.read_bytes() == expected
