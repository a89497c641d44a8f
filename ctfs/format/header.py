"""Parse and validate a safetensors header strictly, once, into immutable typed records."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ctfs.errors import FormatError

# Upstream (safetensors and cryptotensors) refuses headers above this size.
MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"
HEADER_PREFIX_SIZE = 8

# Bits per element of every dtype safetensors knows.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
    "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; offsets are relative to the start of the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated header. `tensors` keeps the raw header order; `by_offset` is the data order."""

    metadata: dict[str, str] | None
    tensors: tuple[TensorInfo, ...]
    header_size: int  # N, the length of the JSON header in bytes (padding included)

    @property
    def data_start(self) -> int:
        return HEADER_PREFIX_SIZE + self.header_size

    @property
    def data_size(self) -> int:
        return max((t.end for t in self.tensors), default=0)

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size

    @cached_property
    def by_offset(self) -> tuple[TensorInfo, ...]:
        # A stable sort keeps raw order among zero-size ties: that is the order a writer signed.
        return tuple(sorted(self.tensors, key=lambda t: (t.start, t.end)))

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {info.name: info for info in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        return self._by_name[name]


def looks_like_safetensors(start: bytes, file_size: int) -> bool:
    """Whether a file's first bytes (at least 9) are a safetensors prefix: a length that fits the file and the
    opening brace of a JSON header. Content decides, not the file's name: a renamed file is still safetensors."""
    if len(start) <= HEADER_PREFIX_SIZE:
        return False
    (size,) = struct.unpack("<Q", start[:HEADER_PREFIX_SIZE])
    return 2 <= size <= min(MAX_HEADER_SIZE, file_size - HEADER_PREFIX_SIZE) and start[HEADER_PREFIX_SIZE:][:1] == b"{"


def read_header_size(prefix: bytes, source: str) -> int:
    """The header length N from a file's first 8 bytes."""
    if len(prefix) < HEADER_PREFIX_SIZE:
        raise FormatError(f"{source}: file too short for a safetensors header ({len(prefix)} bytes)")
    (size,) = struct.unpack("<Q", prefix[:HEADER_PREFIX_SIZE])
    if size > MAX_HEADER_SIZE:
        # Text, an archive, a pickle: any other file's first 8 bytes read as an absurd length.
        raise FormatError(f"{source}: not a safetensors file (its first 8 bytes give a header length of {size}, "
                          f"which exceeds the {MAX_HEADER_SIZE}-byte limit)")
    return size


def parse_header(raw: bytes, *, file_size: int | None, source: str) -> Header:
    """Validate header bytes (without the 8-byte prefix) and, if given, the total file size."""
    obj = _load_json_object(raw, source)
    metadata = _parse_metadata(obj.pop(METADATA_KEY, None), source)
    tensors = tuple(_parse_tensor(name, entry, source) for name, entry in obj.items())
    header = Header(metadata=metadata, tensors=tensors, header_size=len(raw))
    _check_layout(header, source)
    if file_size is not None and file_size != header.file_size:
        raise FormatError(
            f"{source}: file is {file_size} bytes but its header describes {header.file_size}"
            + (" (truncated)" if file_size < header.file_size else " (trailing bytes)")
        )
    return header


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise FormatError(f"duplicate JSON key {key!r}")
        obj[key] = value
    return obj


def _load_json_object(raw: bytes, source: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
        # Lone surrogates parse in Python but are invalid UTF-8; upstream rejects them.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except FormatError as exc:
        raise FormatError(f"{source}: header: {exc}") from None
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{source}: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{source}: header is not a JSON object")
    return obj


def _parse_metadata(value: Any, source: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(f"{source}: __metadata__ must map strings to strings")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_tensor(name: str, entry: Any, source: str) -> TensorInfo:
    where = f"{source}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != set(TENSOR_FIELDS):
        raise FormatError(f"{where}: entry must have exactly the fields dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where}: data_offsets must be two integers 0 <= start <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise FormatError(
            f"{where}: {dtype}{shape} needs {bits / 8:g} bytes but data_offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])


def _check_layout(header: Header, source: str) -> None:
    """Tensors must tile the data region from 0 with no gap and no overlap."""
    expected = 0
    for info in header.by_offset:
        if info.start != expected:
            problem = "gap" if info.start > expected else "overlap"
            raise FormatError(f"{source}: tensor {info.name!r} starts at {info.start}: {problem} in the data region")
        expected = info.end
