"""Who may sign: verify keys come from the trust store only; a header's jku is a hint, allow-listed or ignored."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import (
    edit_header,
    edit_json_field,
    make_keys,
    seeded_tensors,
    split_file,
    write_upstream,
)

from ctfs.daemon.config import MountConfig
from ctfs.daemon.lifecycle import build_keys
from ctfs.errors import CtfsError, IntegrityError, KeyUnavailable, UntrustedSigner
from ctfs.files.encrypted import EncryptedFile
from ctfs.keys.chain import build_chain

PUBLISHER = make_keys(seed=0)  # kids enc1 / sign1
MALLORY = make_keys(seed=66)  # the same kids, the attacker's bytes


def write_key_file(path: Path, *jwks: dict, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keys": list(jwks)}))
    path.chmod(mode)
    return path


def public_jwk(jwk: dict) -> dict:
    return {k: v for k, v in jwk.items() if k != "d"}


def open_fully(path: Path, chain) -> None:
    with EncryptedFile(path, chain) as ef:
        ef.unwrap_all()
        ef.verify_all()


def set_jku(path: Path, which: str, jku: str, signer: bytes) -> None:
    """Point the header's `which` (enc/sign) descriptor at `jku` and re-sign with the seed `signer`."""
    edit_header(path, lambda h: edit_json_field(h, "__crypto_keys__", lambda k: k[which].update(jku=jku)),
                sign_with=signer)


# -- the trust store -----------------------------------------------------------------------------------

@pytest.fixture
def model(tmp_path) -> Path:
    return write_upstream(tmp_path / "model.safetensors", seeded_tensors(), PUBLISHER)


def test_by_default_the_supplied_signing_keys_are_trusted(tmp_path, model):
    open_fully(model, build_chain([str(write_key_file(tmp_path / "k.jwk", PUBLISHER.enc_jwk, PUBLISHER.sign_jwk))]))


def test_a_server_trusts_the_publisher_by_its_public_key_alone(tmp_path, model):
    keys = write_key_file(tmp_path / "enc.jwk", PUBLISHER.enc_jwk)
    trust = write_key_file(tmp_path / "publisher.jwk", public_jwk(PUBLISHER.sign_jwk), mode=0o644)
    open_fully(model, build_chain([str(keys)], trust=[str(trust)]))


def test_trust_replaces_the_default_it_does_not_add_to_it(tmp_path, model):
    """Holding the publisher's signing key does not make it trusted once --trust names someone else."""
    keys = write_key_file(tmp_path / "k.jwk", PUBLISHER.enc_jwk, PUBLISHER.sign_jwk)
    other = write_key_file(tmp_path / "other.jwk", public_jwk(make_keys(seed=7, sign_kid="other").sign_jwk))
    with pytest.raises(UntrustedSigner):
        open_fully(model, build_chain([str(keys)], trust=[str(other)]))


def test_a_trust_file_without_a_verify_key_is_an_error(tmp_path):
    enc_only = write_key_file(tmp_path / "enc.jwk", PUBLISHER.enc_jwk)
    with pytest.raises(CtfsError, match="no Ed25519 verify key"):
        build_chain(trust=[str(enc_only)])


def test_the_mount_trusts_its_trust_files(tmp_path, model):
    keys = write_key_file(tmp_path / "k.jwk", PUBLISHER.enc_jwk, PUBLISHER.sign_jwk)
    other = write_key_file(tmp_path / "other.jwk", public_jwk(MALLORY.sign_jwk))
    config = MountConfig(source=str(tmp_path), mountpoint=str(tmp_path / "mnt"), keys=[str(keys)], trust=[str(other)])
    with pytest.raises(IntegrityError, match="signature"):
        open_fully(model, build_keys(config))


# -- docs/format.md §13 W3 -----------------------------------------------------------------------------

@pytest.mark.parametrize("attacker_kid", ["sign1", "mallory"])
def test_a_forgery_that_brings_its_own_signer_through_jku_is_refused(tmp_path, attacker_kid):
    """The attacker changes a plaintext tensor, re-points sign.jku at their own JWK file, and re-signs.
    Refused even when that file lies under an allow-listed jku prefix: a jku never supplies trust."""
    path = write_upstream(tmp_path / "model.safetensors", seeded_tensors(), PUBLISHER, None, tensors=["weight"])
    attacker = make_keys(seed=66, sign_kid=attacker_kid)
    drop = write_key_file(tmp_path / "drop" / "attacker.jwk", attacker.sign_jwk)
    header, data = split_file(path)
    start = len(path.read_bytes()) - len(data) + header["ids"]["data_offsets"][0]
    blob = bytearray(path.read_bytes())
    blob[start] ^= 0xFF
    path.write_bytes(bytes(blob))
    edit_header(path, lambda h: edit_json_field(h, "__crypto_keys__", lambda k: k["sign"].update(
        jku=f"file://{drop}", kid=attacker_kid)), sign_with=attacker.seed)

    keys = write_key_file(tmp_path / "k.jwk", PUBLISHER.enc_jwk, PUBLISHER.sign_jwk)
    chain = build_chain([str(keys)], allow_jku=[f"file://{drop.parent}"])
    with pytest.raises(UntrustedSigner if attacker_kid == "mallory" else IntegrityError):
        open_fully(path, chain)
    # The forgery is well formed: whoever trusted the attacker's key would read the altered tensor.
    enc_only = write_key_file(tmp_path / "enc.jwk", PUBLISHER.enc_jwk)
    open_fully(path, build_chain([str(enc_only)], trust=[str(drop)]))


# -- jku: allow-listed file:// only, decryption keys only ---------------------------------------------

@pytest.fixture
def published(tmp_path) -> tuple[Path, Path, str]:
    """(model, signer key file, allow prefix): the master key is reachable only through the header's jku."""
    keydir = tmp_path / "published"
    jku = f"file://{keydir}/enc.jwk"
    write_key_file(keydir / "enc.jwk", PUBLISHER.enc_jwk)
    model = write_upstream(tmp_path / "model.safetensors", seeded_tensors(), PUBLISHER, None,
                           enc_key={**PUBLISHER.enc_jwk, "jku": jku})
    signer = write_key_file(tmp_path / "signer.jwk", PUBLISHER.sign_jwk)
    return model, signer, f"file://{keydir}"


def test_jku_is_ignored_unless_allow_listed(published, caplog):
    model, signer, prefix = published
    caplog.set_level(logging.INFO, "ctfs.keys")
    with pytest.raises(KeyUnavailable):
        open_fully(model, build_chain([str(signer)]))
    open_fully(model, build_chain([str(signer)], allow_jku=[prefix]))
    assert "decrypt key enc1 (aes256gcm) from jku" in caplog.text


def test_the_mount_passes_its_jku_allow_list(tmp_path, published):
    model, signer, prefix = published
    config = MountConfig(source=str(tmp_path), mountpoint=str(tmp_path / "mnt"), keys=[str(signer)],
                         allow_jku=[prefix])
    open_fully(model, build_keys(config))


@pytest.mark.parametrize("where", ["sibling", "dotdot", "symlink-out", "other-host", "relative", "https"])
def test_a_jku_outside_the_allowed_prefix_is_ignored(tmp_path, published, where):
    model, signer, prefix = published
    evil = write_key_file(tmp_path / "published-evil" / "enc.jwk", PUBLISHER.enc_jwk)
    (tmp_path / "published" / "link.jwk").symlink_to(evil)
    jku = {
        "sibling": f"file://{evil}",
        "dotdot": f"file://{tmp_path}/published/../published-evil/enc.jwk",
        "symlink-out": f"file://{tmp_path}/published/link.jwk",
        "other-host": f"file://keyserver{tmp_path}/published/enc.jwk",
        "relative": "file:published/enc.jwk",
        "https": "https://keys.example/enc.jwk",
    }[where]
    set_jku(model, "enc", jku, PUBLISHER.seed)
    with pytest.raises(KeyUnavailable):
        open_fully(model, build_chain([str(signer)], allow_jku=[prefix]))


def test_only_file_prefixes_may_be_allowed(tmp_path):
    for prefix in ("https://keys.example/", "/srv/keys", "file:relative"):
        with pytest.raises(CtfsError, match="never fetches keys from a network"):
            build_chain(allow_jku=[prefix])


def test_a_jku_key_file_must_be_private(tmp_path, published):
    model, signer, prefix = published
    (tmp_path / "published" / "enc.jwk").chmod(0o644)
    with pytest.raises(KeyUnavailable, match="group or others"):
        open_fully(model, build_chain([str(signer)], allow_jku=[prefix]))
    open_fully(model, build_chain([str(signer)], allow_jku=[prefix], check_perms=False))
