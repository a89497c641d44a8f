"""Choose where tensors go in a new file's data region."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ctfs.format.header import TensorInfo


def tie_free_layout(tensors_by_offset: Sequence[TensorInfo]) -> list[TensorInfo]:
    """Reassign offsets so that no two zero-size tensors share one (start, end).

    Upstream orders such ties at random when it re-serialises a header to check its signature, so
    files with ties fail to verify there at random (docs/format.md §7, W7). Each empty tensor is placed
    after a different non-empty one (one may lead); only when empties outnumber those slots do ties
    remain, which no layout can avoid.
    """
    filled = [t for t in tensors_by_offset if t.nbytes]
    empty = [t for t in tensors_by_offset if not t.nbytes]
    order: list[TensorInfo] = empty[:1]
    rest = empty[1:]
    for i, info in enumerate(filled):
        order.append(info)
        if i < len(rest):
            order.append(rest[i])
    order.extend(rest[len(filled):])
    placed, offset = [], 0
    for info in order:
        placed.append(replace(info, start=offset, end=offset + info.nbytes))
        offset += info.nbytes
    return placed
