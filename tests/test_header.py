"""Strict parsing of the container header (docs/format.md §1) and the crypto metadata (§§2-3, 5-6)."""

from __future__ import annotations

import json
import math
import struct

import pytest
from conftest import b64, make_keys, split_file, write_upstream
from hypothesis import given, settings
from hypothesis import strategies as st

from ctfs.errors import FormatError
from ctfs.files.encrypted import EncryptedFile
from ctfs.format.encryption import (
    DEFAULT_CHUNK_SIZE,
    SIGNATURE_KEY,
    CryptoHeader,
    encode_crypto_metadata,
    encode_signature,
    parse_crypto_header,
)
from ctfs.format.header import (
    DTYPE_BITS,
    MAX_HEADER_SIZE,
    Header,
    parse_header,
    read_header_size,
)
from ctfs.format.serialize import header_json

U8 = {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}


def parse(obj_or_bytes, file_size=None):
    raw = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes).encode()
    return parse_header(raw, file_size=file_size, source="test.safetensors")


def tensor(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


# -- the container header ----------------------------------------------------------------------------

def test_a_valid_header_yields_tensors_in_header_order_and_by_offset_in_data_order():
    raw = json.dumps({"__metadata__": {"k": "v"}, "b": tensor("F32", [2], 4, 12), "a": tensor("U8", [4], 0, 4)})
    header = parse(raw.encode() + b"   ", file_size=8 + len(raw) + 3 + 12)
    assert [t.name for t in header.tensors] == ["b", "a"]
    assert [t.name for t in header.by_offset] == ["a", "b"]
    assert header.metadata == {"k": "v"}
    assert (header.header_size, header.data_start) == (len(raw) + 3, 8 + len(raw) + 3)
    assert header.by_offset[1].shape == (2,) and header.by_offset[1].nbytes == 8


def test_an_unpadded_header_without_metadata_is_accepted():
    raw = json.dumps({"a": U8}, separators=(",", ":")).encode()
    assert len(raw) % 8 != 0
    header = parse(raw, file_size=8 + len(raw) + 4)
    assert header.metadata is None and header.data_start == 8 + len(raw)


def test_zero_size_ties_keep_the_raw_header_order():
    header = parse({"z": tensor("F32", [0], 0, 0), "a": U8, "m": tensor("I8", [0, 3], 0, 0)})
    assert [t.name for t in header.by_offset] == ["z", "m", "a"]


def test_sub_byte_dtypes_are_sized_in_bits():
    assert parse({"f4": tensor("F4", [2, 3], 0, 3), "f6": tensor("F6_E2M3", [4], 3, 6)}).data_size == 6
    with pytest.raises(FormatError, match="needs 1.5 bytes"):
        parse({"f4": tensor("F4", [3], 0, 2)})


def test_the_header_size_prefix_is_little_endian_and_bounded():
    assert read_header_size(struct.pack("<Q", 1234) + b"rest", "f") == 1234
    assert read_header_size(struct.pack("<Q", MAX_HEADER_SIZE), "f") == MAX_HEADER_SIZE
    with pytest.raises(FormatError, match="exceeds"):
        read_header_size(struct.pack("<Q", MAX_HEADER_SIZE + 1), "f")
    with pytest.raises(FormatError, match="too short"):
        read_header_size(b"\x01\x00\x00", "f")


def test_a_huge_declared_header_is_refused_before_anything_is_read(tmp_path, keys):
    path = tmp_path / "huge.ct"
    path.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{}")
    with pytest.raises(FormatError, match="exceeds"):
        EncryptedFile(path, keys.store)


def test_a_header_running_past_the_end_of_the_file_is_truncation(tmp_path, keys):
    path = tmp_path / "short.ct"
    path.write_bytes(struct.pack("<Q", 64) + b'{"a":1}')
    with pytest.raises(FormatError, match="truncated"):
        EncryptedFile(path, keys.store)


@pytest.mark.parametrize(("delta", "problem"), [(-1, "truncated"), (1, "trailing")])
def test_the_file_must_end_exactly_at_the_last_tensor(delta, problem):
    raw = json.dumps({"a": U8}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    exact = 8 + len(raw) + 4
    assert parse(raw, file_size=exact).file_size == exact
    with pytest.raises(FormatError, match=problem):
        parse(raw, file_size=exact + delta)


MALFORMED = {
    "not utf-8": b'{"a\xff":1}',
    "not json": b'{"a": ',
    "json array": b"[1, 2]",
    "json string": b'"x"',
    "lone surrogate": b'{"__metadata__":{"k":"\\ud800"}}',
    "nan offset": b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,NaN]}}',
    "huge integer": b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,' + b"9" * 5000 + b"]}}",
    "deep nesting": b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "empty": b"",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_headers_are_format_errors(raw):
    with pytest.raises(FormatError):
        parse(raw)


@pytest.mark.parametrize("raw", [
    b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    b'{"__metadata__":{"k":"1","k":"2"}}',
    b'{"a":{"dtype":"U8","dtype":"I8","shape":[4],"data_offsets":[0,4]}}',
], ids=["tensor", "metadata", "field"])
def test_duplicate_json_keys_are_refused_where_upstream_would_keep_the_last(raw):
    with pytest.raises(FormatError, match="duplicate"):
        parse(raw)


BAD_ENTRIES = {
    "unknown dtype": tensor("F128", [1], 0, 16),
    "lowercase dtype": tensor("u8", [4], 0, 4),
    "missing field": {"dtype": "U8", "shape": [4]},
    "extra field": {**U8, "extra": 1},
    "not an object": [0, 4],
    "list dtype": tensor([], [4], 0, 4),
    "object dtype": tensor({"U8": 1}, [4], 0, 4),
    "float shape": tensor("U8", [4.0], 0, 4),
    "bool shape": tensor("U8", [True, 4], 0, 4),
    "negative shape": tensor("U8", [-4], 0, 4),
    "string shape": tensor("U8", "4", 0, 4),
    "float offset": {"dtype": "U8", "shape": [4], "data_offsets": [0.0, 4]},
    "string offset": {"dtype": "U8", "shape": [4], "data_offsets": ["0", 4]},
    "negative offset": tensor("U8", [0], -4, -4),
    "reversed offsets": tensor("U8", [0], 4, 0),
    "three offsets": {"dtype": "U8", "shape": [4], "data_offsets": [0, 2, 4]},
    "size mismatch": tensor("F32", [4], 0, 4),
    "absurd shape": tensor("U8", [10**11, 10**11, 10**11], 0, 4),
}


@pytest.mark.parametrize("entry", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_bad_tensor_entries_are_refused_naming_the_tensor(entry):
    with pytest.raises(FormatError, match="'a'"):
        parse({"a": entry})


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {"k": ["v"]}, ["k", "v"], "k=v"])
def test_metadata_must_map_strings_to_strings(metadata):
    with pytest.raises(FormatError, match="__metadata__"):
        parse({"__metadata__": metadata, "a": U8})


@pytest.mark.parametrize(("layout", "problem"), [
    ({"a": tensor("U8", [4], 0, 4), "b": tensor("U8", [4], 2, 6)}, "overlap"),
    ({"a": tensor("U8", [4], 0, 4), "b": tensor("U8", [4], 5, 9)}, "gap"),
    ({"a": tensor("U8", [4], 4, 8)}, "gap"),
    ({"a": tensor("U8", [4], 0, 4), "b": tensor("U8", [4], 0, 4)}, "overlap"),
    ({"a": tensor("U8", [4], 0, 4), "e": tensor("U8", [0], 5, 5)}, "gap"),
])
def test_tensors_must_tile_the_data_region_from_zero(layout, problem):
    with pytest.raises(FormatError, match=problem):
        parse(layout)


# -- the crypto metadata -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream_header(tmp_path_factory) -> dict:
    """The header object of a v2 file written by upstream with 4-byte chunks (tensor `w`: 10 bytes, 3 chunks)."""
    import numpy as np
    path = tmp_path_factory.mktemp("hdr") / "m.ct"
    write_upstream(path, {"w": np.arange(10, dtype=np.uint8), "e": np.zeros(0, np.float32)}, make_keys(),
                   {"note": "n"}, chunk_size=4)
    return split_file(path)[0]


def crypto_of(header_obj: dict):
    return parse_crypto_header(parse(header_obj), "test.ct")


class Raw(str):
    """Returned by an edit: the new field text, verbatim."""


def with_field(header_obj: dict, key: str, edit) -> dict:
    """A copy of the header with the JSON-in-a-string metadata field `key` edited in place by `edit`
    (or replaced, where `edit` returns a `Raw` text)."""
    obj = json.loads(json.dumps(header_obj))
    value = json.loads(obj["__metadata__"][key])
    result = edit(value)
    obj["__metadata__"][key] = result if isinstance(result, Raw) else json.dumps(value)
    return obj


def with_entry(header_obj: dict, edit) -> dict:
    return with_field(header_obj, "__encryption__", lambda e: edit(e["w"]))


def test_a_plain_header_has_no_crypto_header():
    assert parse_crypto_header(parse({"__metadata__": {"k": "v"}, "a": U8}), "f") is None
    assert parse_crypto_header(parse({"a": U8}), "f") is None


def test_the_upstream_crypto_header_parses(upstream_header):
    crypto = crypto_of(upstream_header)
    assert (crypto.version, crypto.chunk_size, crypto.enc.alg, crypto.enc.kid, crypto.sign.kid) == (
        "2", 4, "aes256gcm", "enc1", "sign1")
    assert len(crypto.ciphers["w"].tags) == 3 and len(crypto.ciphers["e"].tags) == 1
    assert len(crypto.signature) == 64


@pytest.mark.parametrize("missing", ["__crypto_keys__", "__policy__", "__signature__"])
def test_an_encrypted_header_needs_all_crypto_fields(upstream_header, missing):
    obj = json.loads(json.dumps(upstream_header))
    del obj["__metadata__"][missing]
    with pytest.raises(FormatError, match=missing):
        crypto_of(obj)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda k: k.update(version="3"), "version"),
    (lambda k: k.update(version=2), "version"),
    (lambda k: k.pop("version"), "version"),
    (lambda k: k.update(chunk_size=0), "chunk_size"),
    (lambda k: k.update(chunk_size=-4), "chunk_size"),
    (lambda k: k.update(chunk_size="4"), "chunk_size"),
    (lambda k: k.update(chunk_size=True), "chunk_size"),
    (lambda k: k.update(chunk_size=4.0), "chunk_size"),
    (lambda k: k["enc"].update(alg="aes512gcm"), "algorithm"),
    (lambda k: k["enc"].update(alg="A256GCM"), "algorithm"),
    (lambda k: k["sign"].update(alg="rsa"), "algorithm"),
    (lambda k: k["enc"].update(kty="OCT"), "kty"),
    (lambda k: k["sign"].update(kty="OKP"), "kty"),
    (lambda k: k["enc"].update(kid=7), "kid"),
    (lambda k: k.pop("sign"), "sign"),
    (lambda k: Raw("[1]"), "object"),
    (lambda k: Raw("{"), "JSON"),
])
def test_bad_crypto_keys_are_refused(upstream_header, edit, match):
    with pytest.raises(FormatError, match=match):
        crypto_of(with_field(upstream_header, "__crypto_keys__", edit))


@pytest.mark.parametrize(("alg", "normalised"), [("AES-256-GCM", "aes256gcm"), ("Aes256Gcm", "aes256gcm")])
def test_algorithm_names_are_normalised_as_upstream_does(upstream_header, alg, normalised):
    crypto = crypto_of(with_field(upstream_header, "__crypto_keys__", lambda k: k["enc"].update(alg=alg)))
    assert crypto.enc.alg == normalised


def test_the_chunk_mode_follows_chunk_size_not_version(upstream_header):
    v1_chunked = crypto_of(with_field(upstream_header, "__crypto_keys__", lambda k: k.update(version="1")))
    assert (v1_chunked.version, v1_chunked.chunk_size, v1_chunked.ciphers["w"].chunk_size) == ("1", 4, 4)
    v2_default = crypto_of(with_field(upstream_header, "__crypto_keys__", lambda k: k.pop("chunk_size")))
    assert v2_default.chunk_size == DEFAULT_CHUNK_SIZE
    assert len(v2_default.ciphers["w"].tags) == 1  # 10 bytes are one 2 MiB chunk; the other tags are surplus


def b64_unpadded(value: str) -> str:
    return value.rstrip("=")


def b64_urlsafe(value: str) -> str:
    return value.replace("+", "-").replace("/", "_")


@pytest.mark.parametrize(("edit", "match"), [
    (lambda e: e.update(key_iv="é" * 16), "base64"),
    (lambda e: e.update(key_iv=12), "base64"),
    (lambda e: e.update(base_iv=b64(bytes(11))), "12 bytes"),
    (lambda e: e.update(key_tag=b64(bytes(15))), "16 bytes"),
    (lambda e: e.update(wrapped_key=b64(bytes(16))), "32 bytes"),
    (lambda e: e.update(tags=b64(bytes(32))), "3 tags"),
    (lambda e: e.update(tags=b64(bytes(49))), "3 tags"),
    (lambda e: e.pop("base_iv"), "base_iv"),
    (lambda e: e.pop("key_tag"), "key_tag"),
])
def test_bad_encryption_entries_are_refused(upstream_header, edit, match):
    with pytest.raises(FormatError, match=match):
        crypto_of(with_entry(upstream_header, edit))


@pytest.mark.parametrize("field", ["wrapped_key", "tags"])
@pytest.mark.parametrize("variant", [b64_urlsafe, b64_unpadded], ids=["url-safe", "unpadded"])
def test_url_safe_or_unpadded_base64_is_refused_even_where_it_would_decode(upstream_header, field, variant):
    value = b64(b"\xfb\xff" * (16 if field == "wrapped_key" else 32))  # a valid length, with '+' '/' and '='
    assert crypto_of(with_entry(upstream_header, lambda e: e.update({field: value})))
    assert variant(value) != value
    with pytest.raises(FormatError, match="base64"):
        crypto_of(with_entry(upstream_header, lambda e: e.update({field: variant(value)})))


@pytest.mark.parametrize("key", ["__signature__", "wrapped_key", "tags"])
def test_base64_with_non_zero_trailing_bits_is_refused_as_upstream_does(upstream_header, key):
    """'AB==' and 'AA==' both decode to one zero byte in lax decoders; only the canonical one is valid."""
    length = {"__signature__": 64, "wrapped_key": 32, "tags": 64}[key]
    canonical = b64(bytes(length))
    assert canonical.endswith("A=") or canonical.endswith("A==")
    sloppy = canonical.rstrip("=")[:-1] + "B" + "=" * (len(canonical) - len(canonical.rstrip("=")))
    for value, ok in ((canonical, True), (sloppy, False)):
        if key == "__signature__":
            obj = json.loads(json.dumps(upstream_header))
            obj["__metadata__"][key] = value
        else:
            obj = with_entry(upstream_header, lambda e: e.update({key: value}))
        if ok:
            assert crypto_of(obj)
        else:
            with pytest.raises(FormatError, match="canonical"):
                crypto_of(obj)


def test_a_counter_that_would_overflow_is_refused(upstream_header):
    def base_iv_counter(counter):
        return lambda e: e.update(base_iv=b64(bytes(8) + counter.to_bytes(4, "big")))
    # `w` has 3 chunks: counters ctr0, ctr0+1, ctr0+2 must all fit in 32 bits.
    assert crypto_of(with_entry(upstream_header, base_iv_counter(0xFFFFFFFD))).ciphers["w"].iv[8:] == b"\xff\xff\xff\xfd"
    with pytest.raises(FormatError, match="overflow"):
        crypto_of(with_entry(upstream_header, base_iv_counter(0xFFFFFFFE)))


def test_v1_entries_need_iv_and_tag_except_empty_tensors_may_have_neither(upstream_header):
    v1 = with_field(upstream_header, "__crypto_keys__", lambda k: (k.pop("chunk_size"), k.update(version="1")))

    def v1_entries(w, e):
        return lambda entries: entries.update(w={**entries["w"], **w}, e={**entries["e"], **e})
    good_w = {"iv": b64(bytes(12)), "tag": b64(bytes(16))}
    crypto = crypto_of(with_field(v1, "__encryption__", v1_entries(good_w, {"iv": "", "tag": ""})))
    assert crypto.chunk_size is None
    assert crypto.ciphers["e"].tags == () and crypto.ciphers["w"].tags == (bytes(16),)
    crypto = crypto_of(with_field(v1, "__encryption__", v1_entries(good_w, good_w)))
    assert crypto.ciphers["e"].tags == (bytes(16),)
    with pytest.raises(FormatError, match="iv"):
        crypto_of(with_field(v1, "__encryption__", v1_entries({"iv": "", "tag": ""}, good_w)))
    with pytest.raises(FormatError, match="lacks tag"):
        crypto_of(with_field(v1, "__encryption__", v1_entries({"iv": b64(bytes(12))}, good_w)))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("__encryption__", json.dumps({"ghost": {}}), "ghost"),
    ("__encryption__", json.dumps({"w": "entry"}), "not an object"),
    ("__policy__", json.dumps({"local": 1}), "__policy__"),
    ("__policy__", "[]", "__policy__"),
    ("__signature__", b64(bytes(63)), "64 bytes"),
    ("__signature__", "not base64!", "base64"),
    ("__crypto_keys__", "[" * 100_000, "__crypto_keys__"),
    ("__encryption__", '{"w":' + "[" * 100_000, "__encryption__"),
    ("__policy__", '{"local": "\\ud800"}', "__policy__"),
])
def test_bad_crypto_metadata_values_are_refused(upstream_header, key, value, match):
    obj = json.loads(json.dumps(upstream_header))
    obj["__metadata__"][key] = value
    with pytest.raises(FormatError, match=match):
        crypto_of(obj)


@pytest.mark.parametrize("side", ["local", "remote"])
def test_a_policy_missing_a_side_is_refused_as_the_reference_refuses_it(upstream_header, side):
    # Filling the gap with allow-all would fail open where the reference library fails closed.
    with pytest.raises(FormatError, match=side):
        crypto_of(with_field(upstream_header, "__policy__", lambda p: p.pop(side)))


def test_unknown_entry_fields_are_ignored(upstream_header):
    crypto = crypto_of(with_entry(upstream_header, lambda e: e.update(enc_algo="aes256gcm")))
    assert len(crypto.ciphers["w"].tags) == 3


# -- fuzz: a header is refused with FormatError, or it parses and round-trips ----------------------------

def reserialised(header: Header, crypto: CryptoHeader | None) -> bytes:
    """The header as ctfs's own writers would put it back: crypto entries re-encoded, compact JSON."""
    metadata = header.metadata
    if crypto is not None:
        metadata = {**metadata, **encode_crypto_metadata(crypto), SIGNATURE_KEY: encode_signature(crypto.signature)}
    return header_json(metadata, header.tensors)


def round_trips_unless_refused(raw: bytes) -> bool:
    """Whether the parsers accept `raw`. They may refuse it with FormatError only; what they accept,
    written back and parsed again, must be the same."""
    try:
        header = parse_header(raw, file_size=None, source="fuzz")
        crypto = parse_crypto_header(header, "fuzz")
    except FormatError:
        return False
    again = parse_header(reserialised(header, crypto), file_size=None, source="again")
    assert again.tensors == header.tensors
    assert parse_crypto_header(again, "again") == crypto
    if crypto is None:
        assert again.metadata == header.metadata
    return True


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_refused_or_round_trip(raw):
    round_trips_unless_refused(raw)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_upstream_headers_are_refused_or_round_trip(upstream_header, data):
    raw = bytearray(json.dumps(upstream_header, separators=(",", ":"), ensure_ascii=False).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = data.draw(st.sampled_from(list(b'{}[]",:0123456789-.eE\\utrfn ') + [0, 0x7F, 0xC3, 0xFF]))
        if op == "replace":
            raw[at] = byte
        elif op == "insert":
            raw.insert(at, byte)
        else:
            del raw[at]
    round_trips_unless_refused(bytes(raw))


@st.composite
def valid_headers(draw) -> bytes:
    """A well-formed header: tensors of any dtype and shape tiling the data region, listed in any order."""
    names = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda n: n != "__metadata__"), unique=True,
                          max_size=5))
    entries, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        if math.prod(shape) * DTYPE_BITS[dtype] % 8:
            shape.append(8)  # sub-byte dtypes: a whole number of bytes
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        entries[name] = tensor(dtype, shape, offset, offset + size)
        offset += size
    obj = dict(draw(st.permutations(list(entries.items()))))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    if metadata is not None:
        obj = {"__metadata__": metadata, **obj}
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()


@settings(max_examples=300, deadline=None)
@given(valid_headers())
def test_generated_headers_parse_and_round_trip(raw):
    assert round_trips_unless_refused(raw)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
CRYPTO_KEYS_FIELDS = ("version", "chunk_size", "enc", "sign", "alg", "kty", "kid", "jku")
ENTRY_FIELDS = ("wrapped_key", "key_iv", "key_tag", "base_iv", "tags", "iv", "tag")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_tensor_entries_with_random_json_values_are_refused_or_round_trip(upstream_header, data):
    obj = json.loads(json.dumps(upstream_header))
    entry = obj[data.draw(st.sampled_from(["w", "e"]))]
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    if field != "dtype" and entry[field] and data.draw(st.booleans()):
        entry[field][data.draw(st.integers(0, len(entry[field]) - 1))] = data.draw(JSON_VALUES)
    else:
        entry[field] = data.draw(JSON_VALUES)
    round_trips_unless_refused(json.dumps(obj).encode())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_crypto_metadata_with_random_json_values_is_refused_or_round_trips(upstream_header, data):
    key = data.draw(st.sampled_from(["__crypto_keys__", "__encryption__", "__policy__", "__signature__"]))
    obj = json.loads(json.dumps(upstream_header))
    if data.draw(st.booleans()):
        obj["__metadata__"][key] = json.dumps(data.draw(JSON_VALUES))
    else:
        value = json.loads(obj["__metadata__"][key]) if key != "__signature__" else {}
        target = value
        if key == "__encryption__":
            target = value["w"]
        elif key == "__crypto_keys__" and data.draw(st.booleans()):
            target = value[data.draw(st.sampled_from(["enc", "sign"]))]
        if isinstance(target, dict):
            field = data.draw(st.sampled_from(CRYPTO_KEYS_FIELDS + ENTRY_FIELDS + ("local", "remote")))
            target[field] = data.draw(JSON_VALUES)
        obj["__metadata__"][key] = json.dumps(value)
    round_trips_unless_refused(json.dumps(obj).encode())
