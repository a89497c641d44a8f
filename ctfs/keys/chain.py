"""One key lookup over every provider, in a fixed order, with the trust store kept apart."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

from ctfs.errors import CtfsError, KeyUnavailable
from ctfs.format.encryption import KeyRef
from ctfs.keys.files import load_key_paths
from ctfs.keys.jwk import EncryptionKey, Key, SigningKey
from ctfs.keys.keyring_store import keyring_keys
from ctfs.keys.providers import (
    JkuFiles,
    KeyCommand,
    KeyProvider,
    StaticKeys,
    credential_keys,
    environment_keys,
)
from ctfs.keys.store import KeyStore

log = logging.getLogger("ctfs.keys")

# A kid no provider knows is asked again only after this long: a reader retrying an open must not
# run the key command on every attempt. A reload starts afresh.
MISS_RETRY_SECONDS = 30.0


class KeyChain:
    """A KeySource over providers tried in order; the first that has a matching key answers.

    Decryption keys come from `providers`; verify keys only from `trust` (the --trust files, or the
    providers that hold signing keys). Answers are cached for the chain's life, misses for
    MISS_RETRY_SECONDS; a mount's reload builds a new chain."""

    def __init__(self, providers: Sequence[KeyProvider], trust: Sequence[KeyProvider]):
        self.providers = list(providers)
        self.trust = list(trust)
        # The keys known up front, in provider order: what `ctfs encrypt` signs and encrypts with.
        self.static = KeyStore([k for p in self.providers if isinstance(p, StaticKeys) for k in p.keys])
        self._found: dict[tuple[str, KeyRef], list[Key]] = {}
        self._missed: dict[tuple[str, KeyRef], float] = {}
        self._cache_lock = threading.Lock()
        # Held while providers are asked, so concurrent opens run a key command once per kid.
        self._lookup_lock = threading.Lock()

    def encryption_key(self, ref: KeyRef) -> EncryptionKey:
        found = self._answer("decrypt", self.providers, ref)
        if not found:
            names = ", ".join(p.name for p in self.providers) or "no key source"
            kid = f"kid {ref.kid!r}" if ref.kid else "no kid"
            raise KeyUnavailable(f"no {ref.alg} encryption key with {kid} (asked: {names})")
        return found[0]

    def trusted_verify_keys(self, ref: KeyRef) -> list[bytes]:
        return [key.public for key in self._answer("trust", self.trust, ref)]

    def signing_key(self) -> SigningKey:
        return self.static.signing_key()

    def first_encryption_key(self) -> EncryptionKey:
        return self.static.first_encryption_key()

    def may_decrypt(self) -> bool:
        """Whether any provider could supply a master key (one that is asked per kid might)."""
        return _may_supply(self.providers, EncryptionKey)

    def may_verify(self) -> bool:
        """Whether any trusted signer is known or could be looked up."""
        return _may_supply(self.trust, SigningKey)

    def _answer(self, purpose: str, providers: list[KeyProvider], ref: KeyRef) -> list[Key]:
        slot = (purpose, ref)
        cached = self._cached(slot)
        if cached is not None:
            return cached
        with self._lookup_lock:
            cached = self._cached(slot)
            if cached is not None:
                return cached
            for provider in providers:
                found = provider.lookup(ref)
                if found:
                    log.info("%s key %s (%s) from %s", purpose, ref.kid or "(no kid)", ref.alg, provider.name)
                    with self._cache_lock:
                        self._found[slot] = found
                    return found
            with self._cache_lock:
                self._missed[slot] = time.monotonic()
            return []

    def _cached(self, slot: tuple[str, KeyRef]) -> list[Key] | None:
        """The remembered answer ([] for a recent miss), or None when the providers must be asked."""
        with self._cache_lock:
            if slot in self._found:
                return self._found[slot]
            missed = self._missed.get(slot)
        return [] if missed is not None and time.monotonic() - missed < MISS_RETRY_SECONDS else None


def _may_supply(providers: list[KeyProvider], kind: type) -> bool:
    return any(not isinstance(p, StaticKeys) or any(isinstance(k, kind) for k in p.keys) for p in providers)


def build_chain(
    keys: Sequence[str] = (),
    trust: Sequence[str] = (),
    key_command: str | None = None,
    allow_jku: Sequence[str] = (),
    *,
    check_perms: bool = True,
) -> KeyChain:
    """The chain, in its documented order (docs/keys.md): --keys, systemd credentials,
    CRYPTOTENSOR_KEYS, the keyring, the key command, then allow-listed jku files."""
    holders = [
        StaticKeys("--keys", load_key_paths(keys, check_perms=check_perms)),
        credential_keys(),
        environment_keys(),
        keyring_keys(),
    ]
    holders = [p for p in holders if p is not None]
    fetchers = [KeyCommand(key_command) if key_command else None,
                JkuFiles(list(allow_jku), check_perms) if allow_jku else None]
    providers = holders + [p for p in fetchers if p is not None]
    return KeyChain(providers, trust_providers(trust, holders))


@dataclass(frozen=True)
class KeyOptions:
    """The key options of every command and of the mount config, by their option names (docs/keys.md)."""

    keys: Sequence[str] = ()
    trust: Sequence[str] = ()
    key_command: str | None = None
    allow_jku: Sequence[str] = ()
    insecure_key_perms: bool = False

    @classmethod
    def of(cls, holder: object) -> KeyOptions:
        """The key options of anything that carries them as attributes of the same names (a MountConfig)."""
        return cls(**{f.name: getattr(holder, f.name) for f in fields(cls)})

    def chain(self) -> KeyChain:
        return build_chain(self.keys, self.trust, self.key_command, self.allow_jku,
                           check_perms=not self.insecure_key_perms)


def trust_providers(trust: Sequence[str], holders: list[KeyProvider]) -> list[KeyProvider]:
    """--trust alone when given; otherwise the providers that hold signing keys (never a command or a jku)."""
    if not trust:
        return holders
    pinned = [k.verify_only() for k in load_key_paths(trust, check_perms=False) if isinstance(k, SigningKey)]
    if not pinned:
        raise CtfsError("--trust names no Ed25519 verify key")
    return [StaticKeys("--trust", pinned)]
