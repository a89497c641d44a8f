"""JWK parsing: the reference library's shapes and RFC 7517/8037 ones, strictly; key files stay private."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ALGS, assert_same_tensors, b64, make_keys, write_upstream
from safetensors.numpy import load_file

from ctfs.errors import KeyUnavailable
from ctfs.files.decrypt import decrypt_file
from ctfs.keys.jwk import (
    EncryptionKey,
    SigningKey,
    load_key_file,
    parse_jwk,
    parse_jwk_document,
    to_reference_jwk,
)
from ctfs.keys.store import KeyStore


@pytest.mark.parametrize("alg", ALGS)
def test_reference_encryption_keys_parse(alg):
    keys = make_keys(alg)
    key = parse_jwk({**keys.enc_jwk, "jku": "file:///keys.jwk"})
    assert key == EncryptionKey(alg, keys.master, "enc1", "file:///keys.jwk")


def test_reference_signing_keys_parse_with_d_and_x_or_either_alone(keys):
    assert parse_jwk(keys.sign_jwk) == SigningKey(keys.public, keys.seed, "sign1")
    only_d = {k: v for k, v in keys.sign_jwk.items() if k != "x"}
    assert parse_jwk(only_d) == SigningKey(keys.public, keys.seed, "sign1")
    only_x = {k: v for k, v in keys.sign_jwk.items() if k != "d"}
    assert parse_jwk(only_x) == SigningKey(keys.public, None, "sign1")


@pytest.mark.parametrize(("alg", "normalised"), [("AES-256-GCM", "aes256gcm"), ("AES128GCM", "aes128gcm"),
                                                 ("ChaCha20-Poly1305", "chacha20poly1305")])
def test_reference_alg_spellings_are_normalised(alg, normalised):
    keys = make_keys(normalised)
    assert parse_jwk({**keys.enc_jwk, "alg": alg}).alg == normalised


def test_an_encryption_key_without_alg_is_aes256gcm_as_upstream_assumes(keys):
    jwk = {k: v for k, v in keys.enc_jwk.items() if k != "alg"}
    assert parse_jwk(jwk).alg == "aes256gcm"


@pytest.mark.parametrize("alg", ALGS)
def test_rfc_encryption_keys_parse_to_the_same_key(alg):
    keys = make_keys(alg)
    assert parse_jwk(keys.rfc_enc_jwk) == parse_jwk(keys.enc_jwk)


def test_rfc_signing_keys_parse_to_the_same_key(keys):
    assert parse_jwk(keys.rfc_sign_jwk) == parse_jwk(keys.sign_jwk)
    assert parse_jwk({**keys.rfc_sign_jwk, "alg": "EdDSA"}) == parse_jwk(keys.sign_jwk)


def test_padded_base64url_is_accepted_too(keys):
    padded = b64(keys.master).replace("+", "-").replace("/", "_")
    assert parse_jwk({**keys.rfc_enc_jwk, "k": padded}).key == keys.master


def test_rfc_keys_decrypt_a_file_written_with_reference_keys(tmp_path):
    keys = make_keys("chacha20poly1305")
    tensors = {"w": np.arange(12, dtype=np.float32)}
    src = write_upstream(tmp_path / "m.ct", tensors, keys)
    store = KeyStore(parse_jwk_document({"keys": [keys.rfc_enc_jwk, keys.rfc_sign_jwk]}))
    decrypt_file(src, tmp_path / "plain", store)
    assert_same_tensors(load_file(tmp_path / "plain"), tensors)


def test_conversion_to_the_reference_shape_round_trips(keys):
    for rfc in (keys.rfc_enc_jwk, keys.rfc_sign_jwk):
        key = parse_jwk(rfc)
        assert parse_jwk(to_reference_jwk(key)) == key
    assert to_reference_jwk(parse_jwk(keys.rfc_enc_jwk)) == keys.enc_jwk
    assert to_reference_jwk(parse_jwk(keys.rfc_sign_jwk)) == keys.sign_jwk
    assert "d" not in to_reference_jwk(parse_jwk(keys.sign_jwk), private=False)


def test_key_bytes_never_appear_in_repr(keys):
    assert keys.enc_jwk["k"] not in repr(keys.enc) and repr(keys.master) not in repr(keys.enc)
    assert repr(keys.seed) not in repr(keys.sign)


def _without(jwk, *fields):
    return {k: v for k, v in jwk.items() if k not in fields}


BAD_JWKS = {
    "oct without k": lambda keys: _without(keys.enc_jwk, "k"),
    "okp without d and x": lambda keys: _without(keys.sign_jwk, "d", "x"),
    "OKP without d and x": lambda keys: _without(keys.rfc_sign_jwk, "d", "x"),
    "x does not match d": lambda keys: {**keys.sign_jwk, "x": make_keys(seed=5).sign_jwk["x"]},
    "k too short": lambda keys: {**keys.enc_jwk, "k": b64(keys.master[:31])},
    "k too long for aes128gcm": lambda keys: {**keys.enc_jwk, "alg": "aes128gcm"},
    "d too short": lambda keys: _without({**keys.sign_jwk, "d": b64(keys.seed[:31])}, "x"),
    "x too long": lambda keys: _without({**keys.sign_jwk, "x": b64(keys.public + b"\0")}, "d"),
    "k not base64": lambda keys: {**keys.enc_jwk, "k": "not*base64*at*all"},
    "k badly padded": lambda keys: {**keys.enc_jwk, "k": b64(keys.master) + "="},
    "k not a string": lambda keys: {**keys.enc_jwk, "k": 42},
    "unknown kty": lambda keys: {**keys.enc_jwk, "kty": "RSA"},
    "kty case": lambda keys: {**keys.enc_jwk, "kty": "OCT"},
    "unknown enc alg": lambda keys: {**keys.enc_jwk, "alg": "A192GCM"},
    "unknown sign alg": lambda keys: {**keys.sign_jwk, "alg": "ES256"},
    "OKP without crv": lambda keys: _without(keys.rfc_sign_jwk, "crv"),
    "OKP on X25519": lambda keys: {**keys.rfc_sign_jwk, "crv": "X25519"},
    "kid not a string": lambda keys: {**keys.enc_jwk, "kid": 1},
    "not an object": lambda keys: [keys.enc_jwk],
}


@pytest.mark.parametrize("make", BAD_JWKS.values(), ids=BAD_JWKS.keys())
def test_bad_jwks_are_refused_never_replaced_by_a_random_key(keys, make):
    with pytest.raises(KeyUnavailable):
        parse_jwk(make(keys))


def test_documents_may_be_a_jwk_a_set_or_a_bare_list(keys):
    assert parse_jwk_document(keys.enc_jwk) == [keys.enc]
    assert parse_jwk_document({"keys": [keys.enc_jwk, keys.sign_jwk]}) == [keys.enc, keys.sign]
    assert parse_jwk_document([keys.sign_jwk]) == [keys.sign]


def test_one_bad_key_spoils_the_whole_set(keys):
    with pytest.raises(KeyUnavailable):
        parse_jwk_document({"keys": [keys.enc_jwk, _without(keys.sign_jwk, "d", "x")]})


def write_key_file(path, doc, mode=0o600):
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    path.chmod(mode)
    return path


def test_a_private_key_file_loads(tmp_path, keys):
    path = write_key_file(tmp_path / "k.jwk", {"keys": [keys.enc_jwk, keys.rfc_sign_jwk]})
    assert load_key_file(path) == [keys.enc, keys.sign]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620, 0o610])
def test_a_key_file_open_to_group_or_others_is_refused(tmp_path, keys, mode):
    path = write_key_file(tmp_path / "k.jwk", keys.enc_jwk, mode)
    with pytest.raises(KeyUnavailable, match="group or others"):
        load_key_file(path)
    assert load_key_file(path, check_perms=False) == [keys.enc]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{}", b"[" * 100_000, b'{"keys": [{"kty": "oct"}]}'],
                         ids=["not json", "not utf-8", "deep nesting", "bad key"])
def test_unreadable_key_files_are_key_errors_naming_the_file(tmp_path, content):
    path = tmp_path / "k.jwk"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyUnavailable, match="k.jwk"):
        load_key_file(path)


def test_a_missing_key_file_is_a_key_error(tmp_path):
    with pytest.raises(KeyUnavailable, match="missing.jwk"):
        load_key_file(tmp_path / "missing.jwk")
