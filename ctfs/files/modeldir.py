"""Apply a per-file operation to a model directory: safetensors files transformed, other files copied."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ctfs.errors import CtfsError
from ctfs.files.atomic import atomic_output

SAFETENSORS_SUFFIX = ".safetensors"


def is_safetensors(path: Path) -> bool:
    return path.suffix == SAFETENSORS_SUFFIX


def walk_files(root: Path) -> Iterator[Path]:
    """Regular files below `root`, relative to it, in a stable order; hidden temp files skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not name.endswith(".ctfs-tmp"):
                yield path.relative_to(root)


def safetensors_files(root: Path) -> list[Path]:
    """`root` itself if it is a file, else every safetensors file below it; none found is an error."""
    files = [root / rel for rel in walk_files(root) if is_safetensors(rel)] if root.is_dir() else [root]
    if not files:
        raise CtfsError(f"no {SAFETENSORS_SUFFIX} file under {root}")
    return files


def check_distinct(src: Path, dst: Path) -> None:
    """The source is never touched: refuse a destination that is, or lies inside, the source."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r or (src.is_dir() and src_r in dst_r.parents):
        raise CtfsError(f"destination {dst} must lie outside the source {src}")


def copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, atomic_output(dst, src.stat().st_mode & 0o777) as fd:
        with os.fdopen(os.dup(fd), "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)


def transform_tree(src: Path, dst: Path, transform: Callable[[Path, Path], None],
                   finish: Callable[[Path], None] | None = None) -> list[Path]:
    """`transform(src_file, dst_file)` every safetensors file; copy the rest unchanged.

    The tree is built in a hidden sibling of `dst` and renamed into place once complete, so a failure
    leaves no partial output; `dst` must not exist yet, or be an empty directory. `finish(tree)` runs
    on the complete tree before the rename (it is named like `dst`). Returns the safetensors files
    handled, relative to `src`.
    """
    check_distinct(src, dst)
    if not src.is_dir():
        raise CtfsError(f"{src} is not a directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CtfsError(f"destination {dst} exists and is not an empty directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".ctfs-tmp"))
    # The tree carries dst's own name while it is built: a model signature records that name.
    staging = scratch / dst.name
    try:
        staging.mkdir()
        done = []
        for rel in walk_files(src):
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            if is_safetensors(rel):
                transform(src / rel, staging / rel)
                done.append(rel)
            else:
                copy_file(src / rel, staging / rel)
        if finish is not None:
            finish(staging)
        staging.chmod(0o755)
        if dst.exists():
            dst.rmdir()
        staging.rename(dst)
        scratch.rmdir()
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return done


def safetensors_data_bytes(paths: list[Path]) -> int:
    """Total size of the files, for a progress bar."""
    return sum(p.stat().st_size for p in paths)
