"""Before a mount serves: find the encrypted files in its source that its keys cannot open."""

from __future__ import annotations

from pathlib import Path

from ctfs.daemon.source import ModelSource
from ctfs.errors import FormatError, IntegrityError, KeyUnavailable, UntrustedSigner
from ctfs.files.encrypted import EncryptedFile
from ctfs.keys.store import KeySource

# The line names this many files; the rest are counted.
NAMED_FILES = 3


def unopenable_files(source: ModelSource) -> tuple[dict[str, str], int]:
    """({file relative to the source: why its keys cannot open it}, number of encrypted files seen), over
    the files the mount serves (symlinked directories in allowed roots included).

    Each file's header is read and its signature checked against the trusted signers before its master
    key is asked for (a key command only ever sees signed kids), and its data keys are unwrapped; no
    tensor data is read. Files that no longer parse are not counted: opening them fails for reasons other
    than keys."""
    problems: dict[str, str] = {}
    encrypted = 0
    for path, entry in source.encrypted_files():
        try:
            problem = _problem(Path(entry.real), source.keys)
        except (FormatError, OSError):
            continue
        encrypted += 1
        if problem:
            problems[path.lstrip("/")] = problem
    return problems, encrypted


def _problem(path: Path, keys: KeySource) -> str | None:
    try:
        opened = EncryptedFile(path, keys)
    except UntrustedSigner:
        return "signer not trusted"
    except IntegrityError:
        return "signature does not verify with the trusted signers"
    except KeyUnavailable:
        return "master key missing"
    with opened:
        try:
            # A master key under the right kid may still be the wrong key: only unwrapping says so.
            opened.unwrap_all()
        except IntegrityError:
            return "wrong master key"
    return None


def describe_unopenable(problems: dict[str, str], encrypted: int) -> str:
    """One line naming the first few files and why, and how many more."""
    named = [f"{name} ({why})" for name, why in list(problems.items())[:NAMED_FILES]]
    more = len(problems) - len(named)
    return (f"{len(problems)} of {encrypted} encrypted file(s) cannot be opened with these keys: "
            + ", ".join(named) + (f" and {more} more" if more else ""))
