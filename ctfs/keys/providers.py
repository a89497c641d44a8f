"""Where keys come from: key files, systemd credentials, CRYPTOTENSOR_KEYS, a key command, allow-listed jku files."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from ctfs.errors import CtfsError, KeyUnavailable
from ctfs.format.encryption import KeyRef
from ctfs.keys.jwk import Key, load_key_file, parse_jwk_document
from ctfs.keys.store import SIGN_ALG, matches

log = logging.getLogger("ctfs.keys")

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
REFERENCE_KEYS_ENV = "CRYPTOTENSOR_KEYS"
KEY_COMMAND_TIMEOUT = 10.0
# A JWK Set of a few keys is well under this; more means the command is printing something else.
KEY_COMMAND_MAX_OUTPUT = 64 * 1024
# The whole environment a key command gets: enough to run and find its own configuration, never
# our keys (CRYPTOTENSOR_KEYS, CREDENTIALS_DIRECTORY) nor whatever else the daemon inherited.
KEY_COMMAND_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")


class KeyProvider(Protocol):
    """One source of keys, asked by descriptor (kid, alg and so kty; jku for the jku provider)."""

    name: str  # what logs and errors call it

    def lookup(self, ref: KeyRef) -> list[Key]: ...


@dataclass
class StaticKeys:
    """Keys read once, when the chain is built."""

    name: str
    keys: list[Key]

    def lookup(self, ref: KeyRef) -> list[Key]:
        return [k for k in self.keys if matches(k, ref)]


def _is_jwk_document(doc: object) -> bool:
    return isinstance(doc, list) or isinstance(doc, dict) and ("kty" in doc or "keys" in doc)


def _jwk_document(path: Path) -> object | None:
    """The credential's JSON if it is a JWK document; None (logged) for any other credential."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise KeyUnavailable(f"credential {path.name}: cannot read ({exc.strerror})") from None
    except ValueError:
        log.info("credential %s is not JSON; not a key, skipped", path.name)
        return None
    if not _is_jwk_document(doc):
        log.info("credential %s is not a JWK or JWK Set; skipped", path.name)
        return None
    return doc


def credential_keys() -> StaticKeys | None:
    """Every JWK (or JWK Set) file in $CREDENTIALS_DIRECTORY; other credentials are left alone.

    Modes are not checked: systemd makes the directory private to the service and grants the
    service user read access through an ACL, which shows as group bits."""
    directory = os.environ.get(CREDENTIALS_ENV)
    if not directory:
        return None
    try:
        paths = sorted(p for p in Path(directory).iterdir() if p.is_file())
    except OSError as exc:
        raise KeyUnavailable(f"{CREDENTIALS_ENV} {directory}: cannot list ({exc.strerror})") from None
    keys: list[Key] = []
    for path in paths:
        doc = _jwk_document(path)
        try:
            keys.extend(parse_jwk_document(doc) if doc is not None else [])
        except KeyUnavailable as exc:
            raise KeyUnavailable(f"credential {path.name}: {exc}") from None
    return StaticKeys("systemd credentials", keys)


def environment_keys() -> StaticKeys | None:
    """CRYPTOTENSOR_KEYS, read as the reference library reads it: a JWK Set or a single JWK as JSON."""
    text = os.environ.get(REFERENCE_KEYS_ENV)
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        raise KeyUnavailable(f"{REFERENCE_KEYS_ENV} is not JSON (expected a JWK or a JWK Set)") from None
    try:
        return StaticKeys(REFERENCE_KEYS_ENV, parse_jwk_document(doc))
    except KeyUnavailable as exc:
        raise KeyUnavailable(f"{REFERENCE_KEYS_ENV}: {exc}") from None


def _passable_argument(text: str) -> bool:
    # A kid becomes an argument of someone else's program: no option look-alikes, no control characters.
    return not text.startswith("-") and text.isprintable()


class KeyCommand:
    """An external program that prints the master key for a kid: `CMD... KID ALG` → a JWK on stdout.

    Asked for decryption keys only, and only once a file's header has been verified (the reader
    checks the signature before it asks for the master key), so the kid it gets is signed. It is
    never asked for verify keys: a signer lookup happens before the header is authenticated."""

    name = "key command"

    def __init__(self, command: str, timeout: float = KEY_COMMAND_TIMEOUT):
        self.argv = shlex.split(command)
        if not self.argv:
            raise CtfsError("--key-command is empty")
        self.timeout = timeout

    def lookup(self, ref: KeyRef) -> list[Key]:
        if ref.alg == SIGN_ALG:
            return []
        kid = ref.kid or ""
        if not _passable_argument(kid):
            log.warning("kid %r is not passed to the key command (leading '-' or control characters)", kid)
            return []
        output = self._run([*self.argv, kid, ref.alg], kid)
        return [] if output is None else self._keys_in(output, ref)

    def _run(self, argv: list[str], kid: str) -> bytes | None:
        env = {name: os.environ[name] for name in KEY_COMMAND_ENV if name in os.environ}
        try:
            # Its own session, so a timeout kills whatever it started too and the pipe closes.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                                    close_fds=True, start_new_session=True)
        except OSError as exc:
            log.warning("key command %s cannot run: %s", argv[0], exc.strerror)
            return None
        try:
            output, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            log.warning("key command timed out after %g s for kid %r", self.timeout, kid)
            return None
        if proc.returncode != 0:
            log.info("key command has no key %r (exit status %d)", kid, proc.returncode)
            return None
        if len(output) > KEY_COMMAND_MAX_OUTPUT:
            log.warning("key command printed %d bytes for kid %r; expected one JWK", len(output), kid)
            return None
        return output

    def _keys_in(self, output: bytes, ref: KeyRef) -> list[Key]:
        try:
            keys = parse_jwk_document(json.loads(output))
        except ValueError:
            log.warning("key command printed no JSON for kid %r", ref.kid)
            return []
        except KeyUnavailable as exc:
            log.warning("key command printed an unusable JWK for kid %r: %s", ref.kid, exc)
            return []
        # A JWK without a kid answers for the kid that was asked.
        keys = [k if k.kid is not None else dataclasses.replace(k, kid=ref.kid) for k in keys]
        found = [k for k in keys if matches(k, ref)]
        if not found:
            log.warning("key command printed no %s key with kid %r", ref.alg, ref.kid)
        return found


def file_url_path(url: str) -> Path | None:
    """The absolute local path of a file:// URL with symlinks and `..` resolved; None for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return None
    path = unquote(parts.path)
    return Path(os.path.realpath(path)) if os.path.isabs(path) else None


class JkuFiles:
    """Decryption keys from the file a verified header's `jku` names, if it lies under an allowed prefix.

    Prefixes are compared as paths after resolving symlinks and `..`, so `file:///srv/keys` allows
    `/srv/keys/a.jwk` but not `/srv/keys-evil/a.jwk` nor `/srv/keys/../x`. Only file:// is ever
    read: nothing is fetched from a network, and a jku never supplies a verify key."""

    name = "jku"

    def __init__(self, allowed_prefixes: list[str], check_perms: bool):
        self.roots = [self._root(prefix) for prefix in allowed_prefixes]
        self.check_perms = check_perms

    @staticmethod
    def _root(prefix: str) -> Path:
        root = file_url_path(prefix)
        if root is None:
            raise CtfsError(f"--allow-jku {prefix}: only absolute file:// prefixes are allowed; "
                            "ctfs never fetches keys from a network")
        return root

    def allows(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self.roots)

    def lookup(self, ref: KeyRef) -> list[Key]:
        if ref.jku is None or ref.alg == SIGN_ALG:
            return []
        path = file_url_path(ref.jku)
        if path is None or not self.allows(path):
            log.info("jku %s is not under an allowed prefix; ignored", ref.jku)
            return []
        return [k for k in load_key_file(path, check_perms=self.check_perms) if matches(k, ref)]
