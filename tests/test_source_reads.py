"""Reading a source file's ciphertext: ranges the page cache holds are copied from it, the others are read
from the device past it (O_DIRECT), so the mount never caches a model twice. Either way the bytes are exact,
and damage fails closed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import evict, flip_file_bit, read_plain, resident_bytes, write_plain

from ctfs.errors import FormatError, IntegrityError
from ctfs.files import fileio
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.encrypted import EncryptedFile

CHUNK = 100_003  # odd: no chunk starts or ends on a page boundary


@pytest.fixture
def encrypted(tmp_path, keys) -> tuple[Path, bytes]:
    """An encrypted file on the test's disk, and its plain view (odd chunks; the last one ends the file)."""
    rng = np.random.default_rng(7)
    tensors = {"a": rng.standard_normal(250_001).astype(np.float32), "b": rng.standard_normal(77).astype(np.float16)}
    plain = write_plain(tmp_path / "plain.safetensors", tensors)
    path = tmp_path / "model.safetensors"
    encrypt_file(plain, path, keys.enc, keys.sign, EncryptOptions("2", CHUNK))
    with EncryptedFile(path, keys.store) as ef:
        view = read_plain(ef, 0, ef.view.size)
    return path, view


def test_chunks_out_of_the_page_cache_are_read_past_it_and_are_exact(encrypted, keys):
    path, view = encrypted
    with EncryptedFile(path, keys.store) as ef:
        evict(path)
        assert read_plain(ef, 0, ef.view.size) == view
        assert read_plain(ef, 12_345, 300_000) == view[12_345:312_345]
    # Only the header, read at open, went through the page cache: none of the chunks did.
    assert resident_bytes(path) <= 2 * os.sysconf("SC_PAGE_SIZE")


def test_chunks_in_the_page_cache_are_read_from_it(encrypted, keys):
    path, view = encrypted
    path.read_bytes()
    cached = resident_bytes(path)
    assert cached >= path.stat().st_size
    with EncryptedFile(path, keys.store) as ef:
        assert read_plain(ef, 0, ef.view.size) == view
    assert resident_bytes(path) == cached


def test_a_flipped_bit_read_past_the_page_cache_fails_its_chunk(encrypted, keys):
    path, view = encrypted
    flip_file_bit(path, path.stat().st_size - 5)  # in the last chunk, which ends the file
    with EncryptedFile(path, keys.store) as ef:
        evict(path)
        assert read_plain(ef, 0, CHUNK) == view[:CHUNK]  # the first chunk is intact
        with pytest.raises(IntegrityError):
            read_plain(ef, 0, ef.view.size)


def test_a_file_cut_short_under_an_open_read_fails_instead_of_reading_past_its_end(encrypted, keys):
    path, view = encrypted
    with EncryptedFile(path, keys.store) as ef:
        os.truncate(path, path.stat().st_size - 1_000)
        evict(path)
        with pytest.raises(FormatError, match="shrank"):
            read_plain(ef, 0, ef.view.size)


def test_a_file_system_that_refuses_direct_reads_is_read_through_the_page_cache(encrypted, keys, monkeypatch):
    path, view = encrypted
    real_open = os.open

    def no_direct(file, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "open", no_direct)
    with EncryptedFile(path, keys.store) as ef:
        evict(path)
        assert read_plain(ef, 0, ef.view.size) == view
    assert resident_bytes(path) >= path.stat().st_size - CHUNK  # read through the page cache, with its read-ahead
