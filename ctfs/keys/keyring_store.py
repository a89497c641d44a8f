"""Keys in the OS keyring (the `keyring` package): one entry per kid, for workstations."""

from __future__ import annotations

import json
import logging
from typing import Any

from ctfs.errors import CtfsError, KeyUnavailable
from ctfs.format.encryption import KeyRef
from ctfs.keys.jwk import Key, parse_jwk, to_reference_jwk
from ctfs.keys.store import matches

log = logging.getLogger("ctfs.keys")

SERVICE = "ctfs"  # entry (SERVICE, kid) holds that key's JWK
# Keyrings cannot be enumerated in general: the kids we stored are listed in an entry of their own.
INDEX_SERVICE = "ctfs-index"
INDEX_USERNAME = "kids"
NO_BACKEND = ("no usable keyring backend (usual on a headless server): use --keys, systemd credentials "
              "or --key-command there, or configure a keyring backend")


class KeyringUnavailable(CtfsError):
    """The keyring extra is not installed, or no backend can store secrets here."""


def usable_backend() -> Any:
    """The keyring backend in effect, or KeyringUnavailable with one line saying why."""
    try:
        import keyring
        from keyring.backends import fail, null
    except ImportError:
        raise KeyringUnavailable("the keyring extra is not installed (pip install 'ctfs[keyring]')") from None
    backend = keyring.get_keyring()
    if isinstance(backend, fail.Keyring | null.Keyring):
        raise KeyringUnavailable(NO_BACKEND)
    return backend


def _kids(backend: Any) -> list[str]:
    stored = backend.get_password(INDEX_SERVICE, INDEX_USERNAME)
    return json.loads(stored) if stored else []


def _save_kids(backend: Any, kids: list[str]) -> None:
    if kids:
        backend.set_password(INDEX_SERVICE, INDEX_USERNAME, json.dumps(sorted(set(kids))))
    else:
        backend.delete_password(INDEX_SERVICE, INDEX_USERNAME)


def _stored_key(backend: Any, kid: str) -> Key | None:
    stored = backend.get_password(SERVICE, kid)
    if stored is None:
        return None
    try:
        return parse_jwk(json.loads(stored))
    except (ValueError, KeyUnavailable):
        raise KeyUnavailable(f"keyring entry {kid!r} is not a valid JWK") from None


def import_keys(backend: Any, keys: list[Key]) -> list[str]:
    """Store each key under its kid; a key without a kid, or a kid already stored, is refused."""
    kids = [key.kid for key in keys]
    if None in kids:
        raise KeyUnavailable("keyring entries are named by kid: every key to import needs a kid")
    if len(set(kids)) != len(kids):
        raise KeyUnavailable("the keys to import repeat a kid")
    present = [kid for kid in kids if backend.get_password(SERVICE, kid) is not None]
    if present:
        raise KeyUnavailable(f"kid {present[0]!r} is already in the keyring; delete it first")
    for key in keys:
        backend.set_password(SERVICE, key.kid, json.dumps(to_reference_jwk(key)))
    _save_kids(backend, _kids(backend) + kids)
    return kids


def list_keys(backend: Any) -> list[tuple[str, Key | None]]:
    """(kid, key) for every kid we stored; key is None when its entry was removed behind our back."""
    return [(kid, _stored_key(backend, kid)) for kid in _kids(backend)]


def delete_key(backend: Any, kid: str) -> None:
    if backend.get_password(SERVICE, kid) is None:
        raise KeyUnavailable(f"no key {kid!r} in the keyring")
    backend.delete_password(SERVICE, kid)
    _save_kids(backend, [k for k in _kids(backend) if k != kid])


class KeyringKeys:
    """The keyring as a provider: asked per kid, lazily; a keyring error means "no key here"."""

    name = "keyring"

    def __init__(self, backend: Any):
        self.backend = backend

    def lookup(self, ref: KeyRef) -> list[Key]:
        if ref.kid is None:
            return []
        from keyring.errors import KeyringError

        try:
            key = _stored_key(self.backend, ref.kid)
        except KeyringError as exc:
            log.warning("keyring lookup of kid %r failed: %s", ref.kid, exc)
            return []
        return [key] if key is not None and matches(key, ref) else []


def keyring_keys() -> KeyringKeys | None:
    """The keyring provider, or None (logged at debug level) where no backend is usable."""
    try:
        return KeyringKeys(usable_backend())
    except KeyringUnavailable as exc:
        log.debug("keyring not used: %s", exc)
        return None
