"""The demo: a tiny Llama made here, encrypted, mounted, and loaded by transformers from the mount."""

from __future__ import annotations

import gc
import json
import os
import shutil
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctfs.atomic import atomic_output, write_all
from ctfs.crypto.signing import public_key_of
from ctfs.errors import CtfsError
from ctfs.format.encryption import parse_crypto_header
from ctfs.keys.jwk import EncryptionKey, SigningKey, to_reference_jwk
from ctfs.modeldir import is_safetensors, transform_tree, walk_files
from ctfs.reader import read_header
from ctfs.writer import EncryptOptions, encrypt_file

# Small chunks so even this tiny model's tensors span several of them, as a real model's do.
DEMO_CHUNK_SIZE = 16 * 1024
# Fixed prompt token ids: the forward pass must be reproducible.
DEMO_TOKEN_IDS = [[1, 17, 42, 7, 99, 3, 250, 64]]
MOUNT_TIMEOUT = 60.0


def make_tiny_llama(directory: str | os.PathLike[str], seed: int = 0, shards: int = 3):
    """Save a Llama-style model with random weights from `seed` into `directory` as exactly `shards`
    safetensors shards plus `model.safetensors.index.json`; return the model, in eval mode."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=shards,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    # save_pretrained shards greedily by size; pick the largest limit that gives `shards` files.
    total = sum(t.numel() * t.element_size() for t in state.values())
    for limit in range(total, 0, -max(1, total // 256)):
        if len(split_torch_state_dict_into_shards(state, max_shard_size=limit).filename_to_tensors) == shards:
            break
    else:
        raise ValueError(f"cannot split the tiny model into {shards} shards")
    model.save_pretrained(directory, max_shard_size=limit)
    return model


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
        if is_safetensors(rel):
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
