"""Mount options: one MountConfig from a strict TOML file (/etc/ctfs/NAME.toml) and command-line flags."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from ctfs.errors import CtfsError

MiB = 1 << 20
VERIFY_MODES = ("open", "full")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUDIT_TO_JOURNAL = "journal"


class ConfigError(CtfsError):
    """A mount configuration is unreadable or invalid; the message names the file (or flag) and key."""


@dataclass(frozen=True)
class MountConfig:
    """Every option of `ctfs mount`; each field is also a TOML key and a flag (`--cache-size` for cache_size).

    Build it with load_config() or config_from_options(), which validate and make paths absolute.
    """

    source: str
    mountpoint: str
    # Master keys: JWK or JWK Set files, or directories of them. $CREDENTIALS_DIRECTORY is read by
    # the key chain on its own, so a systemd service usually lists none here.
    keys: list[str] = field(default_factory=list)
    # Verify keys of trusted signers, kept apart from decryption keys so a server can trust a
    # publisher without holding its signing key.
    trust: list[str] = field(default_factory=list)
    # Run with the kid and alg, prints a JWK: the plug point for a KMS or key broker.
    key_command: str | None = None
    # URL prefixes a header's jku may name; anything else in jku is ignored.
    allow_jku: list[str] = field(default_factory=list)
    insecure_key_perms: bool = False
    # Bytes of decrypted chunks kept in memory, shared by all open files.
    cache_size: int = 256 * MiB
    # Bytes of whole decrypted files held in memory and read by the kernel itself (FUSE passthrough,
    # when the kernel grants it); 0: none, every file goes through the chunk cache.
    memory_budget: int = 0
    # "full" checks every tag at first open: mmap readers then never meet a mid-file EIO (SIGBUS).
    verify: str = "open"
    # Plain safetensors in the source are a downgrade, refused unless asked for.
    allow_plain: bool = False
    # Needed when the reader (e.g. vLLM under its own User=) is not the user that mounts.
    allow_other: bool = False
    foreground: bool = False
    # The operator's Rego policy deciding who may open which file.
    policy: str | None = None
    # Facts about this host the policy can match on (e.g. {"env": "prod"}).
    labels: dict[str, str] = field(default_factory=dict)
    # A file path, or "journal" for the systemd journal.
    audit_log: str | None = None
    # Denied files vanish from listings instead of failing at open.
    hide_denied: bool = False
    # Seconds a policy decision is reused before it is evaluated again.
    policy_cache_ttl: float = 5.0
    # Roots besides the source that symlinks in it may point into (a Hugging Face cache's models--org--name).
    follow: list[str] = field(default_factory=list)
    # FUSE worker threads; None lets the daemon choose.
    threads: int | None = None
    log_level: str = "info"
    # Where a background mount's daemon writes its log; None: default_log_file(mountpoint).
    log_file: str | None = None
    # Refuse to start when some encrypted file's master key or signer is missing, instead of warning.
    strict: bool = False
    # The pinned public key (PEM) of whoever signs the source directory's model.sig (OpenSSF model
    # signing); when set, only the files it lists, with the bytes it records, may be served.
    model_pubkey: str | None = None


_REQUIRED = tuple(f.name for f in dataclasses.fields(MountConfig)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(?:([KMGT])(?:iB)?|B)?\s*", re.IGNORECASE)
_UNIT_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like "512M", "1.5G", "64KiB" (binary units); raises ValueError.

    "MB"/"GB" are refused rather than guessed: they mean powers of ten to some and of two to others.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a size, got {_type_name(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size (write bytes, or a number with K, M, G, T or KiB … TiB)")
    number, unit = match.groups()
    return math.floor(Decimal(number) * (1 << _UNIT_SHIFT[(unit or "").lower()]))


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    if not value:
        raise ValueError("must not be empty")
    return value


def _strings(value: object) -> list[str]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected an array of strings, got {_type_name(value)}")
    return [_string(item) for item in value]


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if _string(value) not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def _cache_size(value: object) -> int:
    size = parse_size(value)
    if size == 0:
        raise ValueError("must be larger than 0")
    return size


def _threads(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_type_name(value)}")
    if value < 1:
        raise ValueError(f"{value} is below 1")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number of seconds, got {_type_name(value)}")
    if not 0 <= value < math.inf:
        raise ValueError(f"{value} is not a duration")
    return float(value)


def _labels(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a table of strings, got {_type_name(value)}")
    for name, text in value.items():
        if not isinstance(text, str):
            raise ValueError(f"label {name!r}: expected a string, got {_type_name(text)}")
    return dict(value)


_CHECKS: dict[str, Callable[[object], object]] = {
    "source": _string, "mountpoint": _string, "keys": _strings, "trust": _strings,
    "key_command": _string, "allow_jku": _strings, "insecure_key_perms": _boolean,
    "cache_size": _cache_size, "memory_budget": parse_size, "verify": _choice(VERIFY_MODES), "allow_plain": _boolean,
    "allow_other": _boolean, "foreground": _boolean, "policy": _string, "labels": _labels,
    "audit_log": _string, "hide_denied": _boolean, "policy_cache_ttl": _seconds,
    "threads": _threads, "log_level": _choice(LOG_LEVELS), "log_file": _string, "strict": _boolean,
    "follow": _strings, "model_pubkey": _string,
}
# Fields naming local files; key_command and allow_jku are a command line and URL prefixes, not paths.
_PATH_FIELDS = frozenset({"source", "mountpoint", "keys", "trust", "policy", "audit_log", "log_file", "follow",
                          "model_pubkey"})


def default_log_file(mountpoint: str) -> str:
    """Where a background mount logs without log_file: under $XDG_STATE_HOME/ctfs when that is set,
    else /var/log/ctfs for root and ~/.local/state/ctfs for anyone else, named after the mount point."""
    state_home = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(state_home):
        directory = Path(state_home, "ctfs")
    elif os.geteuid() == 0:
        directory = Path("/var/log/ctfs")
    else:
        directory = Path.home() / ".local" / "state" / "ctfs"
    name = os.path.abspath(mountpoint).strip("/").replace("/", "-") or "root"
    return str(directory / f"{name}.log")


def _absolute(path: str, base_dir: Path) -> str:
    return os.path.abspath(base_dir / os.path.expanduser(path))


def _resolve_paths(name: str, value: object, base_dir: Path) -> object:
    if name not in _PATH_FIELDS or (name == "audit_log" and value == AUDIT_TO_JOURNAL):
        return value
    if isinstance(value, list):
        return [_absolute(item, base_dir) for item in value]
    return _absolute(value, base_dir)


def _validated(
    values: Mapping[str, object], base_dir: Path, describe: Callable[[str], str]
) -> dict[str, object]:
    """Checked, path-resolved values; `describe(key)` names where a bad key came from."""
    result = {}
    for name, value in values.items():
        if name not in _CHECKS:
            hint = difflib.get_close_matches(name.replace("-", "_"), _CHECKS, n=1)
            suggestion = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"{describe(name)}: not a mount option{suggestion}")
        try:
            checked = _CHECKS[name](value)
        except ValueError as exc:
            raise ConfigError(f"{describe(name)}: {exc}") from None
        result[name] = _resolve_paths(name, checked, base_dir)
    return result


def _given(options: Mapping[str, object]) -> dict[str, object]:
    # A flag left off arrives as None (or an empty multiple-value flag): it must not hide the file's value.
    return {name: value for name, value in options.items() if value not in (None, (), [])}


def _flag(name: str) -> str:
    return f"command line: --{name.replace('_', '-')}"


def _build(values: dict[str, object], where: str) -> MountConfig:
    missing = [name for name in _REQUIRED if name not in values]
    if missing:
        raise ConfigError(f"{where}: missing {' and '.join(missing)}")
    return MountConfig(**values)


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, object] | None = None) -> MountConfig:
    """The mount options of a TOML file, with `overrides` (flags given on the command line) winning.

    Relative paths in the file are taken from the file's directory; those in overrides from the
    current directory, where the user typed them. A None override means "flag not given".
    """
    path = Path(path).absolute()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values = _validated(data, path.parent, lambda key: f"{path}: {key}")
    values.update(_validated(_given(overrides or {}), Path.cwd(), _flag))
    return _build(values, str(path))


def config_from_options(options: Mapping[str, object]) -> MountConfig:
    """The mount options of a command line without --config; relative paths from the current directory."""
    return _build(_validated(_given(options), Path.cwd(), _flag), "command line")
