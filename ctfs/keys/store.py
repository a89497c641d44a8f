"""Look keys up by the header's key descriptors: decryption keys, and signers from a separate trust store."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ctfs.errors import KeyUnavailable
from ctfs.format.encryption import KeyRef
from ctfs.keys.jwk import EncryptionKey, Key, SigningKey

SIGN_ALG = "ed25519"  # the normalised sign alg of every header (KeyRef.alg)


class KeySource(Protocol):
    """What a reader needs: a master key for a descriptor, and the trusted verify keys for a signer."""

    def encryption_key(self, ref: KeyRef) -> EncryptionKey: ...

    def trusted_verify_keys(self, ref: KeyRef) -> list[bytes]: ...


def key_alg(key: Key) -> str:
    return key.alg if isinstance(key, EncryptionKey) else SIGN_ALG


def matches(key: Key, ref: KeyRef) -> bool:
    """A key answers a descriptor when its algorithm (and so its kty) agrees and, if the descriptor
    names a kid, its kid does: the one lookup rule of every key source."""
    return key_alg(key) == ref.alg and (ref.kid is None or key.kid == ref.kid)


def _by_kid(keys: Iterable[Key], kid: str | None) -> list[Key]:
    keys = list(keys)
    return keys if kid is None else [k for k in keys if k.kid == kid]


class KeyStore:
    """Keys held in memory. Verify keys come only from `trusted` (by default the public halves of the
    signing keys given): a header's kid narrows the choice among trusted keys, it never adds one."""

    def __init__(self, keys: Iterable[Key], trusted: Iterable[SigningKey] | None = None):
        self.keys = list(keys)
        signing = [k for k in self.keys if isinstance(k, SigningKey)]
        self.trusted = [k.verify_only() for k in (signing if trusted is None else trusted)]

    @property
    def encryption_keys(self) -> list[EncryptionKey]:
        return [k for k in self.keys if isinstance(k, EncryptionKey)]

    def encryption_key(self, ref: KeyRef) -> EncryptionKey:
        candidates = _by_kid(self.encryption_keys, ref.kid)
        if not candidates:
            raise KeyUnavailable(f"no encryption key with kid {ref.kid!r}" if ref.kid else "no encryption key")
        matching = [k for k in candidates if k.alg == ref.alg]
        if not matching:
            raise KeyUnavailable(f"key {ref.kid!r} is {candidates[0].alg} but the file needs {ref.alg}")
        return matching[0]

    def trusted_verify_keys(self, ref: KeyRef) -> list[bytes]:
        return [k.public for k in _by_kid(self.trusted, ref.kid)]

    def signing_key(self) -> SigningKey:
        """The key that signs new files: the first signing key with its private half."""
        for key in self.keys:
            if isinstance(key, SigningKey) and key.seed is not None:
                return key
        raise KeyUnavailable("no Ed25519 signing key with a private part ('d')")

    def first_encryption_key(self) -> EncryptionKey:
        if not self.encryption_keys:
            raise KeyUnavailable("no encryption key")
        return self.encryption_keys[0]
