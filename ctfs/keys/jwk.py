"""JWK and JWK Set parsing, strict: the reference library's shapes and standard RFC 7517/8037 ones."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctfs.crypto.signing import public_key_of
from ctfs.errors import FormatError, KeyUnavailable
from ctfs.format.encryption import ENC_KEY_LENGTHS, KeyRef, normalise_enc_alg

# Standard JOSE names for the same algorithms.
JOSE_ENC_ALGS = {"A128GCM": "aes128gcm", "A256GCM": "aes256gcm", "C20P": "chacha20poly1305"}
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


@dataclass(frozen=True)
class EncryptionKey:
    """A master key (kty oct). `repr` never shows the key bytes."""

    alg: str
    key: bytes = field(repr=False)
    kid: str | None = None
    jku: str | None = None


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 key: `seed` is None for a verify-only (public) key."""

    public: bytes
    seed: bytes | None = field(default=None, repr=False)
    kid: str | None = None
    jku: str | None = None

    def verify_only(self) -> SigningKey:
        return SigningKey(self.public, None, self.kid, self.jku)


Key = EncryptionKey | SigningKey


def decode_key_bytes(value: Any, what: str) -> bytes:
    """Standard base64 with padding (the reference's JWKs) or base64url without it (RFC 7517)."""
    if not isinstance(value, str) or not _B64_CHARS.match(value):
        raise KeyUnavailable(f"{what} is not base64")
    unpadded = value.rstrip("=")
    if value != unpadded and len(value) % 4:
        raise KeyUnavailable(f"{what} has bad base64 padding")
    try:
        return base64.b64decode(unpadded.replace("-", "+").replace("_", "/") + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise KeyUnavailable(f"{what} is not base64") from None


def parse_jwk(obj: Any) -> Key:
    """One JWK. A key without its secret or public material is an error, never a random key."""
    if not isinstance(obj, dict):
        raise KeyUnavailable("a JWK must be a JSON object")
    kty, kid, jku = obj.get("kty"), obj.get("kid"), obj.get("jku")
    for name, value in (("kid", kid), ("jku", jku)):
        if value is not None and not isinstance(value, str):
            raise KeyUnavailable(f"JWK {name} must be a string")
    label = f"JWK {kid!r}" if kid else "JWK"
    if kty == "oct":
        return _parse_oct(obj, kid, jku, label)
    if kty in ("okp", "OKP"):
        return _parse_okp(obj, kid, jku, label)
    raise KeyUnavailable(f"{label}: unsupported kty {kty!r} (expected oct or okp/OKP)")


def _parse_oct(obj: dict[str, Any], kid: str | None, jku: str | None, label: str) -> EncryptionKey:
    alg = obj.get("alg", "aes256gcm")
    if not isinstance(alg, str):
        raise KeyUnavailable(f"{label}: alg must be a string")
    try:
        alg = JOSE_ENC_ALGS.get(alg) or normalise_enc_alg(alg)
    except FormatError as exc:
        raise KeyUnavailable(f"{label}: {exc}") from None
    if "k" not in obj:
        raise KeyUnavailable(f"{label}: encryption key has no 'k'")
    key = decode_key_bytes(obj["k"], f"{label} k")
    if len(key) != ENC_KEY_LENGTHS[alg]:
        raise KeyUnavailable(f"{label}: {alg} needs a {ENC_KEY_LENGTHS[alg]}-byte key, 'k' has {len(key)}")
    return EncryptionKey(alg, key, kid, jku)


def _parse_okp(obj: dict[str, Any], kid: str | None, jku: str | None, label: str) -> SigningKey:
    if obj["kty"] == "OKP" and obj.get("crv") != "Ed25519":
        raise KeyUnavailable(f"{label}: OKP key must have crv Ed25519")
    alg = obj.get("alg", "ed25519")
    if not isinstance(alg, str) or alg.upper() not in ("ED25519", "EDDSA"):
        raise KeyUnavailable(f"{label}: unsupported signing alg {alg!r}")
    if "d" not in obj and "x" not in obj:
        raise KeyUnavailable(f"{label}: signing key has neither 'd' nor 'x'")
    seed = decode_key_bytes(obj["d"], f"{label} d") if "d" in obj else None
    public = decode_key_bytes(obj["x"], f"{label} x") if "x" in obj else None
    if seed is not None and len(seed) != 32 or public is not None and len(public) != 32:
        raise KeyUnavailable(f"{label}: Ed25519 keys are 32 bytes")
    if seed is not None:
        derived = public_key_of(seed)
        if public is not None and public != derived:
            raise KeyUnavailable(f"{label}: 'x' does not match 'd'")
        public = derived
    return SigningKey(public, seed, kid, jku)


def parse_jwk_document(doc: Any) -> list[Key]:
    """A JWK, a JWK Set ({"keys": [...]}) or a bare list of JWKs."""
    if isinstance(doc, dict) and "keys" in doc:
        doc = doc["keys"]
    items = doc if isinstance(doc, list) else [doc]
    return [parse_jwk(item) for item in items]


def check_private_file(path: Path) -> None:
    """Key files readable by group or others are refused: a leak waiting to happen."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyUnavailable(
            f"key file is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
            "chmod 600 it or pass --insecure-key-perms"
        )


def load_key_file(path: str | os.PathLike[str], *, check_perms: bool = True) -> list[Key]:
    """Keys from a JWK or JWK Set file."""
    path = Path(path)
    try:
        if check_perms:
            check_private_file(path)
        return parse_jwk_document(json.loads(path.read_text("utf-8")))
    except KeyUnavailable as exc:
        raise KeyUnavailable(f"{path}: {exc}") from None
    except OSError as exc:
        raise KeyUnavailable(f"{path}: cannot read key file ({exc.strerror})") from None
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for the JSON decoder
        raise KeyUnavailable(f"{path}: not a JSON key file") from None


def to_reference_jwk(key: Key, *, private: bool = True) -> dict[str, str]:
    """The reference library's JWK shape: standard padded base64, lowercase kty, its alg names."""
    out: dict[str, str] = {}
    if isinstance(key, EncryptionKey):
        out.update(kty="oct", alg=key.alg, k=base64.b64encode(key.key).decode())
    else:
        out.update(kty="okp", alg="ed25519", x=base64.b64encode(key.public).decode())
        if private and key.seed is not None:
            out["d"] = base64.b64encode(key.seed).decode()
    if key.kid is not None:
        out["kid"] = key.kid
    if key.jku is not None:
        out["jku"] = key.jku
    return out


def key_ref(key: EncryptionKey | SigningKey) -> KeyRef:
    """How a header names `key`: its algorithm, kid and jku."""
    alg = key.alg if isinstance(key, EncryptionKey) else "ed25519"
    return KeyRef(alg=alg, kid=key.kid, jku=key.jku)
