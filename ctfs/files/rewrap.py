"""Rotate keys in place: re-wrap every data key under a new master key and re-sign; tensor bytes are copied as-is."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ctfs.crypto.keywrap import WrappedKey, unwrap_dek, wrap_dek
from ctfs.errors import CtfsError, IntegrityError, KeyUnavailable, PlainFileError
from ctfs.files.atomic import atomic_output, write_all
from ctfs.files.encrypt import signed_header, user_metadata
from ctfs.files.encrypted import EncryptedFile
from ctfs.files.modeldir import is_safetensors, walk_files
from ctfs.format.encryption import CryptoHeader, encode_crypto_metadata
from ctfs.format.serialize import file_prefix
from ctfs.keys.jwk import EncryptionKey, SigningKey, key_ref
from ctfs.keys.store import KeySource, KeyStore

# The data region is copied in blocks of this size: memory stays bounded whatever the file size.
COPY_BLOCK = 16 * 1024 * 1024

REWRAPPED = "rewrapped"
ALREADY_NEW = "already under the new keys"
PLAIN = "plain safetensors, skipped"


def new_master_key(new_keys: KeyStore, alg: str, label: str) -> EncryptionKey:
    """The new key of the file's algorithm: a rewrap keeps the data keys, so it cannot change algorithms."""
    for key in new_keys.encryption_keys:
        if key.alg == alg:
            return key
    offered = ", ".join(sorted({k.alg for k in new_keys.encryption_keys})) or "none"
    raise CtfsError(f"{label}: algorithm mismatch: the file uses {alg}, the new keys offer {offered} "
                    "(re-encrypt to change algorithms)")


def rewrapped_crypto(source: EncryptedFile, enc_key: EncryptionKey, sign_key: SigningKey) -> CryptoHeader:
    """The file's crypto header with every DEK wrapped under `enc_key` (fresh key_iv) and the new key
    descriptors; version, chunk size, IVs, tags and policy unchanged."""
    alg, old_master = source.crypto.enc.alg, source.master_key.key
    ciphers = {}
    for name, cipher in source.crypto.ciphers.items():
        wrapped = WrappedKey(cipher.wrapped_key, cipher.key_iv, cipher.key_tag)
        dek = unwrap_dek(alg, old_master, wrapped, f"{source.label}: data key of tensor {name!r}")
        rewrapped = wrap_dek(alg, enc_key.key, dek)
        ciphers[name] = replace(cipher, wrapped_key=rewrapped.wrapped_key, key_iv=rewrapped.key_iv,
                                key_tag=rewrapped.key_tag)
    return replace(source.crypto, enc=key_ref(enc_key), sign=key_ref(sign_key), ciphers=ciphers)


def _replace_file(target: Path, source: EncryptedFile, crypto: CryptoHeader, sign_key: SigningKey) -> None:
    """Write the new header and the untouched data region beside `target`, fsync, rename over it."""
    metadata = {**user_metadata(source.header), **encode_crypto_metadata(crypto)}
    prefix = file_prefix(signed_header(metadata, list(source.header.by_offset), sign_key))
    st = os.stat(target)
    size = source.header.data_size
    with atomic_output(target, stat.S_IMODE(st.st_mode)) as out:
        # Keep the owner when allowed (root rotating a service's files); otherwise the file is ours.
        with contextlib.suppress(PermissionError):
            os.fchown(out, st.st_uid, st.st_gid)
        write_all(out, prefix, 0)
        for offset in range(0, size, COPY_BLOCK):
            write_all(out, source.read_stored(offset, min(COPY_BLOCK, size - offset)), len(prefix) + offset)


def opens_with(path: Path, keys: KeyStore) -> bool:
    """Whether the file verifies and every data key unwraps under `keys`."""
    try:
        with EncryptedFile(path, keys) as ef:
            ef.unwrap_all()
    except CtfsError:
        return False
    return True


def rewrap_file(path: str | os.PathLike[str], old_keys: KeySource, new_keys: KeyStore) -> str:
    """Rewrap one file atomically: afterwards it holds the old content or the new, never a mix.

    A symlink is followed and its target replaced. A file that already opens with `new_keys` is left
    alone, so an interrupted rotation of a directory can simply be run again."""
    label = os.fspath(path)
    target = Path(os.path.realpath(path))
    try:
        with EncryptedFile(target, old_keys, label=label) as source:
            enc_key = new_master_key(new_keys, source.crypto.enc.alg, label)
            sign_key = new_keys.signing_key()
            _replace_file(target, source, rewrapped_crypto(source, enc_key, sign_key), sign_key)
    except (KeyUnavailable, IntegrityError):
        if opens_with(target, new_keys):
            return ALREADY_NEW
        raise
    return REWRAPPED


def rewrap_path(path: str | os.PathLike[str], old_keys: KeySource, new_keys: KeyStore,
                report: Callable[[Path, str], None]) -> None:
    """Rewrap a file, or every safetensors file of a model directory (plain ones are skipped);
    `report(file, outcome)` is told about each."""
    root = Path(path)
    if not root.is_dir():
        report(root, rewrap_file(root, old_keys, new_keys))
        return
    seen: set[str] = set()
    for rel in walk_files(root):
        file = root / rel
        real = os.path.realpath(file)
        if not is_safetensors(root / rel) or real in seen:  # two links to one blob are rewrapped once
            continue
        seen.add(real)
        try:
            outcome = rewrap_file(file, old_keys, new_keys)
        except PlainFileError:
            outcome = PLAIN
        report(file, outcome)
