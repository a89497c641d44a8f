"""Wrap and unwrap per-tensor data keys (DEKs) under the master key: one AEAD call, no associated data."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ctfs.crypto.aead import new_aead, open_, seal
from ctfs.crypto.constants import ENC_KEY_LENGTHS, NONCE_SIZE


@dataclass(frozen=True)
class WrappedKey:
    wrapped_key: bytes
    key_iv: bytes
    key_tag: bytes


def new_dek(alg: str) -> bytes:
    """A fresh random data key, as long as the algorithm's key."""
    return os.urandom(ENC_KEY_LENGTHS[alg])


def wrap_dek(alg: str, master_key: bytes, dek: bytes) -> WrappedKey:
    key_iv = os.urandom(NONCE_SIZE)
    wrapped, tag = seal(new_aead(alg, master_key), key_iv, dek)
    return WrappedKey(wrapped, key_iv, tag)


def unwrap_dek(alg: str, master_key: bytes, wrapped: WrappedKey, what: str) -> bytes:
    """Raises IntegrityError for a wrong master key or a tampered wrap."""
    return open_(new_aead(alg, master_key), wrapped.key_iv, wrapped.wrapped_key, wrapped.key_tag, what)
