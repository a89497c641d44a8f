"""Shared test helpers: seeded keys in both JWK shapes, seeded tensors, and raw file surgery.

Everything is derived from fixed seeds so a failure reproduces; no binary file is committed.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import mmap
import os
import random
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cryptotensors
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptotensors.numpy import save_file as upstream_save_numpy
from safetensors.numpy import save_file as save_plain_numpy

from ctfs.keys.jwk import EncryptionKey, SigningKey, parse_jwk
from ctfs.keys.store import KeyStore

REPO_ROOT = Path(__file__).resolve().parent.parent
# Tests see only the key sources they set up, here and in every child process: never a developer's
# keyring, ambient systemd credentials or CRYPTOTENSOR_KEYS.
os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
for _ambient in ("CRYPTOTENSOR_KEYS", "CREDENTIALS_DIRECTORY"):
    os.environ.pop(_ambient, None)


@pytest.fixture(autouse=True, scope="session")
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A background mount without --log-file logs under $XDG_STATE_HOME/ctfs: keep tests' logs out of /var/log."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


ALGS = ("aes256gcm", "aes128gcm", "chacha20poly1305")
KEY_LENGTHS = {"aes128gcm": 16, "aes256gcm": 32, "chacha20poly1305": 32}
RFC_ENC_ALGS = {"aes128gcm": "A128GCM", "aes256gcm": "A256GCM", "chacha20poly1305": "C20P"}


def b64(data: bytes) -> str:
    """Standard, padded base64: the reference library's encoding everywhere."""
    return base64.b64encode(data).decode()


def b64url(data: bytes) -> str:
    """RFC 7515 base64url without padding: the standard JWK encoding."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def ed25519_public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class Keys:
    """One master key and one Ed25519 key, raw, with every shape the tests hand to either library."""

    alg: str
    master: bytes
    seed: bytes
    enc_kid: str = "enc1"
    sign_kid: str = "sign1"

    @cached_property
    def public(self) -> bytes:
        return ed25519_public(self.seed)

    @property
    def enc_jwk(self) -> dict[str, str]:
        return {"kty": "oct", "alg": self.alg, "kid": self.enc_kid, "k": b64(self.master)}

    @property
    def sign_jwk(self) -> dict[str, str]:
        return {"kty": "okp", "alg": "ed25519", "kid": self.sign_kid, "x": b64(self.public), "d": b64(self.seed)}

    @property
    def rfc_enc_jwk(self) -> dict[str, str]:
        return {"kty": "oct", "alg": RFC_ENC_ALGS[self.alg], "kid": self.enc_kid, "k": b64url(self.master)}

    @property
    def rfc_sign_jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "kid": self.sign_kid, "x": b64url(self.public), "d": b64url(self.seed)}

    @property
    def config(self) -> dict[str, dict[str, str]]:
        """The direct-key config the reference library takes for saving and loading."""
        return {"enc_key": self.enc_jwk, "sign_key": self.sign_jwk}

    @property
    def enc(self) -> EncryptionKey:
        return parse_jwk(self.enc_jwk)

    @property
    def sign(self) -> SigningKey:
        return parse_jwk(self.sign_jwk)

    @property
    def store(self) -> KeyStore:
        return KeyStore([self.enc, self.sign])


def make_keys(alg: str = "aes256gcm", seed: int = 0, *, enc_kid: str = "enc1", sign_kid: str = "sign1") -> Keys:
    """Deterministic keys: the same (alg, seed) always gives the same bytes."""
    rng = random.Random(f"ctfs-test-keys/{alg}/{seed}")
    return Keys(alg, rng.randbytes(KEY_LENGTHS[alg]), rng.randbytes(32), enc_kid, sign_kid)


@pytest.fixture
def keys() -> Keys:
    """The default key pair: aes256gcm master key `enc1`, Ed25519 signer `sign1`."""
    return make_keys()


@pytest.fixture(params=ALGS)
def alg_keys(request: pytest.FixtureRequest) -> Keys:
    """One key pair per encryption algorithm; the test runs once for each."""
    return make_keys(request.param)


def seeded_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Small tensors of several dtypes and an empty one, with values fixed by `seed`."""
    rng = np.random.default_rng(seed)
    return {
        "weight": rng.standard_normal((13, 11)).astype(np.float32),
        "bias": rng.standard_normal(17).astype(np.float16),
        "ids": rng.integers(-(2**40), 2**40, size=9, dtype=np.int64),
        "mask": rng.integers(0, 2, size=23).astype(np.bool_),
        "raw": rng.integers(0, 256, size=31, dtype=np.uint8),
        "empty": np.zeros((0, 4), np.float32),
    }


@pytest.fixture
def tensors() -> dict[str, np.ndarray]:
    """`seeded_tensors(0)`: six small tensors, one of them empty."""
    return seeded_tensors(0)


def write_plain(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """A plain safetensors file written by the `safetensors` library."""
    save_plain_numpy(tensors, str(path), metadata=metadata)
    return path


def write_upstream(path: Path, tensors: dict[str, np.ndarray], keys: Keys,
                   metadata: dict[str, str] | None = None, /, **config: object) -> Path:
    """An encrypted file written by the reference library; `config` adds version, chunk_size, tensors, policy."""
    upstream_save_numpy(tensors, str(path), metadata=metadata, config={**keys.config, **config})
    return path


def write_upstream_raw(path: Path, raw: dict[str, tuple[str, list[int], bytes]], keys: Keys,
                       metadata: dict[str, str] | None = None, /, **config: object) -> Path:
    """Like `write_upstream`, from raw bytes: any dtype upstream names (`bfloat16`, `float8_e4m3fn`, ...)."""
    tensor_dict = {name: {"dtype": dtype, "shape": shape, "data": data} for name, (dtype, shape, data) in raw.items()}
    cryptotensors.serialize_file(tensor_dict, str(path), metadata, {**keys.config, **config})
    return path


def load_upstream(path: Path, keys: Keys) -> dict[str, np.ndarray]:
    """Every tensor of a file as the reference library's `safe_open` returns it (numpy dtypes only)."""
    with cryptotensors.safe_open(str(path), framework="np", config=keys.config) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def assert_same_tensors(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same names, dtypes, shapes and bytes (bytes, so NaN payloads and -0.0 count too)."""
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = got[name]
        assert (have.dtype, have.shape) == (want.dtype, want.shape), name
        assert have.tobytes() == want.tobytes(), name


# -- raw file surgery: an independent reader/writer of the container, for tampering and checking --------

def split_file(path: Path) -> tuple[dict, bytes]:
    """(header JSON object, data region) of a safetensors-container file, with key order kept."""
    blob = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + size]), blob[8 + size:]


def join_file(path: Path, header: dict, data: bytes) -> Path:
    """Write a container from a header object (compact, raw UTF-8, space-padded) and a data region."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def read_raw(path: Path) -> tuple[dict[str, str] | None, dict[str, tuple[str, list[int], bytes]]]:
    """(metadata, {name: (dtype, shape, bytes)}) of a plain safetensors file, parsed independently of ctfs."""
    header, data = split_file(path)
    metadata = header.pop("__metadata__", None)
    return metadata, {
        name: (e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]]) for name, e in header.items()
    }


def canonical_signing_bytes(header: dict) -> bytes:
    """docs/format.md §7 written out again, independently of ctfs: sorted metadata minus the signature, then
    tensors in (start, end) order with ties in header order, each as {dtype, shape, data_offsets}."""
    metadata = {k: v for k, v in sorted(header["__metadata__"].items()) if k != "__signature__"}
    entries = [(name, e) for name, e in header.items() if name != "__metadata__"]
    entries.sort(key=lambda item: tuple(item[1]["data_offsets"]))
    obj = {"__metadata__": metadata}
    for name, e in entries:
        obj[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": e["data_offsets"]}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def resign(header: dict, seed: bytes) -> None:
    """Replace the header's signature with one by the Ed25519 key `seed`."""
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(canonical_signing_bytes(header))
    header["__metadata__"]["__signature__"] = b64(signature)


def edit_header(path: Path, edit: Callable[[dict], None], *, sign_with: bytes | None = None,
                dst: Path | None = None) -> Path:
    """Apply `edit` to the header object and rewrite the file (to `dst` if given), data unchanged.
    The old signature stays unless `sign_with` (an Ed25519 seed) re-signs the edited header."""
    header, data = split_file(path)
    edit(header)
    if sign_with is not None:
        resign(header, sign_with)
    return join_file(dst or path, header, data)


def edit_json_field(header: dict, key: str, edit: Callable[[dict], None]) -> None:
    """Edit one of the JSON-in-a-string crypto metadata fields (`__encryption__`, ...) in place."""
    obj = json.loads(header["__metadata__"][key])
    edit(obj)
    header["__metadata__"][key] = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def flip_b64(value: str, bit: int = 0) -> str:
    """The base64 of `value`'s bytes with bit number `bit` inverted."""
    raw = bytearray(base64.b64decode(value))
    raw[bit // 8] ^= 1 << (bit % 8)
    return b64(bytes(raw))


def flip_file_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Invert one bit of the file at byte `offset`."""
    blob = bytearray(Path(path).read_bytes())
    blob[offset] ^= 1 << bit
    Path(path).write_bytes(bytes(blob))


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache, page by page as mincore(2) sees a mapping of it that is never touched."""
    size = Path(path).stat().st_size
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        anchor = ctypes.c_char.from_buffer(mapped)  # the mapping's address; reads nothing
        pages = -(-size // page)
        vec = (ctypes.c_ubyte * pages)()
        failed = ctypes.CDLL(None, use_errno=True).mincore(ctypes.c_void_p(ctypes.addressof(anchor)),
                                                            ctypes.c_size_t(size), vec)
        del anchor
        assert failed == 0, os.strerror(ctypes.get_errno())
    return sum(page for flag in vec if flag & 1)


def evict(path: Path) -> None:
    """Write the file out and drop it from the page cache: its next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert resident_bytes(path) == 0


@contextlib.contextmanager
def parked_thread() -> Iterator[int]:
    """A thread of this process that waits for the `with` body to end; yields its native thread id
    (FUSE reports thread ids as pids)."""
    started, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def park() -> None:
        tids.append(threading.get_native_id())
        started.set()
        done.wait()

    thread = threading.Thread(target=park)
    thread.start()
    started.wait()
    try:
        yield tids[0]
    finally:
        done.set()
        thread.join()


def read_plain(ef, offset: int, size: int) -> bytes:
    """Plain-file bytes `[offset, offset+size)` of an open EncryptedFile, through the mount's own read path
    (a fresh chunk cache, no read-ahead)."""
    from ctfs.daemon.chunk_cache import ChunkCache
    from ctfs.daemon.served import PlainView

    segments = PlainView(ef, ChunkCache(1 << 26), readahead_chunks=0).read(offset, size)
    try:
        return segment_bytes(segments)
    finally:
        segments.close()


def segment_bytes(segments) -> bytes:
    """The bytes a read's Segments hand the kernel (before their close)."""
    return b"".join(ctypes.string_at(address, length) for address, length in segments.spans)
