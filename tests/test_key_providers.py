"""The key provider chain: each provider with a real source, the documented order, laziness and hygiene."""

from __future__ import annotations

import base64
import json
import logging
import shlex
import sys
from pathlib import Path

import keyring
import pytest
from click.testing import CliRunner
from conftest import Keys, make_keys, seeded_tensors, write_upstream
from keyrings.alt.file import PlaintextKeyring
from mounting import process_gone

from ctfs.cli import main
from ctfs.daemon.config import MountConfig
from ctfs.daemon.lifecycle import build_keys
from ctfs.errors import CtfsError, IntegrityError, KeyUnavailable
from ctfs.files.encrypted import EncryptedFile
from ctfs.format.encryption import KeyRef
from ctfs.keys.chain import build_chain
from ctfs.keys.keyring_store import KeyringKeys
from ctfs.keys.providers import KEY_COMMAND_ENV, KeyCommand

RIGHT = make_keys(seed=0)
WRONG = make_keys(seed=1)  # the same kids as RIGHT, other bytes
ENC1 = KeyRef("aes256gcm", "enc1", None)

KEY_COMMAND_SCRIPT = """\
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid()}) + "\\n")
if os.path.exists(os.path.join(here, "hang")):
    time.sleep(60)
served = json.load(open(os.path.join(here, "served.json")))
if sys.argv[1] not in served:
    sys.exit(3)
print(json.dumps(served[sys.argv[1]]))
"""


@pytest.fixture(autouse=True)
def restore_keyring():
    """Tests here switch keyring backends; the session's (conftest: the fail backend) comes back after each."""
    previous = keyring.get_keyring()
    yield
    keyring.set_keyring(previous)


@pytest.fixture
def file_keyring(tmp_path, monkeypatch) -> PlaintextKeyring:
    """A real keyring backend (keyrings.alt's file backend) in a private XDG data directory."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    backend = PlaintextKeyring()
    keyring.set_keyring(backend)
    return backend


@pytest.fixture
def model(tmp_path) -> Path:
    """A file encrypted by the reference library with RIGHT (kids enc1 / sign1)."""
    return write_upstream(tmp_path / "model.safetensors", seeded_tensors(), RIGHT)


def write_key_file(path: Path, *jwks: dict, mode: int = 0o600) -> Path:
    path.write_text(json.dumps({"keys": list(jwks)}))
    path.chmod(mode)
    return path


def trust_file(tmp_path: Path, keys: Keys = RIGHT) -> str:
    public = {k: v for k, v in keys.sign_jwk.items() if k != "d"}
    return str(write_key_file(tmp_path / "trust.jwk", public))


def open_fully(path: Path, chain) -> None:
    with EncryptedFile(path, chain) as ef:
        ef.unwrap_all()
        ef.verify_all()


class FakeKms:
    """A real key command: a Python script that serves JWKs by kid and records how it was called."""

    def __init__(self, directory: Path):
        directory.mkdir()
        self.dir = directory
        self.script = directory / "kms.py"
        self.script.write_text(KEY_COMMAND_SCRIPT)
        self.serve({})

    @property
    def command(self) -> str:
        return f"{shlex.quote(sys.executable)} {shlex.quote(str(self.script))}"

    def serve(self, by_kid: dict[str, dict]) -> None:
        (self.dir / "served.json").write_text(json.dumps(by_kid))

    def hang(self) -> None:
        (self.dir / "hang").touch()

    @property
    def calls(self) -> list[dict]:
        log = self.dir / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def kms(tmp_path) -> FakeKms:
    return FakeKms(tmp_path / "kms")


# -- each provider alone -------------------------------------------------------------------------------

def test_keys_files_sets_and_directories(tmp_path, model):
    keydir = tmp_path / "keys"
    keydir.mkdir()
    write_key_file(keydir / "enc.jwk", RIGHT.enc_jwk)
    write_key_file(keydir / "sign.json", RIGHT.sign_jwk)
    open_fully(model, build_chain([str(keydir)]))
    both = write_key_file(tmp_path / "set.jwk", RIGHT.enc_jwk, RIGHT.sign_jwk)
    open_fully(model, build_chain([str(both)]))


def test_a_key_file_readable_by_group_or_others_is_refused_unless_insecure(tmp_path, model):
    loose = write_key_file(tmp_path / "set.jwk", RIGHT.enc_jwk, RIGHT.sign_jwk, mode=0o640)
    with pytest.raises(KeyUnavailable, match="group or others"):
        build_chain([str(loose)])
    open_fully(model, build_chain([str(loose)], check_perms=False))


def test_systemd_credentials_are_used_when_the_directory_is_set(tmp_path, model, monkeypatch, caplog):
    creds = tmp_path / "credentials"
    creds.mkdir()
    # Credential files are named by LoadCredential=, with no suffix; systemd shows its ACL as group bits.
    write_key_file(creds / "ctfs-master", RIGHT.enc_jwk, mode=0o440)
    write_key_file(creds / "ctfs-signer", RIGHT.sign_jwk, mode=0o440)
    (creds / "vault-token").write_text("s.not-a-key")
    (creds / "settings").write_text('{"region": "eu"}')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    caplog.set_level(logging.INFO, "ctfs.keys")
    open_fully(model, build_chain())
    assert "decrypt key enc1 (aes256gcm) from systemd credentials" in caplog.text
    assert "trust key sign1 (ed25519) from systemd credentials" in caplog.text
    assert "credential vault-token is not JSON" in caplog.text


def test_a_malformed_jwk_credential_is_an_error(tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.mkdir()
    write_key_file(creds / "ctfs-master", {**RIGHT.enc_jwk, "k": "c2hvcnQ="})
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(KeyUnavailable, match="ctfs-master.*32-byte key"):
        build_chain()


@pytest.mark.parametrize("shape", ["jwk-set", "single-jwk"])
def test_cryptotensor_keys_as_the_reference_library_reads_it(model, monkeypatch, shape):
    if shape == "jwk-set":
        monkeypatch.setenv("CRYPTOTENSOR_KEYS", json.dumps({"keys": [RIGHT.enc_jwk, RIGHT.sign_jwk]}))
        open_fully(model, build_chain())
    else:
        monkeypatch.setenv("CRYPTOTENSOR_KEYS", json.dumps(RIGHT.enc_jwk))
        assert build_chain().encryption_key(ENC1).key == RIGHT.master


def test_cryptotensor_keys_that_is_not_json_is_refused_without_echoing_it(monkeypatch):
    monkeypatch.setenv("CRYPTOTENSOR_KEYS", "k=" + base64.b64encode(RIGHT.master).decode())
    with pytest.raises(KeyUnavailable) as failure:
        build_chain()
    assert "not JSON" in str(failure.value)
    assert base64.b64encode(RIGHT.master).decode() not in str(failure.value)


def test_keyring_import_list_lookup_delete(tmp_path, model, file_keyring, caplog):
    keyfile = write_key_file(tmp_path / "set.jwk", RIGHT.enc_jwk, RIGHT.sign_jwk)
    runner = CliRunner()
    imported = runner.invoke(main, ["key", "import", str(keyfile), "--keyring"])
    assert imported.exit_code == 0, imported.output
    assert "enc1, sign1" in imported.output
    keyfile.unlink()  # the keyring alone now holds the keys

    listed = runner.invoke(main, ["key", "list", "--keyring"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == ["enc1\toct\taes256gcm", "sign1\tokp\ted25519\tprivate"]
    assert RIGHT.enc_jwk["k"] not in listed.output and RIGHT.sign_jwk["d"] not in listed.output

    caplog.set_level(logging.INFO, "ctfs.keys")
    open_fully(model, build_chain())
    assert "decrypt key enc1 (aes256gcm) from keyring" in caplog.text

    again = runner.invoke(main, ["key", "import", str(write_key_file(tmp_path / "e.jwk", RIGHT.enc_jwk)), "--keyring"])
    assert again.exit_code == 1 and "already in the keyring" in again.output

    deleted = runner.invoke(main, ["key", "delete", "enc1", "--keyring"])
    assert deleted.exit_code == 0, deleted.output
    assert runner.invoke(main, ["key", "list", "--keyring"]).output.splitlines() == ["sign1\tokp\ted25519\tprivate"]
    with pytest.raises(KeyUnavailable, match="no aes256gcm encryption key with kid 'enc1'"):
        open_fully(model, build_chain())


def test_keyring_entries_need_a_kid(tmp_path, file_keyring):
    anonymous = {k: v for k, v in RIGHT.enc_jwk.items() if k != "kid"}
    result = CliRunner().invoke(main, ["key", "import", str(write_key_file(tmp_path / "a.jwk", anonymous)), "--keyring"])
    assert result.exit_code == 1 and "needs a kid" in result.output


def test_no_usable_keyring_backend_is_one_clear_line(tmp_path):
    for args in (["key", "list", "--keyring"], ["key", "delete", "enc1", "--keyring"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1
        assert result.output.count("\n") == 1 and "no usable keyring backend" in result.output
    assert "keyring" not in [p.name for p in build_chain().providers]


def test_keyring_commands_name_their_store():
    assert "Missing option '--keyring'" in CliRunner().invoke(main, ["key", "list"]).output


def test_key_command_runs_only_when_a_file_needs_its_kid_and_once(tmp_path, model, kms, monkeypatch, caplog):
    kms.serve({"enc1": RIGHT.enc_jwk})
    # Our own environment holds keys that must not reach the command.
    monkeypatch.setenv("CRYPTOTENSOR_KEYS", json.dumps({"keys": [WRONG.enc_jwk | {"kid": "other"}]}))
    caplog.set_level(logging.INFO, "ctfs.keys")
    chain = build_chain(trust=[trust_file(tmp_path)], key_command=kms.command)
    assert kms.calls == []
    open_fully(model, chain)
    open_fully(model, chain)
    assert [call["argv"] for call in kms.calls] == [["enc1", "aes256gcm"]]
    assert set(kms.calls[0]["env"]) <= set(KEY_COMMAND_ENV)
    assert "decrypt key enc1 (aes256gcm) from key command" in caplog.text


def test_key_command_failure_means_no_key(kms):
    kms.serve({})
    assert KeyCommand(kms.command).lookup(ENC1) == []
    assert len(kms.calls) == 1
    with pytest.raises(KeyUnavailable, match="asked: --keys, key command"):
        build_chain(key_command=kms.command).encryption_key(ENC1)


def test_key_command_output_must_be_a_matching_jwk(kms):
    kms.serve({"enc1": {**RIGHT.enc_jwk, "kid": "someone-else"}})
    assert KeyCommand(kms.command).lookup(ENC1) == []
    anonymous = {k: v for k, v in RIGHT.enc_jwk.items() if k != "kid"}
    kms.serve({"enc1": anonymous})
    [key] = KeyCommand(kms.command).lookup(ENC1)
    assert (key.kid, key.key) == ("enc1", RIGHT.master)


def test_key_command_that_hangs_is_killed_at_its_timeout(kms, caplog):
    kms.serve({"enc1": RIGHT.enc_jwk})
    kms.hang()  # it answers after 60 s: a lookup that waited for it would get the key
    assert KeyCommand(kms.command, timeout=1.0).lookup(ENC1) == []
    assert "timed out" in caplog.text
    [call] = kms.calls
    assert process_gone(call["pid"])


def test_key_command_is_never_asked_for_a_signer(tmp_path, model, kms):
    """A signer lookup uses the unauthenticated header: the command must not run for it, and it does
    not run for a master key either while the signature is unchecked."""
    kms.serve({"enc1": RIGHT.enc_jwk, "sign1": RIGHT.sign_jwk})
    chain = build_chain(key_command=kms.command)
    assert KeyCommand(kms.command).lookup(KeyRef("ed25519", "sign1", None)) == []
    assert chain.trusted_verify_keys(KeyRef("ed25519", "sign1", None)) == []
    with pytest.raises(CtfsError, match="not a trusted verify key"):
        open_fully(model, chain)
    assert kms.calls == []


def test_a_kid_that_looks_like_an_option_is_not_passed(kms):
    kms.serve({"--help": RIGHT.enc_jwk})
    assert KeyCommand(kms.command).lookup(KeyRef("aes256gcm", "--help", None)) == []
    assert kms.calls == []


# -- precedence ----------------------------------------------------------------------------------------

PROVIDERS = ["--keys", "systemd credentials", "CRYPTOTENSOR_KEYS", "keyring", "key command"]


def supply(name: str, jwk: dict, tmp_path: Path, monkeypatch, kms: FakeKms) -> dict:
    """Put `jwk` in provider `name`; returns the build_chain arguments that provider needs."""
    if name == "--keys":
        return {"keys": [str(write_key_file(tmp_path / "keys.jwk", jwk))]}
    if name == "systemd credentials":
        (tmp_path / "creds").mkdir()
        write_key_file(tmp_path / "creds" / "master", jwk)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    elif name == "CRYPTOTENSOR_KEYS":
        monkeypatch.setenv("CRYPTOTENSOR_KEYS", json.dumps(jwk))
    elif name == "keyring":
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        keyring.set_keyring(PlaintextKeyring())
        keyring.get_keyring().set_password("ctfs", jwk["kid"], json.dumps(jwk))
    else:
        kms.serve({jwk["kid"]: jwk})
        return {"key_command": kms.command}
    return {}


@pytest.mark.parametrize("winner", PROVIDERS)
def test_the_earliest_provider_holding_the_kid_answers(tmp_path, model, monkeypatch, kms, caplog, winner):
    """Providers before `winner` lack enc1; `winner` holds the right key; every later one a wrong key
    under the same kid. The file opens, so `winner` answered, and the logs say so."""
    position = PROVIDERS.index(winner)
    kwargs: dict = {"trust": [trust_file(tmp_path)]}
    for index, name in enumerate(PROVIDERS):
        if index >= position:
            jwk = RIGHT.enc_jwk if index == position else WRONG.enc_jwk
            kwargs.update(supply(name, jwk, tmp_path, monkeypatch, kms))
    caplog.set_level(logging.INFO, "ctfs.keys")
    open_fully(model, build_chain(**kwargs))
    assert f"decrypt key enc1 (aes256gcm) from {winner}" in caplog.text
    assert len(kms.calls) == (1 if winner == "key command" else 0)


def test_an_earlier_wrong_key_shadows_a_later_right_one(tmp_path, model, monkeypatch, kms):
    kwargs = supply("--keys", WRONG.enc_jwk, tmp_path, monkeypatch, kms)
    supply("CRYPTOTENSOR_KEYS", RIGHT.enc_jwk, tmp_path, monkeypatch, kms)
    with pytest.raises(IntegrityError, match="data key"):
        open_fully(model, build_chain(trust=[trust_file(tmp_path)], **kwargs))


def test_the_kid_and_the_algorithm_both_select(tmp_path, monkeypatch, kms):
    aes128 = make_keys("aes128gcm", seed=5)
    kwargs = supply("--keys", aes128.enc_jwk, tmp_path, monkeypatch, kms)
    supply("CRYPTOTENSOR_KEYS", RIGHT.enc_jwk, tmp_path, monkeypatch, kms)
    chain = build_chain(**kwargs)
    assert chain.encryption_key(ENC1).key == RIGHT.master
    assert chain.encryption_key(KeyRef("aes128gcm", "enc1", None)).key == aes128.master


# -- the mount's chain ---------------------------------------------------------------------------------

def test_the_mount_refuses_to_start_without_any_key_source(tmp_path):
    config = MountConfig(source=str(tmp_path), mountpoint=str(tmp_path / "mnt"), trust=[trust_file(tmp_path)])
    with pytest.raises(CtfsError, match="no encryption key"):
        build_keys(config)
    with_command = MountConfig(source=str(tmp_path), mountpoint=str(tmp_path / "mnt"),
                               trust=[trust_file(tmp_path)], key_command="/bin/false")
    assert build_keys(with_command).may_decrypt()


def test_the_mount_refuses_to_start_without_a_trusted_signer(tmp_path):
    keys = write_key_file(tmp_path / "enc.jwk", RIGHT.enc_jwk)
    with pytest.raises(CtfsError, match="no trusted signer"):
        build_keys(MountConfig(source=str(tmp_path), mountpoint=str(tmp_path / "mnt"), keys=[str(keys)]))


# -- hygiene -------------------------------------------------------------------------------------------

def encodings(secret: bytes) -> list[str]:
    """Every way a key's bytes could leak into text."""
    std = base64.b64encode(secret).decode()
    url = base64.urlsafe_b64encode(secret).decode()
    return [std, std.rstrip("="), url, url.rstrip("="), secret.hex(), secret.hex().upper(),
            repr(secret)[2:-1], secret.decode("latin-1")]


def test_keys_never_reach_logs_errors_argv_or_the_commands_environment(tmp_path, model, monkeypatch, kms, caplog):
    caplog.set_level(logging.DEBUG)
    kms.serve({"enc1": RIGHT.enc_jwk, "bad": {**WRONG.enc_jwk, "kid": "bad", "k": base64.b64encode(WRONG.master[:20]).decode()}})
    monkeypatch.setenv("CRYPTOTENSOR_KEYS", json.dumps({"keys": [WRONG.sign_jwk | {"kid": "env-signer"}]}))
    errors = []
    chain = build_chain(trust=[trust_file(tmp_path)], key_command=kms.command)
    open_fully(model, chain)
    for ref in (KeyRef("aes256gcm", "bad", None), KeyRef("aes128gcm", "enc1", None)):
        with pytest.raises(KeyUnavailable) as failure:
            chain.encryption_key(ref)
        errors.append(str(failure.value))
    loose = write_key_file(tmp_path / "loose.jwk", RIGHT.enc_jwk, mode=0o644)
    with pytest.raises(KeyUnavailable) as failure:
        build_chain([str(loose)])
    errors.append(str(failure.value))
    with pytest.raises(IntegrityError) as failure:
        open_fully(model, build_chain([str(write_key_file(tmp_path / "w.jwk", WRONG.enc_jwk))],
                                      trust=[trust_file(tmp_path)]))
    errors.append(str(failure.value))

    texts = [caplog.text, *errors, json.dumps(kms.calls), repr(chain.encryption_key(ENC1)), repr(chain.providers)]
    for secret in (RIGHT.master, RIGHT.seed, WRONG.master, WRONG.seed, WRONG.master[:20]):
        for encoded in encodings(secret):
            assert not any(encoded in text for text in texts), "key material leaked"
    assert all("CRYPTOTENSOR_KEYS" not in call["env"] and "CREDENTIALS_DIRECTORY" not in call["env"]
               for call in kms.calls)


def test_the_keyring_provider_answers_only_by_kid(file_keyring):
    file_keyring.set_password("ctfs", "enc1", json.dumps(RIGHT.enc_jwk))
    provider = KeyringKeys(file_keyring)
    assert provider.lookup(KeyRef("aes256gcm", None, None)) == []
    assert provider.lookup(KeyRef("chacha20poly1305", "enc1", None)) == []
    assert [k.key for k in provider.lookup(ENC1)] == [RIGHT.master]
