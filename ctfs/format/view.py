"""The plaintext view of an encrypted file: its plain safetensors header and a map from plain byte ranges
to the pieces that produce them. Pure: no I/O, no cryptography."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ctfs.format.encryption import (
    RESERVED_KEYS,
    CryptoHeader,
    TensorCipher,
    chunk_count,
)
from ctfs.format.header import Header, TensorInfo
from ctfs.format.serialize import file_prefix, header_json


@dataclass(frozen=True)
class HeaderPiece:
    """Bytes `[start, start+length)` of the plain file's prefix (length field and header)."""

    start: int
    length: int


@dataclass(frozen=True)
class StoredPiece:
    """Bytes stored in plaintext in the source, at `data_offset` from the start of its data region."""

    data_offset: int
    length: int


@dataclass(frozen=True)
class ChunkPiece:
    """Bytes `[skip, skip+length)` of the decrypted chunk `index` of tensor `tensor`."""

    tensor: str
    index: int
    skip: int
    length: int


Piece = HeaderPiece | StoredPiece | ChunkPiece


def chunk_length(cipher: TensorCipher, info: TensorInfo) -> int:
    """Plaintext bytes per chunk; a monolithic (v1) tensor is a single chunk."""
    return cipher.chunk_size or max(info.nbytes, 1)


def tensor_chunk_count(cipher: TensorCipher, info: TensorInfo) -> int:
    return chunk_count(info.nbytes, chunk_length(cipher, info))


def chunk_span(cipher: TensorCipher, info: TensorInfo, index: int) -> tuple[int, int]:
    """The chunk's `[start, end)` as offsets into the data region."""
    size = chunk_length(cipher, info)
    start = info.start + index * size
    return start, min(start + size, info.end)


def plain_header(header: Header) -> bytes:
    """The plain safetensors header: crypto metadata removed, user metadata kept, tensors in data order."""
    user = {k: v for k, v in (header.metadata or {}).items() if k not in RESERVED_KEYS}
    return header_json(user or None, header.by_offset)


class PlainView:
    """How to produce any byte range of the plain safetensors file an encrypted file stands for."""

    def __init__(self, header: Header, crypto: CryptoHeader):
        self.header = header
        self.crypto = crypto
        self.prefix = file_prefix(plain_header(header))
        self.size = len(self.prefix) + header.data_size
        # Zero-size tensors own no bytes, so only the others take part in the offset search.
        self._tensors = [t for t in header.by_offset if t.nbytes]
        self._starts = [t.start for t in self._tensors]

    def pieces(self, offset: int, size: int) -> list[Piece]:
        """The pieces, in order, whose bytes concatenated are plain file bytes `[offset, offset+size)`;
        a range past the end is cut short, as a read at end of file is."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative range: offset {offset}, size {size}")
        end = min(offset + size, self.size)
        pieces: list[Piece] = []
        if offset < len(self.prefix) and offset < end:
            stop = min(end, len(self.prefix))
            pieces.append(HeaderPiece(offset, stop - offset))
            offset = stop
        if offset >= end:
            return pieces
        data_pos, data_end = offset - len(self.prefix), end - len(self.prefix)
        i = bisect.bisect_right(self._starts, data_pos) - 1
        while data_pos < data_end:
            info = self._tensors[i]
            stop = min(data_end, info.end)
            cipher = self.crypto.ciphers.get(info.name)
            if cipher is None:
                pieces.append(StoredPiece(data_pos, stop - data_pos))
            else:
                pieces.extend(_chunk_pieces(info, cipher, data_pos, stop))
            data_pos = stop
            i += 1
        return pieces


def _chunk_pieces(info: TensorInfo, cipher: TensorCipher, data_pos: int, stop: int) -> list[ChunkPiece]:
    size = chunk_length(cipher, info)
    pieces = []
    rel = data_pos - info.start
    while rel < stop - info.start:
        index, skip = divmod(rel, size)
        length = min(size - skip, stop - info.start - rel)
        pieces.append(ChunkPiece(info.name, index, skip, length))
        rel += length
    return pieces
