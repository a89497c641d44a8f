"""Parse the CryptoTensors metadata (`__crypto_keys__`, `__encryption__`, `__policy__`, `__signature__`)."""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from typing import Any

from ctfs.crypto.constants import ENC_KEY_LENGTHS, MAX_COUNTER, NONCE_SIZE, TAG_SIZE
from ctfs.errors import FormatError
from ctfs.format.header import Header, TensorInfo

CRYPTO_KEYS_KEY = "__crypto_keys__"
ENCRYPTION_KEY = "__encryption__"
POLICY_KEY = "__policy__"
SIGNATURE_KEY = "__signature__"
RESERVED_KEYS = frozenset({CRYPTO_KEYS_KEY, ENCRYPTION_KEY, POLICY_KEY, SIGNATURE_KEY})

DEFAULT_CHUNK_SIZE = 2 * 1024 * 1024  # a v2 header without chunk_size means 2 MiB chunks
DEFAULT_POLICY = "package model\nallow = true"


@dataclass(frozen=True)
class KeyRef:
    """A public key descriptor from `__crypto_keys__`: which key, never the key itself."""

    alg: str  # normalised: aes128gcm | aes256gcm | chacha20poly1305 | ed25519
    kid: str | None
    jku: str | None


@dataclass(frozen=True)
class TensorCipher:
    """How one tensor is encrypted. v1 tensors are one chunk whose nonce is `iv` (empty iv: unauthenticated)."""

    wrapped_key: bytes
    key_iv: bytes
    key_tag: bytes
    chunk_size: int | None  # None: monolithic v1
    iv: bytes  # v1: iv; v2: base_iv
    tags: tuple[bytes, ...]  # v1: (tag,) or () for an empty tensor written without one


@dataclass(frozen=True)
class CryptoHeader:
    """Everything a reader needs besides the keys."""

    version: str
    chunk_size: int | None
    enc: KeyRef
    sign: KeyRef
    ciphers: dict[str, TensorCipher]
    policy_local: str
    policy_remote: str
    signature: bytes


def normalise_enc_alg(alg: str) -> str:
    name = alg.replace("-", "").lower()
    if name not in ENC_KEY_LENGTHS:
        raise FormatError(f"unknown encryption algorithm {alg!r}")
    return name


def normalise_sign_alg(alg: str) -> str:
    if alg.upper() != "ED25519":
        raise FormatError(f"unknown signature algorithm {alg!r}")
    return "ed25519"


def b64decode_strict(value: Any, what: str) -> bytes:
    """Standard alphabet with mandatory padding, as upstream decodes every field."""
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a base64 string")
    try:
        decoded = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid padded standard base64") from None
    # Upstream also refuses non-zero trailing bits, so every value has exactly one accepted spelling.
    if binascii.b2a_base64(decoded, newline=False) != value.encode("ascii"):
        raise FormatError(f"{what} is not canonical base64 (non-zero trailing bits)")
    return decoded


def chunk_count(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


def parse_crypto_header(header: Header, source: str) -> CryptoHeader | None:
    """The crypto description of an encrypted file, or None for a plain safetensors file."""
    metadata = header.metadata or {}
    if ENCRYPTION_KEY not in metadata:
        return None
    for key in (CRYPTO_KEYS_KEY, POLICY_KEY, SIGNATURE_KEY):
        if key not in metadata:
            raise FormatError(f"{source}: encrypted file lacks {key}")
    try:
        keys = _json_object(metadata[CRYPTO_KEYS_KEY], CRYPTO_KEYS_KEY)
        version, chunk_size = _parse_mode(keys)
        enc = _parse_key_ref(keys.get("enc"), "oct", normalise_enc_alg, "enc")
        sign = _parse_key_ref(keys.get("sign"), "okp", normalise_sign_alg, "sign")
        entries = _json_object(metadata[ENCRYPTION_KEY], ENCRYPTION_KEY)
        tensors = {t.name: t for t in header.tensors}
        ciphers = {}
        for name, entry in entries.items():
            if name not in tensors:
                raise FormatError(f"{ENCRYPTION_KEY} names tensor {name!r}, which the header lacks")
            ciphers[name] = _parse_cipher(entry, tensors[name], chunk_size, enc.alg)
        policy = _json_object(metadata[POLICY_KEY], POLICY_KEY)
        missing = [side for side in ("local", "remote") if side not in policy]
        if missing:  # the reference library refuses such a file: filling in allow-all would fail open
            raise FormatError(f"{POLICY_KEY} lacks {' and '.join(missing)}")
        local, remote = policy["local"], policy["remote"]
        if not isinstance(local, str) or not isinstance(remote, str):
            raise FormatError(f"{POLICY_KEY} local/remote must be strings")
        signature = b64decode_strict(metadata[SIGNATURE_KEY], SIGNATURE_KEY)
        if len(signature) != 64:
            raise FormatError(f"{SIGNATURE_KEY} must be 64 bytes, got {len(signature)}")
    except FormatError as exc:
        raise FormatError(f"{source}: {exc}") from None
    return CryptoHeader(version, chunk_size, enc, sign, ciphers, local, remote, signature)


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
        # Lone surrogates parse in Python but are not valid UTF-8; upstream (serde) rejects them.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # deep nesting exhausts the recursive decoder
        raise FormatError(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    return obj


def _parse_mode(keys: dict[str, Any]) -> tuple[str, int | None]:
    """The real rule (docs/format.md §2): chunk_size's presence, not version, selects chunked mode."""
    version = keys.get("version")
    if version not in ("1", "2"):
        raise FormatError(f"{CRYPTO_KEYS_KEY} version must be \"1\" or \"2\", got {version!r}")
    if "chunk_size" in keys:
        chunk_size = keys["chunk_size"]
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise FormatError(f"{CRYPTO_KEYS_KEY} chunk_size must be a positive integer")
        return version, chunk_size
    return version, DEFAULT_CHUNK_SIZE if version == "2" else None


def _parse_key_ref(obj: Any, kty: str, normalise, what: str) -> KeyRef:
    if not isinstance(obj, dict):
        raise FormatError(f"{CRYPTO_KEYS_KEY} lacks the {what} key descriptor")
    if obj.get("kty") != kty:
        raise FormatError(f"{CRYPTO_KEYS_KEY} {what}.kty must be {kty!r}")
    alg, kid, jku = obj.get("alg"), obj.get("kid"), obj.get("jku")
    if not isinstance(alg, str):
        raise FormatError(f"{CRYPTO_KEYS_KEY} {what}.alg must be a string")
    for field, value in (("kid", kid), ("jku", jku)):
        if value is not None and not isinstance(value, str):
            raise FormatError(f"{CRYPTO_KEYS_KEY} {what}.{field} must be a string")
    return KeyRef(alg=normalise(alg), kid=kid, jku=jku)


def _field(entry: dict[str, Any], name: str, tensor: str, size: int | None) -> bytes:
    if name not in entry:
        raise FormatError(f"tensor {tensor!r} lacks {name}")
    value = b64decode_strict(entry[name], f"tensor {tensor!r} {name}")
    if size is not None and len(value) != size:
        raise FormatError(f"tensor {tensor!r} {name} must be {size} bytes, got {len(value)}")
    return value


def _parse_cipher(entry: Any, info: TensorInfo, chunk_size: int | None, enc_alg: str) -> TensorCipher:
    if not isinstance(entry, dict):
        raise FormatError(f"{ENCRYPTION_KEY} entry of {info.name!r} is not an object")
    wrapped = _field(entry, "wrapped_key", info.name, ENC_KEY_LENGTHS[enc_alg])
    key_iv = _field(entry, "key_iv", info.name, NONCE_SIZE)
    key_tag = _field(entry, "key_tag", info.name, TAG_SIZE)
    if chunk_size is None:
        iv, tag = _field(entry, "iv", info.name, None), _field(entry, "tag", info.name, None)
        if (iv, tag) == (b"", b"") and info.nbytes == 0:
            return TensorCipher(wrapped, key_iv, key_tag, None, b"", ())
        if len(iv) != NONCE_SIZE or len(tag) != TAG_SIZE:
            raise FormatError(f"tensor {info.name!r} needs a 12-byte iv and a 16-byte tag")
        return TensorCipher(wrapped, key_iv, key_tag, None, iv, (tag,))
    base_iv = _field(entry, "base_iv", info.name, NONCE_SIZE)
    raw_tags = _field(entry, "tags", info.name, None)
    needed = max(1, chunk_count(info.nbytes, chunk_size))
    if len(raw_tags) % TAG_SIZE or len(raw_tags) // TAG_SIZE < needed:
        raise FormatError(f"tensor {info.name!r} needs {needed} tags of 16 bytes")
    if int.from_bytes(base_iv[8:], "big") + needed - 1 > MAX_COUNTER:
        raise FormatError(f"tensor {info.name!r}: chunk counter would overflow base_iv")
    # Surplus tags are tolerated, as upstream does, but never used.
    tags = tuple(raw_tags[i * TAG_SIZE:(i + 1) * TAG_SIZE] for i in range(needed))
    return TensorCipher(wrapped, key_iv, key_tag, chunk_size, base_iv, tags)


# -- writing -----------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _key_descriptor(ref: KeyRef, kty: str) -> dict[str, str]:
    desc = {"alg": ref.alg}
    if ref.jku is not None:
        desc["jku"] = ref.jku
    if ref.kid is not None:
        desc["kid"] = ref.kid
    desc["kty"] = kty
    return desc


def _compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode_crypto_metadata(crypto: CryptoHeader) -> dict[str, str]:
    """The reserved metadata entries (all but the signature), serialised as upstream does: sorted keys,
    compact JSON inside JSON strings, `chunk_size` only for chunked files."""
    keys: dict[str, object] = {}
    if crypto.chunk_size is not None:
        keys["chunk_size"] = crypto.chunk_size
    keys["enc"] = _key_descriptor(crypto.enc, "oct")
    keys["sign"] = _key_descriptor(crypto.sign, "okp")
    keys["version"] = crypto.version
    entries = {}
    for name in sorted(crypto.ciphers):
        c = crypto.ciphers[name]
        entry = {"wrapped_key": _b64(c.wrapped_key), "key_iv": _b64(c.key_iv), "key_tag": _b64(c.key_tag)}
        if c.chunk_size is None:
            entry.update(iv=_b64(c.iv), tag=_b64(b"".join(c.tags)))
        else:
            entry.update(base_iv=_b64(c.iv), tags=_b64(b"".join(c.tags)))
        entries[name] = entry
    return {
        CRYPTO_KEYS_KEY: _compact(keys),
        ENCRYPTION_KEY: _compact(entries),
        POLICY_KEY: _compact({"local": crypto.policy_local, "remote": crypto.policy_remote}),
    }


def encode_signature(signature: bytes) -> str:
    return _b64(signature)
