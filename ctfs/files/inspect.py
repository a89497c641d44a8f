"""What `ctfs inspect` reports of a file: its tensors, how they are encrypted, keys, policy and signature."""

from __future__ import annotations

import os
from pathlib import Path

from ctfs.errors import CtfsError
from ctfs.files.encrypted import verify_signature
from ctfs.files.fileio import read_header
from ctfs.format.encryption import parse_crypto_header
from ctfs.format.view import tensor_chunk_count
from ctfs.keys.store import KeySource


def describe(path: Path, keys: KeySource | None) -> dict:
    """A JSON-ready description; the signature is checked only when `keys` are given."""
    fd = os.open(path, os.O_RDONLY)
    try:
        header = read_header(fd, os.fstat(fd).st_size, str(path))
    finally:
        os.close(fd)
    crypto = parse_crypto_header(header, str(path))
    report: dict = {"file": str(path), "encrypted": crypto is not None}
    if crypto is not None:
        report.update(
            version=crypto.version, chunk_size=crypto.chunk_size, algorithm=crypto.enc.alg,
            enc_kid=crypto.enc.kid, sign_kid=crypto.sign.kid, policy=crypto.policy_local,
        )
        if keys is not None:
            try:
                verify_signature(header, crypto, keys, str(path))
                report["signature"] = "valid (trusted signer)"
            except CtfsError as exc:
                report["signature"] = f"INVALID: {exc}"
        else:
            report["signature"] = "not checked (no keys given)"
    report["tensors"] = [
        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes,
         "encrypted": crypto is not None and t.name in crypto.ciphers,
         **({"chunks": tensor_chunk_count(crypto.ciphers[t.name], t)}
            if crypto is not None and t.name in crypto.ciphers else {})}
        for t in header.by_offset
    ]
    return report
