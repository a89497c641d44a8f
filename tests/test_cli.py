"""The commands as a user runs them: keygen, encrypt, decrypt, inspect, verify, and what a new user meets
at mount and umount. Each failure is one line on stderr with a non-zero exit, leaves no output behind and
never touches its source; every option has help and shows its default."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import click
import cryptotensors
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    assert_same_tensors,
    flip_file_bit,
    seeded_tensors,
    split_file,
    write_plain,
)
from mounting import (
    CHILD_TIMEOUT,
    ctfs,
    daemon_pid,
    force_unmount,
    mounted,
    mountinfo_entry,
    requires_fuse,
)
from safetensors.numpy import load_file

from ctfs import cli
from ctfs.daemon.config import MountConfig

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


def test_encrypting_a_directory_leaves_no_plaintext_weights_in_the_output(tmp_path, model_dir, key_file):
    """Safetensors content is encrypted whatever its name, and git metadata (whose LFS objects hold the
    plain weights) is not copied."""
    shard = model_dir / "model-00001-of-00002.safetensors"
    (model_dir / "consolidated.weights").write_bytes(shard.read_bytes())
    lfs_object = model_dir / ".git" / "lfs" / "objects" / "ab" / "cd" / ("ab" * 32)
    lfs_object.parent.mkdir(parents=True)
    lfs_object.write_bytes(shard.read_bytes())
    (model_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    enc = tmp_path / "enc"
    result = ctfs("encrypt", str(model_dir), str(enc), "--keys", str(key_file))
    assert result.returncode == 0, result.stderr
    assert not (enc / ".git").exists()
    assert split_file(enc / "consolidated.weights")[0]["__metadata__"]["__encryption__"]
    plain_data = shard.read_bytes()[-64:]
    assert all(plain_data not in p.read_bytes() for p in enc.rglob("*") if p.is_file())


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


# -- what a new user hits (issue #12) ---------------------------------------------------------------

def _key_problem(tmp_path, problem: str) -> tuple[list[str], dict[str, str]]:
    """(key options, environment) that make the key chain fail to build, one way each."""
    env = dict(os.environ)
    if problem == "missing file":
        return ["--keys", str(tmp_path / "missing.jwk")], env
    bad = tmp_path / "bad.jwk"
    if problem == "group-readable file":
        ctfs("keygen", str(bad))
        bad.chmod(0o644)
    elif problem == "invalid JWK":
        bad.write_text('{"kty": "rsa"}')
        bad.chmod(0o600)
    else:
        env["CRYPTOTENSOR_KEYS"] = "{not json"
        return [], env
    return ["--keys", str(bad)], env


def _run_with_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctfs", *args], capture_output=True, text=True, env=env,
                          timeout=CHILD_TIMEOUT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("problem", ["missing file", "group-readable file", "invalid JWK", "malformed CRYPTOTENSOR_KEYS"])
@pytest.mark.parametrize("command", ["encrypt", "decrypt", "verify", "rewrap", "inspect", "mount"])
def test_every_command_reports_a_key_problem_in_one_line(tmp_path, model_dir, key_file, command, problem):
    enc = tmp_path / "enc.safetensors"
    assert ctfs("encrypt", str(model_dir / "model-00002-of-00002.safetensors"), str(enc), "--keys",
                str(key_file)).returncode == 0
    options, env = _key_problem(tmp_path, problem)
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    (tmp_path / "mnt").mkdir()
    args = {
        "encrypt": [str(model_dir / "model-00001-of-00002.safetensors"), str(tmp_path / "out.safetensors")],
        "decrypt": [str(enc), str(tmp_path / "out.safetensors")],
        "verify": [str(enc)],
        "rewrap": [str(enc), "--new-keys", str(key_file)],
        "inspect": [str(enc)],
        "mount": [str(tmp_path), str(tmp_path / "mnt")],
    }[command]
    if command == "encrypt" and problem == "malformed CRYPTOTENSOR_KEYS":
        options = ["--keys", str(key_file)]
    assert_fails_cleanly(_run_with_env(env, command, *args, *options))
    assert not (tmp_path / "out.safetensors").exists()


def test_rewrap_new_keys_obey_insecure_key_perms(tmp_path, model_dir, key_file):
    enc = tmp_path / "enc.safetensors"
    ctfs("encrypt", str(model_dir / "model-00002-of-00002.safetensors"), str(enc), "--keys", str(key_file))
    new = tmp_path / "new.jwk"
    ctfs("keygen", str(new), "--kid", "next")
    new.chmod(0o644)
    assert_fails_cleanly(ctfs("rewrap", str(enc), "--keys", str(key_file), "--new-keys", str(new)), "mode 644")
    result = ctfs("rewrap", str(enc), "--keys", str(key_file), "--new-keys", str(new), "--insecure-key-perms")
    assert result.returncode == 0, result.stderr
    assert json.loads(ctfs("inspect", str(enc), "--json").stdout)["enc_kid"] == "next-enc"


@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
@pytest.mark.parametrize("into_directory", [False, True])
def test_an_existing_destination_file_is_refused_without_force(tmp_path, model_dir, key_file, command,
                                                               into_directory):
    shard = model_dir / "model-00002-of-00002.safetensors"
    src = shard
    if command == "decrypt":
        src = tmp_path / "enc.safetensors"
        ctfs("encrypt", str(shard), str(src), "--keys", str(key_file))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    existing = out_dir / src.name
    existing.write_text("mine")
    dst = out_dir if into_directory else existing
    assert_fails_cleanly(ctfs(command, str(src), str(dst), "--keys", str(key_file)), str(existing), "--force")
    assert existing.read_text() == "mine"
    assert ctfs(command, str(src), str(dst), "--keys", str(key_file), "--force").returncode == 0
    assert existing.read_bytes()[:8] != b"mine"


def test_a_file_that_is_not_safetensors_is_named_as_such(tmp_path, key_file):
    text = tmp_path / "notes.safetensors"
    text.write_text("{this is not a model, it is a long line of notes}\n")
    assert_fails_cleanly(ctfs("inspect", str(text)), "not a safetensors file")
    assert_fails_cleanly(ctfs("verify", str(text), "--keys", str(key_file)), "not a safetensors file")


def _all_commands(group: click.Group, prefix: str = "ctfs") -> list[tuple[str, click.Command]]:
    found = [(prefix, group)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _all_commands(command, f"{prefix} {name}")
        else:
            found.append((f"{prefix} {name}", command))
    return found


@pytest.mark.parametrize(("name", "command"), _all_commands(cli.main), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_has_help_and_shows_its_default(name, command):
    for option in (p for p in command.params if isinstance(p, click.Option)):
        assert option.help, f"{name} {option.opts[0]} has no help text"
        default = option.to_info_dict()["default"]  # None where no default is set
        if not option.is_flag and default not in (None, ()):
            assert option.show_default, f"{name} {option.opts[0]} does not show its default {default!r}"


def test_every_mount_option_shows_the_default_it_gets_from_the_mount_config():
    defaults = {f.name: f.default for f in dataclasses.fields(MountConfig)}
    for option in (p for p in cli.mount.params if isinstance(p, click.Option)):
        default = defaults.get(option.name)
        if option.is_flag or default in (None, dataclasses.MISSING, False):
            continue
        assert option.show_default, f"ctfs mount {option.opts[0]} does not show its default {default!r}"
    assert "default: open" in CliRunner().invoke(cli.main, ["mount", "--help"]).output


def test_every_mount_option_is_a_toml_key_of_the_same_name():
    toml_keys = {f.name for f in dataclasses.fields(MountConfig)}
    for option in (p for p in cli.mount.params if isinstance(p, click.Option)):
        if option.name in ("config_file", "help"):
            continue
        long_name = next(o for o in option.opts if o.startswith("--"))
        assert long_name[2:].replace("-", "_") in toml_keys, long_name
        assert option.name in toml_keys, option.name


@requires_fuse
def test_umount_refuses_a_mount_that_is_not_ctfs(tmp_path):
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "ctfs-test-tmpfs", str(target)], check=True, timeout=CHILD_TIMEOUT)
    try:
        assert_fails_cleanly(ctfs("umount", str(target)), "not a ctfs mount")
        assert_fails_cleanly(ctfs("umount", "--lazy", str(target)), "not a ctfs mount")
        assert mountinfo_entry(target) is not None
    finally:
        subprocess.run(["umount", str(target)], timeout=CHILD_TIMEOUT)


@pytest.fixture
def encrypted_source(tmp_path, model_dir, key_file) -> Path:
    src = tmp_path / "src"
    assert ctfs("encrypt", str(model_dir), str(src), "--keys", str(key_file)).returncode == 0
    return src


@requires_fuse
def test_a_background_mount_writes_only_to_its_default_log_after_it_returns(tmp_path, encrypted_source, key_file):
    mountpoint, state = tmp_path / "mnt", tmp_path / "state"
    mountpoint.mkdir()
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        result = subprocess.run([sys.executable, "-m", "ctfs", "mount", str(encrypted_source), str(mountpoint),
                                 "--keys", str(key_file), "--log-level", "debug"], stdout=stdout, stderr=stderr,
                                env=env, timeout=CHILD_TIMEOUT, stdin=subprocess.DEVNULL)
    pid = None
    try:
        assert result.returncode == 0, err.read_text()
        pid = daemon_pid(mountpoint)
        logs = list((state / "ctfs").iterdir())
        assert len(logs) == 1
        assert out.read_text().splitlines() == [f"ctfs: serving {encrypted_source} at {mountpoint} (log: {logs[0]})"]
        assert load_file(mountpoint / "model-00001-of-00002.safetensors")
    finally:
        force_unmount(mountpoint, pid)
    assert "unmounted" in logs[0].read_text()
    assert err.read_text() == ""


@requires_fuse
@pytest.mark.parametrize("missing", ["key", "signer"])
def test_a_mount_that_can_open_no_file_warns_or_with_strict_fails(tmp_path, encrypted_source, key_file, missing):
    other = tmp_path / "other.jwk"
    ctfs("keygen", str(other), "--kid", "team")  # the same kids, other key bytes
    options = ["--keys", str(other)] if missing == "key" else ["--keys", str(key_file), "--trust", str(other)]
    mountpoint = tmp_path / "mnt"
    with mounted(encrypted_source, mountpoint, *options) as mount:
        warnings = [line for line in mount.log().splitlines() if "WARNING" in line]
        assert len(warnings) == 1, mount.log()
        assert "2 of 2 encrypted file(s)" in warnings[0] and "model-00001-of-00002.safetensors" in warnings[0]
    result = ctfs("mount", str(encrypted_source), str(mountpoint), *options, "--strict",
                  "--log-file", str(tmp_path / "strict.log"))
    assert_fails_cleanly(result, "model-00001-of-00002.safetensors", missing)
    assert mountinfo_entry(mountpoint) is None
