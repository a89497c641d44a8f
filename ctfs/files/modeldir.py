"""Apply a per-file operation to a model directory: safetensors files transformed, other files copied."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ctfs.errors import CtfsError
from ctfs.files.atomic import (
    TEMP_SUFFIX,
    HeldTree,
    Output,
    atomic_output,
    remove_stale_temps,
)
from ctfs.format.header import HEADER_PREFIX_SIZE, looks_like_safetensors

SAFETENSORS_SUFFIX = ".safetensors"
# A signed model directory's signature (OpenSSF model signing), at its top.
SIGNATURE_NAME = "model.sig"
# A sharded checkpoint's index (transformers' model.safetensors.index.json): which shard holds each weight.
INDEX_SUFFIX = ".safetensors.index.json"
INDEX_SIZE_LIMIT = 64 * 1024 * 1024
# Version-control metadata is not part of a model: git's LFS objects hold the plain weights themselves.
VCS_DIRECTORIES = frozenset({".git", ".hg", ".svn"})


def is_safetensors(path: Path) -> bool:
    """Decided by content, as the mount decides: a safetensors prefix, whatever the name; a `.safetensors`
    name counts too (such a file must then parse, or the operation on it fails)."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    with open(path, "rb") as f:
        return looks_like_safetensors(f.read(HEADER_PREFIX_SIZE + 1), os.fstat(f.fileno()).st_size)


def next_shards(directory: str, name: str, count: int) -> list[str]:
    """The (up to `count`) shards a loader reads after shard `name` of `directory`: transformers and vLLM read
    the files an index maps weights to in sorted order. Empty when no index there lists `name`, or it is the
    last."""
    for entry in sorted(os.listdir(directory)):
        if not entry.endswith(INDEX_SUFFIX):
            continue
        try:
            with open(os.path.join(directory, entry), "rb") as index:
                weight_map = json.loads(index.read(INDEX_SIZE_LIMIT))["weight_map"]
            shards = sorted({v for v in weight_map.values() if isinstance(v, str) and "/" not in v})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not an index a loader could use either
        if name in shards:
            position = shards.index(name) + 1
            return shards[position:position + count]
    return []


def walk_files(root: Path) -> Iterator[Path]:
    """Regular files below `root`, relative to it, in a stable order; temp files, staging directories and
    version-control metadata skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.endswith(TEMP_SUFFIX) and d not in VCS_DIRECTORIES)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not name.endswith(TEMP_SUFFIX):
                yield path.relative_to(root)


def safetensors_files(root: Path) -> list[Path]:
    """`root` itself if it is a file, else every safetensors file below it; none found is an error."""
    files = [root / rel for rel in walk_files(root) if is_safetensors(root / rel)] if root.is_dir() else [root]
    if not files:
        raise CtfsError(f"no {SAFETENSORS_SUFFIX} file under {root}")
    return files


def check_distinct(src: Path, dst: Path) -> None:
    """The source is never touched: refuse a destination that is, or lies inside, the source."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r or (src.is_dir() and src_r in dst_r.parents):
        raise CtfsError(f"destination {dst} must lie outside the source {src}")


def copy_file(src: Path, dst: Output) -> None:
    with open(src, "rb") as fin, atomic_output(dst, src.stat().st_mode & 0o777) as fd:
        with os.fdopen(os.dup(fd), "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)


def transform_tree(src: Path, dst: Path, transform: Callable[[Path, Output], None],
                   finish: Callable[[Path], None] | None = None) -> list[Path]:
    """`transform(src_file, output)` every safetensors file; copy the rest unchanged, less the source's
    signature (model.sig), which records the source's bytes and would not hold for the new tree.

    Every output file stays unnamed until the whole tree is written, then the tree appears at `dst` in
    one short step (see HeldTree): a failure or a kill leaves no partial output, and no plaintext.
    `finish(tree)` runs on the complete tree, named like `dst`, before it is moved into place.
    `dst` must not exist yet, or be an empty directory. Returns the safetensors files handled,
    relative to `src`.
    """
    check_distinct(src, dst)
    if not src.is_dir():
        raise CtfsError(f"{src} is not a directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CtfsError(f"destination {dst} exists and is not an empty directory")
    files = [rel for rel in walk_files(src) if rel != Path(SIGNATURE_NAME)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst.parent)
    done = []
    with contextlib.closing(HeldTree(dst, len(files))) as tree:
        for rel in files:
            if is_safetensors(src / rel):
                transform(src / rel, tree.output(rel))
                done.append(rel)
            else:
                copy_file(src / rel, tree.output(rel))
        tree.publish(finish)
    return done


def safetensors_data_bytes(paths: list[Path]) -> int:
    """Total size of the files, for a progress bar."""
    return sum(p.stat().st_size for p in paths)
