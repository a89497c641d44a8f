"""Sign a model directory in the OpenSSF model signing format (model.sig), and verify such a signature."""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import blake3
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing, signing

# The public API verifies a signature only together with hashing the whole directory; the mount needs
# the signed manifest on its own and hashes each file when it is opened, so it uses the key verifier
# underneath (model-signing is pinned to the version this was written against).
from model_signing._signing import sign_ec_key, sign_sigstore_pb

from ctfs.errors import CtfsError, IntegrityError, KeyUnavailable
from ctfs.files.atomic import atomic_output, write_all
from ctfs.files.fileio import pread_exact_into
from ctfs.files.modeldir import SIGNATURE_NAME
from ctfs.keys.jwk import check_private_file

# The curves model-signing's key signer accepts.
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
READ_SIZE = 8 << 20

# model-signing's names for its hash algorithms (its "blake2" is BLAKE2b with the default 64-byte digest).
_HASHERS: dict[str, Callable[[], object]] = {
    "sha256": hashlib.sha256,
    "blake2b": hashlib.blake2b,
    "blake3": lambda: blake3.blake3(max_threads=blake3.blake3.AUTO),
}


@dataclass(frozen=True)
class Part:
    """The digest of bytes [start, end) of a file; `end` None means to the end of the file."""

    start: int
    end: int | None
    digest: bytes


@dataclass(frozen=True)
class ExpectedDigest:
    """What model.sig records for one file: the hash algorithm, the shard size (None: one digest of
    the whole file) and the digest of each part, in file order."""

    algorithm: str
    shard_size: int | None
    parts: tuple[Part, ...]


def hash_file(fd: int, algorithm: str, shard_size: int | None = None, name: str = "file") -> tuple[Part, ...]:
    """The parts of the open file `fd` as model-signing hashes them: one digest of all its bytes, or
    one per `shard_size` bytes (none for an empty file), the shards hashed in parallel."""
    size = os.fstat(fd).st_size
    if shard_size is None:
        return (Part(0, None, _hash_range(fd, algorithm, 0, size, name)),)
    bounds = [(start, min(start + shard_size, size)) for start in range(0, size, shard_size)]
    if not bounds:
        return ()
    with ThreadPoolExecutor(max_workers=min(len(bounds), os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda b: _hash_range(fd, algorithm, *b, name), bounds)
        return tuple(Part(start, end, digest) for (start, end), digest in zip(bounds, digests))


def _hash_range(fd: int, algorithm: str, start: int, end: int, name: str) -> bytes:
    hasher = _HASHERS[algorithm]()
    buffer = memoryview(bytearray(min(READ_SIZE, end - start)))
    offset = start
    while offset < end:
        view = buffer[:min(len(buffer), end - offset)]
        pread_exact_into(fd, view, offset, name)
        hasher.update(view)
        offset += len(view)
    return hasher.digest()


def _normalized(relpath: str | PurePosixPath) -> str:
    return PurePosixPath(str(relpath).lstrip("/")).as_posix()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_ec_key_file(path: Path, *, private: bool) -> None:
    """Refuse what model-signing would choke on with a clear message, before it reads the key itself."""
    kind = "private" if private else "public"
    try:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except OSError as exc:
        raise KeyUnavailable(f"{path}: cannot read key file ({exc.strerror})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyUnavailable(f"{path}: not a PEM {kind} key (without a password)") from None
    is_ec = isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey)
    if not is_ec or key.curve.name not in SUPPORTED_CURVES:
        raise KeyUnavailable(f"{path}: model signing takes an EC {kind} key on P-256, P-384 or P-521")


class ModelManifest:
    """The files a verified model.sig lists, each with its expected digest.

    Relative paths are POSIX paths below the model directory; a leading "/" (as FUSE paths have) is
    ignored. A path the manifest does not list must not be served. Nothing is cached here: when a file
    is checked again is the caller's decision.
    """

    def __init__(self, signature_path: Path, files: dict[str, ExpectedDigest], ignored: Iterable[str]):
        self.signature_path = signature_path
        self._files = files
        self._ignored = tuple(ignored)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], public_key: str | os.PathLike[str]) -> ModelManifest:
        """Verify DIRECTORY/model.sig against the pinned `public_key` (PEM); the files are not read."""
        signature_path, public_key = Path(directory) / SIGNATURE_NAME, Path(public_key)
        _check_ec_key_file(public_key, private=False)
        if not signature_path.exists():
            raise IntegrityError(f"{signature_path}: missing; the directory is not signed")
        try:
            signature = sign_sigstore_pb.Signature.read(signature_path)
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{signature_path}: not a model signature bundle ({_first_line(exc)})") from None
        try:
            manifest = sign_ec_key.Verifier(public_key).verify(signature)
        except InvalidSignature:
            raise IntegrityError(f"{signature_path}: the signature does not verify with {public_key}") from None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:  # malformed in many ways
            raise IntegrityError(f"{signature_path}: does not verify with {public_key}: {_first_line(exc)}") from None
        return cls._from_manifest(signature_path, manifest)

    @classmethod
    def _from_manifest(cls, signature_path: Path, manifest) -> ModelManifest:
        params = manifest.serialization_type
        algorithm = params["hash_type"]
        if algorithm not in _HASHERS:
            raise IntegrityError(f"{signature_path}: unsupported hash algorithm {algorithm!r}")
        shard_size = _shard_size(signature_path, params["shard_size"]) if params["method"] == "shards" else None
        parts: dict[str, list[Part]] = {}
        for resource in manifest.resource_descriptors():
            digest = resource.digest.digest_value
            if shard_size is None:
                path, part = resource.identifier, Part(0, None, digest)
            else:
                # A shard is named PATH:START:END; model-signing refuses paths containing ':'.
                path, start, end = resource.identifier.rsplit(":", 2)
                part = Part(int(start), int(end), digest)
            parts.setdefault(path, []).append(part)
        files = {path: ExpectedDigest(algorithm, shard_size, tuple(sorted(found, key=lambda p: p.start)))
                 for path, found in parts.items()}
        ignored = [_normalized(p) for p in params.get("ignore_paths", ())] + [SIGNATURE_NAME]
        return cls(signature_path, files, ignored)

    @property
    def paths(self) -> list[str]:
        """Every listed file, sorted."""
        return sorted(self._files)

    def expected(self, relpath: str | PurePosixPath) -> ExpectedDigest | None:
        """What the file's bytes must hash to; None when the manifest does not list it."""
        return self._files.get(_normalized(relpath))

    def check(self, relpath: str | PurePosixPath, fd: int) -> None:
        """Hash the open file `fd` the way the manifest was made; IntegrityError naming the file unless
        it is listed and its bytes match."""
        expected = self.expected(relpath)
        if expected is None:
            raise IntegrityError(f"{_normalized(relpath)}: not listed in {SIGNATURE_NAME}")
        if hash_file(fd, expected.algorithm, expected.shard_size, str(relpath)) != expected.parts:
            raise IntegrityError(f"{_normalized(relpath)}: its bytes differ from the digest in {SIGNATURE_NAME}")

    def missing(self, present: Iterable[str | PurePosixPath]) -> list[str]:
        """Listed files that are not among `present`, sorted."""
        return sorted(set(self._files) - {_normalized(p) for p in present})

    def unlisted(self, present: Iterable[str | PurePosixPath]) -> list[str]:
        """Files among `present` that the manifest neither lists nor ignores (the signature itself,
        and paths the signer declared ignored, such as git metadata), sorted."""
        return sorted({rel for rel in map(_normalized, present) if rel not in self._files and not self._ignores(rel)})

    def _ignores(self, rel: str) -> bool:
        return any(rel == ignored or rel.startswith(ignored + "/") for ignored in self._ignored)


def _shard_size(signature_path: Path, value: object) -> int:
    # The signed statement is JSON read through protobuf's Struct: every number arrives as a float.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not 1 <= value < math.inf or value != int(value):
        raise IntegrityError(f"{signature_path}: shard size {value!r} is not a positive integer")
    return int(value)


def directory_entries(root: Path) -> list[str]:
    """Every entry below `root` that is not a directory, as sorted relative POSIX paths. Unlike
    modeldir.walk_files nothing is skipped: an unexpected file is what verification looks for."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # os.walk does not descend into a symlink to a directory: it counts as an entry of its own.
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def verify_directory(directory: str | os.PathLike[str], public_key: str | os.PathLike[str]) -> ModelManifest:
    """Check model.sig's signature, then every file against it. One IntegrityError names every
    changed, unlisted and missing file."""
    directory = Path(directory)
    manifest = ModelManifest.load(directory, public_key)
    present = directory_entries(directory)
    changed = [rel for rel in present if manifest.expected(rel) is not None and not _matches(manifest, directory, rel)]
    problems = [f"{label} {', '.join(names)}" for label, names in (
        ("changed:", changed), ("not listed:", manifest.unlisted(present)), ("missing:", manifest.missing(present)))
        if names]
    if problems:
        raise IntegrityError(f"{directory}: does not match {SIGNATURE_NAME}: {'; '.join(problems)}")
    return manifest


def _matches(manifest: ModelManifest, directory: Path, rel: str) -> bool:
    # O_NONBLOCK: a FIFO put where a listed file was must not hang the check.
    fd = os.open(directory / rel, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        manifest.check(rel, fd)
    except IntegrityError:
        return False
    finally:
        os.close(fd)
    return True


class DirectorySigner:
    """Writes model.sig into model directories with one EC private key (PEM)."""

    def __init__(self, private_key: str | os.PathLike[str], *, check_perms: bool = True):
        private_key = Path(private_key)
        if check_perms:
            try:
                check_private_file(private_key)
            except KeyUnavailable as exc:
                raise KeyUnavailable(f"{private_key}: {exc}") from None
        _check_ec_key_file(private_key, private=True)
        # Git metadata stays out, as with model-signing's own command; the signature cannot cover itself.
        hashing_config = hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME])
        self._config = signing.Config().use_elliptic_key_signer(private_key=private_key)
        self._config.set_hashing_config(hashing_config)

    def sign(self, directory: str | os.PathLike[str]) -> Path:
        """Write DIRECTORY/model.sig over every file below it (atomically); returns its path."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CtfsError(f"{directory} is not a directory")
        # model-signing writes the bundle in place; it is built aside and then written atomically.
        with tempfile.TemporaryDirectory() as scratch:
            bundle = Path(scratch, SIGNATURE_NAME)
            try:
                self._config.sign(directory, bundle)
            except ValueError as exc:  # e.g. a symlink or a special file in the directory
                raise CtfsError(f"{directory}: cannot sign: {_first_line(exc)}") from None
            data = bundle.read_bytes()
        target = directory / SIGNATURE_NAME
        with atomic_output(target, 0o644) as fd:
            write_all(fd, data)
        return target


def public_key_path(private_key: str | os.PathLike[str]) -> Path:
    """Where the public half of a generated key goes: OUT.pem → OUT.pub.pem."""
    private_key = Path(private_key)
    stem = private_key.name.removesuffix(".pem")
    return private_key.with_name(f"{stem}.pub.pem")


def write_key_pair(private_key: str | os.PathLike[str]) -> Path:
    """A new P-256 key: the private half (PKCS#8 PEM, mode 0600) at `private_key`, the public half
    beside it (see public_key_path); returns the public key's path."""
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    public_path = public_key_path(private_key)
    with atomic_output(private_key, 0o600) as fd:
        write_all(fd, private_pem)
    with atomic_output(public_path, 0o644) as fd:
        write_all(fd, public_pem)
    return public_path
