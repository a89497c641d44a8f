"""The plaintext view: the plain header of an encrypted file, and plain byte ranges mapped to pieces."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_same_tensors,
    make_keys,
    read_plain,
    write_plain,
    write_upstream,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.encrypted import EncryptedFile
from ctfs.format.encryption import DEFAULT_POLICY, CryptoHeader, KeyRef, TensorCipher
from ctfs.format.header import parse_header
from ctfs.format.view import ChunkPiece, HeaderPiece, PlainView, StoredPiece


def make_view(tensors: dict[str, tuple[str, list[int], int]], chunked: dict[str, int | None],
              metadata: dict[str, str] | None = None) -> PlainView:
    """A view over a made-up header: `tensors` maps name -> (dtype, shape, byte length), laid out in order;
    `chunked` maps each encrypted tensor to its chunk size (None: monolithic v1)."""
    obj, offset = {"__metadata__": {**(metadata or {}), "__encryption__": "{}", "__signature__": "x"}}, 0
    for name, (dtype, shape, length) in tensors.items():
        obj[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}
        offset += length
    header = parse_header(json.dumps(obj).encode(), file_size=None, source="made-up")
    ciphers = {name: TensorCipher(b"", b"", b"", size, b"", ()) for name, size in chunked.items()}
    ref = KeyRef("aes256gcm", None, None)
    return PlainView(header, CryptoHeader("2", None, ref, ref, ciphers, DEFAULT_POLICY, DEFAULT_POLICY, b""))


VIEW = make_view(
    {"a": ("U8", [10], 10), "empty": ("F32", [0], 0), "b": ("U8", [7], 7), "c": ("I16", [3], 6)},
    {"a": 4, "empty": 4, "c": None},
    metadata={"user": "kept"},
)
P = len(VIEW.prefix)


def test_the_plain_prefix_is_a_padded_safetensors_header_without_crypto_metadata():
    (size,) = struct.unpack("<Q", VIEW.prefix[:8])
    assert size == len(VIEW.prefix) - 8 and size % 8 == 0
    text = VIEW.prefix[8:]
    assert len(text) - len(text.rstrip(b" ")) < 8 and text.rstrip(b" ").endswith(b"}")
    header = json.loads(text)
    assert header["__metadata__"] == {"user": "kept"}
    assert list(header) == ["__metadata__", "a", "empty", "b", "c"]
    assert VIEW.size == P + 23


def test_the_plain_header_omits_metadata_when_only_crypto_metadata_was_there():
    view = make_view({"a": ("U8", [1], 1)}, {"a": 1})
    assert "__metadata__" not in json.loads(view.prefix[8:])


def test_a_range_inside_the_header_is_one_header_piece():
    assert VIEW.pieces(3, 10) == [HeaderPiece(3, 10)]


def test_a_range_across_the_header_end_continues_into_the_first_chunk():
    assert VIEW.pieces(P - 2, 5) == [HeaderPiece(P - 2, 2), ChunkPiece("a", 0, 0, 3)]


def test_chunked_tensors_split_at_chunk_boundaries_relative_to_the_tensor():
    assert VIEW.pieces(P + 1, 9) == [ChunkPiece("a", 0, 1, 3), ChunkPiece("a", 1, 0, 4), ChunkPiece("a", 2, 0, 2)]


def test_plaintext_tensors_are_stored_pieces_and_empty_tensors_produce_none():
    assert VIEW.pieces(P + 9, 3) == [ChunkPiece("a", 2, 1, 1), StoredPiece(10, 2)]


def test_a_monolithic_tensor_is_a_single_chunk():
    assert VIEW.pieces(P + 18, 3) == [ChunkPiece("c", 0, 1, 3)]
    assert VIEW.pieces(P + 15, 100) == [StoredPiece(15, 2), ChunkPiece("c", 0, 0, 6)]


def test_ranges_are_clipped_at_the_end_and_empty_past_it():
    assert VIEW.pieces(VIEW.size - 1, 10) == [ChunkPiece("c", 0, 5, 1)]
    assert VIEW.pieces(VIEW.size, 10) == []
    assert VIEW.pieces(VIEW.size + 5, 10) == []
    assert VIEW.pieces(4, 0) == []


def test_a_negative_range_is_refused_rather_than_read_short():
    for offset, size in ((-5, 10), (0, -1)):
        with pytest.raises(ValueError):
            VIEW.pieces(offset, size)


def plain_start(piece) -> int:
    """Where a piece's first byte sits in the plain file of VIEW, worked out from the made-up layout."""
    if isinstance(piece, HeaderPiece):
        return piece.start
    if isinstance(piece, StoredPiece):
        return P + piece.data_offset
    tensor = VIEW.header.tensor(piece.tensor)
    chunk = VIEW.crypto.ciphers[piece.tensor].chunk_size or tensor.nbytes
    return P + tensor.start + piece.index * chunk + piece.skip


@settings(max_examples=300, deadline=None)
@given(offset=st.integers(0, P + 30), size=st.integers(0, P + 30))
def test_pieces_are_contiguous_and_cover_exactly_the_clipped_range(offset, size):
    position = offset
    for piece in VIEW.pieces(offset, size):
        assert piece.length > 0 and plain_start(piece) == position
        position += piece.length
    assert position == max(offset, min(offset + size, VIEW.size))


# -- the property: assembling the pieces equals the fully decrypted file -----------------------------

DTYPES = [np.float32, np.float16, np.uint8, np.int64, np.bool_, np.int16]


@st.composite
def model_files(draw):
    """Random tensors (some empty), a random non-empty encrypted subset, either writer, v1 or v2."""
    names = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda n: n != "__metadata__"),
                          min_size=1, max_size=5, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 9), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        tensors[name] = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)  # shape [] is a scalar
    encrypted = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    writer = draw(st.sampled_from(["ctfs", "cryptotensors"]))
    version = draw(st.sampled_from(["1", "2"]))
    chunk_size = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 64, 1000]))
    return tensors, encrypted, writer, version, chunk_size


@settings(max_examples=200, deadline=None)
@given(model=model_files(), data=st.data())
def test_reading_any_range_equals_the_same_slice_of_the_decrypted_file(model, data):
    tensors, encrypted, writer, version, chunk_size = model
    keys = make_keys()
    with tempfile.TemporaryDirectory() as tmp:
        src, plain = Path(tmp) / "m.ct", Path(tmp) / "m.safetensors"
        if writer == "ctfs":
            write_plain(Path(tmp) / "source", tensors, {"seed": "x"})
            encrypt_file(Path(tmp) / "source", src, keys.enc, keys.sign,
                         EncryptOptions(version=version, chunk_size=chunk_size, tensors=encrypted))
        else:
            write_upstream(src, tensors, keys, {"seed": "x"}, version=version, chunk_size=chunk_size, tensors=encrypted)
        decrypt_file(src, plain, keys.store)
        expected = plain.read_bytes()
        assert_same_tensors(load_file(plain), tensors)
        with EncryptedFile(src, keys.store) as ef:
            assert ef.view.size == len(expected)
            assert read_plain(ef, 0, ef.view.size) == expected
            for _ in range(data.draw(st.integers(1, 6))):
                offset = data.draw(st.integers(0, len(expected) + 4))
                size = data.draw(st.integers(0, len(expected) + 4 - offset))
                assert read_plain(ef, offset, size) == expected[offset:offset + size]
