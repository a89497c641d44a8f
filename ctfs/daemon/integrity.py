"""A signed model directory, enforced by the mount: only the files model.sig lists are served, and each file's
bytes must match their signed digest before an open of it succeeds."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ctfs.errors import IntegrityError
from ctfs.files.fileio import FileIdentity
from ctfs.files.modelsig import SIGNATURE_NAME, ModelManifest, directory_entries

log = logging.getLogger(__name__)

# Files up to this size (config, tokenizer, index) are hashed at every open: cheaper than remembering them.
SMALL_FILE = 1 << 20


class ModelGuard:
    """The verified manifest of the source, and which file versions were found to match it. A large file's
    version is hashed at most once (single-flight, remembered by its FileIdentity); at start, every listed
    file is hashed ahead in parallel, so a loader's first opens rarely wait."""

    def __init__(self, manifest: ModelManifest, root: str):
        self.manifest = manifest
        self.root = root
        self._results: dict[FileIdentity, Future] = {}
        self._mutex = threading.Lock()
        self._hashers = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="ctfs-hash")

    @classmethod
    def load(cls, root: str, public_key: str) -> ModelGuard:
        """Verify root/model.sig with the pinned `public_key`; a listed file that is missing fails the mount."""
        manifest = ModelManifest.load(root, public_key)
        missing = manifest.missing(directory_entries(Path(root)))
        if missing:
            raise IntegrityError(f"{root}: {len(missing)} file(s) listed in {SIGNATURE_NAME} are missing: "
                                 + ", ".join(missing[:3]) + (" …" if len(missing) > 3 else ""))
        guard = cls(manifest, root)
        for rel in manifest.paths:
            guard._hashers.submit(guard._hash_ahead, rel)
        return guard

    def listed(self, path: str) -> bool:
        return self.manifest.expected(path) is not None

    def check(self, path: str, fd: int, identity: FileIdentity) -> None:
        """IntegrityError naming the file unless the bytes behind `fd` (version `identity`) are the signed ones."""
        if identity.size <= SMALL_FILE:
            self.manifest.check(path, fd)
            return
        with self._mutex:
            result = self._results.get(identity)
            owner = result is None
            if owner:
                result = self._results[identity] = Future()
        if owner:
            try:
                self.manifest.check(path, fd)
            except IntegrityError as exc:  # this version's bytes are wrong for good: remembered
                result.set_exception(exc)
            except BaseException as exc:  # an I/O error says nothing about the bytes: not remembered
                with self._mutex:
                    del self._results[identity]
                result.set_exception(exc)
            else:
                result.set_result(None)
        result.result()

    def _hash_ahead(self, rel: str) -> None:
        try:
            fd = os.open(os.path.join(self.root, rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            identity = FileIdentity.of(os.fstat(fd))
            if identity.size > SMALL_FILE:
                self.check(rel, fd, identity)
        except (OSError, IntegrityError):
            pass  # an open of the file reports it
        finally:
            os.close(fd)

    def close(self) -> None:
        self._hashers.shutdown(wait=False, cancel_futures=True)
