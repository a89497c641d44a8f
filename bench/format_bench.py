"""Throughput and peak memory of ctfs encrypt/decrypt against the reference library's save/load.

    .venv/bin/python bench/format_bench.py [--size 1G] [--chunk-size 2097152] [--alg aes256gcm] [--repeat 1]

Builds a random safetensors file of `--size` bytes in a temporary directory, then runs each operation in
its own child process, so every peak RSS (VmHWM) is isolated and includes the interpreter:

* ctfs `encrypt_file` (plain file on disk -> encrypted file) vs `cryptotensors.numpy.save_file` (tensors
  already in memory -> encrypted file: the reference is not charged for reading its input);
* ctfs `decrypt_file` (encrypted file -> plain file) vs `cryptotensors.safe_open(...).get_tensor` of every
  tensor (encrypted file -> tensors in memory); also, for information, that load followed by writing and
  fsyncing the plain file, which is what `decrypt_file` delivers;
* for information, the disk's floor: the plain file's size written and fsynced, with no decryption.

Throughput is data bytes / seconds of the operation alone (imports and input preparation excluded), in
GB/s (10^9 bytes). Targets are printed as pass/fail, never asserted: ctfs >= 1.0x the reference, and the
peak RSS of each ctfs operation <= 256 MiB.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.0
TARGET_RSS_MIB = 256
TENSOR_COUNT = 16
WRITE_BLOCK = 16 * 1024 * 1024


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- setup -------------------------------------------------------------------------------------------

def write_random_safetensors(path: Path, size: int) -> int:
    """A plain file of TENSOR_COUNT F32 tensors totalling about `size` bytes, written block by block so
    the parent never holds the data. Returns the data byte count."""
    per_tensor = max(4, size // TENSOR_COUNT // 4 * 4)
    header, offset = {}, 0
    for i in range(TENSOR_COUNT):
        header[f"layer.{i:02d}.weight"] = {"dtype": "F32", "shape": [per_tensor // 4], "data_offsets": [offset, offset + per_tensor]}
        offset += per_tensor
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        left = offset
        while left:
            n = min(WRITE_BLOCK, left)
            f.write(os.urandom(n))
            left -= n
    return offset


def write_keys(path: Path, alg: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    lengths = {"aes128gcm": 16, "aes256gcm": 32, "chacha20poly1305": 32}
    seed = os.urandom(32)
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    doc = {"keys": [
        {"kty": "oct", "alg": alg, "kid": "bench-enc", "k": b64(os.urandom(lengths[alg]))},
        {"kty": "okp", "alg": "ed25519", "kid": "bench-sign", "x": b64(public), "d": b64(seed)},
    ]}
    path.write_text(json.dumps(doc))
    path.chmod(0o600)


# -- children: one operation each, reporting its time and the process's peak RSS -----------------------

def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(op: str, keys_path: str, src: str, dst: str, chunk_size: int) -> None:
    from ctfs.keys.jwk import load_key_file
    from ctfs.keys.store import KeyStore

    keys = KeyStore(load_key_file(keys_path))
    reference_config = {"enc_key": None, "sign_key": None}
    for jwk in json.loads(Path(keys_path).read_text())["keys"]:
        reference_config["enc_key" if jwk["kty"] == "oct" else "sign_key"] = jwk

    if op == "ctfs-encrypt":
        from ctfs.files.encrypt import EncryptOptions, encrypt_file
        start = time.perf_counter()
        encrypt_file(src, dst, keys.first_encryption_key(), keys.signing_key(), EncryptOptions(chunk_size=chunk_size))
    elif op == "ctfs-decrypt":
        from ctfs.files.decrypt import decrypt_file
        start = time.perf_counter()
        decrypt_file(src, dst, keys)
    elif op == "reference-save":
        from cryptotensors.numpy import save_file
        from safetensors.numpy import load_file
        tensors = load_file(src)  # input preparation, not timed
        start = time.perf_counter()
        save_file(tensors, dst, config={**reference_config, "version": "2", "chunk_size": chunk_size})
    elif op == "reference-load":
        import cryptotensors
        start = time.perf_counter()
        with cryptotensors.safe_open(src, framework="np", config=reference_config) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        assert tensors
    elif op == "reference-export":
        # Like for like with ctfs decrypt_file: load with the reference, write the plain file, fsync it.
        import cryptotensors
        from safetensors.numpy import save_file
        start = time.perf_counter()
        with cryptotensors.safe_open(src, framework="np", config=reference_config) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        save_file(tensors, dst)
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elif op == "write-floor":
        # No decryption at all: the plain file's bytes written and fsynced, the least a decrypt must do.
        block = os.urandom(WRITE_BLOCK)
        size = os.path.getsize(src)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        start = time.perf_counter()
        for offset in range(0, size, WRITE_BLOCK):
            os.write(fd, block[:min(WRITE_BLOCK, size - offset)])
        os.fsync(fd)
        os.close(fd)
    elif op == "baseline":
        import cryptotensors  # noqa: F401
        import numpy  # noqa: F401

        import ctfs.files.decrypt  # noqa: F401
        import ctfs.files.encrypt  # noqa: F401
        start = time.perf_counter()
    else:
        raise SystemExit(f"unknown operation {op}")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib()}))


def run_child(op: str, keys_path: Path, src: Path, dst: Path, chunk_size: int) -> dict[str, float]:
    # Flush earlier runs' dirty pages first, so their write-back is not charged to this run.
    os.sync()
    cmd = [sys.executable, __file__, "--child", op, str(keys_path), str(src), str(dst), str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def best_of(repeat: int, op: str, *args) -> dict[str, float]:
    """Fastest of `repeat` runs; the peak RSS is the largest seen."""
    runs = [run_child(op, *args) for _ in range(repeat)]
    return {"seconds": min(r["seconds"] for r in runs), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


# -- report ------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        op, keys_path, src, dst, chunk_size = sys.argv[2:7]
        child(op, keys_path, src, dst, int(chunk_size))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=2**30, help="data bytes, e.g. 1G, 256M (default 1G)")
    parser.add_argument("--chunk-size", type=int, default=2 * 1024 * 1024, help="v2 chunk size for both libraries")
    parser.add_argument("--alg", default="aes256gcm", choices=["aes256gcm", "aes128gcm", "chacha20poly1305"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per operation; the fastest counts")
    parser.add_argument("--tmpdir", default=None, help="where to put the temporary files (about 5x --size)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ctfs-bench-", dir=args.tmpdir))
    try:
        keys = work / "keys.jwk"
        write_keys(keys, args.alg)
        plain, ours, ref = work / "plain.safetensors", work / "ctfs.ct", work / "reference.ct"
        data_bytes = write_random_safetensors(plain, args.size)
        print(f"data: {data_bytes / 2**30:.3f} GiB in {TENSOR_COUNT} F32 tensors; {args.alg}, v2, "
              f"chunk {args.chunk_size} B; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
        baseline = run_child("baseline", keys, plain, work / "none", args.chunk_size)
        results = {
            "reference save": best_of(args.repeat, "reference-save", keys, plain, ref, args.chunk_size),
            "ctfs encrypt_file": best_of(args.repeat, "ctfs-encrypt", keys, plain, ours, args.chunk_size),
            "reference load": best_of(args.repeat, "reference-load", keys, ref, work / "none", args.chunk_size),
            "ctfs decrypt_file": best_of(args.repeat, "ctfs-decrypt", keys, ours, work / "decrypted", args.chunk_size),
            "ref. load+write": best_of(args.repeat, "reference-export", keys, ref, work / "exported", args.chunk_size),
            "write+fsync only": best_of(args.repeat, "write-floor", keys, plain, work / "written", args.chunk_size),
        }
        same = (work / "decrypted").read_bytes() == plain.read_bytes() if data_bytes <= 2**31 else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gbps = {name: data_bytes / r["seconds"] / 1e9 for name, r in results.items()}
    pairs = {"ctfs encrypt_file": "reference save", "ctfs decrypt_file": "reference load"}
    print(f"\n{'operation':<20}{'seconds':>9}{'GB/s':>8}{'ctfs/ref':>10}{'peak RSS MiB':>14}")
    for name, r in results.items():
        ratio = f"{gbps[name] / gbps[pairs[name]]:.2f}x" if name in pairs else "-"
        print(f"{name:<20}{r['seconds']:>9.2f}{gbps[name]:>8.2f}{ratio:>10}{r['peak_rss_mib']:>14.0f}")
    print(f"{'(interpreter+imports)':<20}{'':>9}{'':>8}{'':>10}{baseline['peak_rss_mib']:>14.0f}")
    print("ctfs encrypt_file and decrypt_file fsync their output; the reference save and load do not write or\n"
          "sync a file of their own choosing. 'ref. load+write' (reference load, then a plain file written and\n"
          f"fsynced) is the like-for-like of decrypt_file: ctfs is "
          f"{gbps['ctfs decrypt_file'] / gbps['ref. load+write']:.2f}x its throughput (informational).\n"
          "'write+fsync only' writes and fsyncs the plain file's size with no decryption, the least any decrypt\n"
          f"to this filesystem must do: it alone reaches {gbps['write+fsync only'] / gbps['reference load']:.2f}x "
          f"the reference load; ctfs decrypt_file runs at {gbps['ctfs decrypt_file'] / gbps['write+fsync only']:.2f}x it.")
    if same is not None:
        print(f"\ndecrypted file identical to the source: {same}")
    print("\ntargets:")
    for ours_name, ref_name in pairs.items():
        ratio = gbps[ours_name] / gbps[ref_name]
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        print(f"  {ours_name} >= {TARGET_RATIO:.1f}x {ref_name}: {verdict} ({ratio:.2f}x)")
    for name in pairs:
        rss = results[name]["peak_rss_mib"]
        verdict = "PASS" if rss <= TARGET_RSS_MIB else "FAIL"
        print(f"  {name} peak RSS <= {TARGET_RSS_MIB} MiB: {verdict} ({rss:.0f} MiB)")


if __name__ == "__main__":
    main()
