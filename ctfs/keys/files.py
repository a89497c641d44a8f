"""Keys from the files and directories a user names with --keys / --trust."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ctfs.keys.jwk import Key, load_key_file

KEY_FILE_SUFFIXES = (".jwk", ".json")


def key_files(path: Path) -> list[Path]:
    """A file names itself; a directory names its `*.jwk` and `*.json` files."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in KEY_FILE_SUFFIXES and p.is_file())
    return [path]


def load_key_paths(paths: Iterable[str], *, check_perms: bool = True) -> list[Key]:
    keys: list[Key] = []
    for raw in paths:
        for file in key_files(Path(raw)):
            keys.extend(load_key_file(file, check_perms=check_perms))
    return keys
