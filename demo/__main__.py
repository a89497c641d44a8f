"""The demo (`python -m demo`): a tiny Llama made here, encrypted, mounted, and loaded by transformers from the mount."""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctfs.crypto.signing import public_key_of
from ctfs.errors import CtfsError
from ctfs.files.atomic import atomic_output, write_all
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.fileio import read_header
from ctfs.files.modeldir import is_safetensors, transform_tree, walk_files
from ctfs.format.encryption import parse_crypto_header
from ctfs.keys.jwk import EncryptionKey, SigningKey, to_reference_jwk
from demo.tiny_llama import DEMO_TOKEN_IDS, make_tiny_llama

# Small chunks so even this tiny model's tensors span several of them, as a real model's do.
DEMO_CHUNK_SIZE = 16 * 1024
MOUNT_TIMEOUT = 60.0


def write_demo_keys(path: Path) -> tuple[EncryptionKey, SigningKey]:
    """A fresh master key and signing key, saved as a JWK Set readable by its owner only."""
    seed = secrets.token_bytes(32)
    enc = EncryptionKey("aes256gcm", secrets.token_bytes(32), kid="demo-enc")
    sign = SigningKey(public_key_of(seed), seed, kid="demo-sign")
    doc = json.dumps({"keys": [to_reference_jwk(enc), to_reference_jwk(sign)]}, indent=2) + "\n"
    with atomic_output(path, 0o600) as fd:
        write_all(fd, doc.encode())
    return enc, sign


def encrypted_tensor_count(directory: Path) -> int:
    count = 0
    for rel in walk_files(directory):
        if is_safetensors(directory / rel):
            path = directory / rel
            fd = os.open(path, os.O_RDONLY)
            try:
                crypto = parse_crypto_header(read_header(fd, os.fstat(fd).st_size, str(path)), str(path))
            finally:
                os.close(fd)
            count += len(crypto.ciphers) if crypto else 0
    return count


def ctfs_command(*args: str) -> subprocess.CompletedProcess:
    """Run the ctfs CLI in a child process: the daemon must never live in the process that reads the mount."""
    return subprocess.run([sys.executable, "-m", "ctfs", *args], capture_output=True, text=True,
                          timeout=MOUNT_TIMEOUT)


def unmount_demo(mountpoint: Path, echo: Callable[[str], None]) -> None:
    stopped = ctfs_command("umount", str(mountpoint))
    if stopped.returncode == 0:
        echo(f"unmounted  {mountpoint}")
        return
    echo(f"unmount    refused ({stopped.stderr.strip()}); detaching lazily")
    ctfs_command("umount", "--lazy", str(mountpoint))


@dataclass
class DemoResult:
    logits_equal: bool
    files_equal: bool

    @property
    def ok(self) -> bool:
        return self.logits_equal and self.files_equal


def compare_logits(original, mountpoint: Path, echo: Callable[[str], None]) -> bool:
    """Load the model from the mount and run the fixed prompt through both models."""
    import torch
    from transformers import AutoModelForCausalLM

    began = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(mountpoint, attn_implementation="eager").eval()
    load_seconds = time.perf_counter() - began
    with torch.no_grad():
        ids = torch.tensor(DEMO_TOKEN_IDS)
        want, got = original(ids).logits, loaded(ids).logits
    equal = torch.equal(want, got)
    echo(f"loaded     AutoModelForCausalLM.from_pretrained({mountpoint}) in {load_seconds:.2f} s")
    echo(f"logits     shape {tuple(got.shape)}, torch.equal to the original: {equal}, "
         f"max abs diff = {(want - got).abs().max().item():g}")
    return equal


def run_demo(workdir: Path, echo: Callable[[str], None] = print) -> DemoResult:
    """Make, encrypt, mount, load and compare; always unmounts. Returns what matched."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: the model is made here
    plain, encrypted, mountpoint = workdir / "plain", workdir / "encrypted", workdir / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    original = make_tiny_llama(plain)
    key_file = workdir / "demo-keys.jwk"
    enc_key, sign_key = write_demo_keys(key_file)
    options = EncryptOptions(version="2", chunk_size=DEMO_CHUNK_SIZE)
    shutil.rmtree(encrypted, ignore_errors=True)  # the demo's own output from an earlier run in this workdir
    shards = transform_tree(plain, encrypted, lambda s, d: encrypt_file(s, d, enc_key, sign_key, options))
    echo(f"model      tiny Llama, {sum(p.numel() for p in original.parameters()):,} parameters, "
         f"{len(shards)} shards + index, made in {plain}")
    for rel in shards:
        echo(f"  {rel}  plain {(plain / rel).stat().st_size:,} B  encrypted {(encrypted / rel).stat().st_size:,} B")
    echo(f"encrypted  {encrypted_tensor_count(encrypted)} tensors, AES-256-GCM, "
         f"{DEMO_CHUNK_SIZE // 1024} KiB chunks, key file {key_file}")

    log_file = workdir / "daemon.log"
    started = ctfs_command("mount", str(encrypted), str(mountpoint), "--keys", str(key_file), "--log-file", str(log_file))
    if started.returncode != 0:
        raise CtfsError(f"ctfs mount failed: {started.stderr.strip()}")
    try:
        echo(f"mounted    {encrypted} at {mountpoint} (daemon log {log_file})")
        files_equal = all((mountpoint / rel).read_bytes() == (plain / rel).read_bytes() for rel in shards)
        echo(f"bytes      every shard read through the mount equals its plaintext: {files_equal}")
        logits_equal = compare_logits(original, mountpoint, echo)
        gc.collect()  # the loaded model maps the mounted shards: release them so the unmount is not busy
    finally:
        unmount_demo(mountpoint, echo)
    return DemoResult(logits_equal, files_equal)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m demo", description=(
        "Make a tiny Llama locally, encrypt it, mount it, load it with transformers, compare the logits."))
    parser.add_argument("--workdir", type=Path, help="keep the demo's files here (default: a temporary directory)")
    args = parser.parse_args()
    try:
        if args.workdir:
            result = run_demo(args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="ctfs-demo-") as tmp:
                result = run_demo(Path(tmp))
    except CtfsError as exc:
        sys.exit(f"demo: error: {exc}")
    print("demo passed" if result.ok else "demo FAILED: the mount did not reproduce the model")
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
