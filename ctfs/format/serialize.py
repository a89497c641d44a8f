"""Serialise headers exactly as upstream does: the signed canonical form and the padded on-disk form."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping

from ctfs.format.header import METADATA_KEY, TensorInfo

SIGNATURE_KEY = "__signature__"


def _compact_json(obj: object) -> bytes:
    # serde_json's compact form: no spaces, raw UTF-8, \uXXXX (lowercase hex) only for controls.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sorted_by_utf8(metadata: Mapping[str, str]) -> dict[str, str]:
    # Code-point order equals UTF-8 byte order, which is what upstream's BTreeMap sorts by.
    return {key: metadata[key] for key in sorted(metadata)}


def _tensor_entries(tensors: Iterable[TensorInfo]) -> dict[str, dict[str, object]]:
    return {
        t.name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
        for t in tensors
    }


def header_json(metadata: Mapping[str, str] | None, tensors_by_offset: Iterable[TensorInfo]) -> bytes:
    """Compact header JSON: sorted metadata first (omitted when None), then tensors in the given order."""
    obj: dict[str, object] = {}
    if metadata is not None:
        obj[METADATA_KEY] = _sorted_by_utf8(metadata)
    obj.update(_tensor_entries(tensors_by_offset))
    return _compact_json(obj)


def signing_bytes(metadata: Mapping[str, str], tensors_by_offset: Iterable[TensorInfo]) -> bytes:
    """The bytes an Ed25519 signature covers: the header re-serialised without `__signature__`.

    Callers pass tensors in ascending (start, end) order with zero-size ties in raw-header order.
    """
    unsigned = {key: value for key, value in metadata.items() if key != SIGNATURE_KEY}
    return header_json(unsigned, tensors_by_offset)


def pad_header(header: bytes) -> bytes:
    """Pad with spaces so the data region starts 8-byte aligned, as safetensors writers do."""
    return header + b" " * (-len(header) % 8)


def file_prefix(header: bytes) -> bytes:
    """The 8-byte little-endian length followed by the padded header."""
    padded = pad_header(header)
    return struct.pack("<Q", len(padded)) + padded

