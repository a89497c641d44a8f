"""Mount configuration: TOML parsing, defaults, sizes, strict errors, relative paths, flags over file."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ctfs.daemon.config import (
    ConfigError,
    MountConfig,
    config_from_options,
    load_config,
    parse_size,
)
from ctfs.errors import CtfsError


def write(tmp_path, text: str, name: str = "llama.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = 'source = "/srv/encrypted/llama"\nmountpoint = "/srv/models/llama"\n'


def test_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config == MountConfig(source="/srv/encrypted/llama", mountpoint="/srv/models/llama")
    assert (config.keys, config.trust, config.key_command, config.allow_jku) == ([], [], None, [])
    assert config.cache_size == 256 * 2**20
    assert (config.verify, config.log_level) == ("open", "info")
    assert (config.policy_cache_ttl, config.threads) == (5.0, None)
    assert not any((config.insecure_key_perms, config.allow_plain, config.allow_other, config.foreground,
                    config.hide_denied))
    assert (config.policy, config.labels, config.audit_log) == (None, {}, None)
    assert (config.log_file, config.strict) == (None, False)


def test_every_option_from_toml(tmp_path):
    text = MINIMAL + """
keys = ["/etc/ctfs/keys/a.jwk", "/etc/ctfs/keys"]
trust = ["/etc/ctfs/trust/publisher.jwk"]
key_command = "vault-jwk --role ctfs"
allow_jku = ["https://keys.example.com/"]
insecure_key_perms = true
cache_size = "1G"
memory_budget = "16G"
verify = "full"
allow_plain = true
allow_other = true
foreground = true
policy = "/etc/ctfs/policy.rego"
labels = { env = "prod", site = "fra1" }
audit_log = "/var/log/ctfs/audit.jsonl"
hide_denied = true
policy_cache_ttl = 30
threads = 8
log_level = "debug"
log_file = "/var/log/ctfs/llama.log"
strict = true
follow = ["/var/cache/hf/models--acme--llama"]
model_pubkey = "/etc/ctfs/trust/publisher.pub.pem"
"""
    assert {line.split(" =")[0] for line in text.splitlines() if line} == {
        f.name for f in dataclasses.fields(MountConfig)}, "every option can be set in the file"
    config = load_config(write(tmp_path, text))
    assert config == MountConfig(
        source="/srv/encrypted/llama", mountpoint="/srv/models/llama",
        keys=["/etc/ctfs/keys/a.jwk", "/etc/ctfs/keys"], trust=["/etc/ctfs/trust/publisher.jwk"],
        key_command="vault-jwk --role ctfs", allow_jku=["https://keys.example.com/"],
        insecure_key_perms=True, cache_size=2**30, memory_budget=16 * 2**30, verify="full", allow_plain=True,
        allow_other=True,
        foreground=True, policy="/etc/ctfs/policy.rego", labels={"env": "prod", "site": "fra1"},
        audit_log="/var/log/ctfs/audit.jsonl", hide_denied=True, policy_cache_ttl=30.0, threads=8,
        log_level="debug", log_file="/var/log/ctfs/llama.log", strict=True,
        follow=["/var/cache/hf/models--acme--llama"], model_pubkey="/etc/ctfs/trust/publisher.pub.pem",
    )
    assert isinstance(config.policy_cache_ttl, float)


@pytest.mark.parametrize(("text", "size"), [
    (0, 0), (4096, 4096), ("4096", 4096), ("512B", 512), ("64K", 64 * 2**10), ("64KiB", 64 * 2**10),
    ("512M", 512 * 2**20), ("512m", 512 * 2**20), ("1G", 2**30), ("1 GiB", 2**30), ("1.5G", 3 * 2**29),
    ("2T", 2 * 2**40), ("1.3K", 1331),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1X", "512MB", "1GB", "-1", "1e9", "1 G B", -1, True, 1.5, None])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_cache_size_as_bytes(tmp_path):
    assert load_config(write(tmp_path, MINIMAL + "cache_size = 1048576\n")).cache_size == 2**20


def test_relative_paths_are_taken_from_the_files_directory(tmp_path, monkeypatch):
    etc = tmp_path / "etc" / "ctfs"
    etc.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = load_config(write(etc, """
source = "../../srv/encrypted/llama"
mountpoint = "/srv/models/llama"
keys = ["keys/llama.jwks"]
trust = ["trust/publisher.jwk"]
policy = "policy/llama.rego"
audit_log = "audit.log"
log_file = "llama.log"
key_command = "bin/get-key --kid"
allow_jku = ["keys/"]
model_pubkey = "trust/publisher.pub.pem"
"""))
    assert config.source == str(tmp_path / "srv" / "encrypted" / "llama")
    assert config.mountpoint == "/srv/models/llama"
    assert config.keys == [str(etc / "keys" / "llama.jwks")]
    assert config.trust == [str(etc / "trust" / "publisher.jwk")]
    assert config.policy == str(etc / "policy" / "llama.rego")
    assert config.audit_log == str(etc / "audit.log")
    assert config.log_file == str(etc / "llama.log")
    assert config.model_pubkey == str(etc / "trust" / "publisher.pub.pem")
    # A command line and URL prefixes are not paths.
    assert config.key_command == "bin/get-key --kid"
    assert config.allow_jku == ["keys/"]


def test_audit_to_the_journal_is_not_a_path(tmp_path):
    assert load_config(write(tmp_path, MINIMAL + 'audit_log = "journal"\n')).audit_log == "journal"


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(write(tmp_path, 'source = "~/enc"\nmountpoint = "~/mnt"\n'))
    assert (config.source, config.mountpoint) == (str(tmp_path / "enc"), str(tmp_path / "mnt"))


def test_flags_given_win_over_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, MINIMAL + 'cache_size = "1G"\nverify = "full"\nallow_other = true\nkeys = ["/a"]')
    config = load_config(path, {"cache_size": "2G", "allow_other": False, "keys": ["b.jwk"], "threads": 4})
    assert config.cache_size == 2 * 2**30
    assert config.allow_other is False
    # Paths typed on the command line are relative to where they were typed.
    assert config.keys == [str(tmp_path / "b.jwk")]
    assert config.threads == 4
    assert config.verify == "full"


def test_flags_not_given_leave_the_file_alone(tmp_path):
    path = write(tmp_path, MINIMAL + 'verify = "full"\nallow_other = true\nkeys = ["/a"]\n')
    # How a CLI reports flags left off: None, or an empty tuple for a repeatable flag.
    config = load_config(path, {"verify": None, "allow_other": None, "keys": (), "trust": [], "policy": None})
    assert (config.verify, config.allow_other, config.keys) == ("full", True, ["/a"])


def test_source_and_mountpoint_may_come_from_the_command_line(tmp_path):
    path = write(tmp_path, 'cache_size = "1G"\n')
    config = load_config(path, {"source": "/enc", "mountpoint": "/mnt"})
    assert (config.source, config.mountpoint, config.cache_size) == ("/enc", "/mnt", 2**30)


def test_config_from_options_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_from_options({"source": "enc", "mountpoint": "mnt", "cache_size": "64M", "verify": None})
    assert config == MountConfig(source=str(tmp_path / "enc"), mountpoint=str(tmp_path / "mnt"),
                                 cache_size=64 * 2**20)


def test_the_config_is_immutable(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache_size = 1


@pytest.mark.parametrize(("line", "key", "reason"), [
    ("cache-size = 1", "cache-size", "not a mount option (did you mean cache_size?)"),
    ("colour = true", "colour", "not a mount option"),
    ("allow_other = 1", "allow_other", "expected true or false, got an integer"),
    ('allow_other = "yes"', "allow_other", "expected true or false, got a string"),
    ('keys = "/etc/ctfs/keys"', "keys", "expected an array of strings, got a string"),
    ("keys = [1]", "keys", "expected a string, got an integer"),
    ('keys = [""]', "keys", "must not be empty"),
    ('cache_size = "lots"', "cache_size", "'lots' is not a size"),
    ("cache_size = 0", "cache_size", "must be larger than 0"),
    ("cache_size = 1.5", "cache_size", "expected a size, got a number"),
    ('verify = "always"', "verify", "'always' is not one of open, full"),
    ('log_level = "INFO"', "log_level", "'INFO' is not one of debug, info, warning, error"),
    ("threads = 0", "threads", "0 is below 1"),
    ("threads = 2.0", "threads", "expected an integer, got a number"),
    ("policy_cache_ttl = -1", "policy_cache_ttl", "-1 is not a duration"),
    ("policy_cache_ttl = inf", "policy_cache_ttl", "inf is not a duration"),
    ('policy_cache_ttl = "5s"', "policy_cache_ttl", "expected a number of seconds, got a string"),
    ("labels = { env = 1 }", "labels", "label 'env': expected a string, got an integer"),
    ('labels = "env=prod"', "labels", "expected a table of strings, got a string"),
    ("key_command = 1979-05-27", "key_command", "expected a string, got date"),
    ("[mount]\nthreads = 2", "mount", "not a mount option"),
])
def test_strict_errors_name_the_file_and_key(tmp_path, line, key, reason):
    path = write(tmp_path, MINIMAL + line + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: {key}: {reason}")


def test_a_bad_flag_is_named_as_a_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: --cache-size: '12X' is not a size"):
        load_config(write(tmp_path, MINIMAL), {"cache_size": "12X"})
    with pytest.raises(ConfigError, match=r"^command line: --verify: 'paranoid' is not one of open, full$"):
        config_from_options({"source": "/e", "mountpoint": "/m", "verify": "paranoid"})


def test_missing_source_or_mountpoint(tmp_path):
    path = write(tmp_path, 'source = "/enc"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: missing mountpoint$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^command line: missing source and mountpoint$"):
        config_from_options({})


def test_unreadable_and_malformed_files(tmp_path):
    missing = tmp_path / "absent.toml"
    expected = rf"^{re.escape(str(missing))}: cannot read: No such file or directory$"
    with pytest.raises(ConfigError, match=expected):
        load_config(missing)
    broken = write(tmp_path, 'source = "/enc\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(broken))}: not valid TOML: .*line 1"):
        load_config(broken)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"source = '\xff'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(binary)


def test_config_errors_are_ctfs_errors():
    assert issubclass(ConfigError, CtfsError)
