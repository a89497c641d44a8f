"""Unmodified consumers read a mount byte-exactly: safetensors, numpy, plain and O_DIRECT reads, transformers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, make_keys, read_raw
from mounting import (
    CHILD_TIMEOUT,
    SERVED_METADATA,
    SERVED_NAMES,
    consume,
    make_served_dir,
    mounted,
    mountinfo_entry,
    requires_fuse,
    served_tensors,
    write_key_file,
)

from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.modeldir import transform_tree
from demo.tiny_llama import DEMO_TOKEN_IDS, make_tiny_llama

pytestmark = requires_fuse

# Consumers that see tensors (mmap'd by safetensors unless named otherwise), and those that see file bytes.
TENSOR_CONSUMERS = ("safe_open_np", "safe_open_pt", "safe_open_pread", "load_file_pt", "load_bytes_pt")
BYTE_CONSUMERS = ("memmap_r", "memmap_c", "read", "o_direct")
# Consumers whose report carries the file's metadata.
WITH_METADATA = ("safe_open_np", "safe_open_pt", "safe_open_pread")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("consumers")
    keys = make_keys()
    src, views = make_served_dir(root, keys)
    key_file = write_key_file(root / "keys.jwk", keys)
    with mounted(src, root / "mnt", "--keys", str(key_file)) as mount:
        yield mount, views


def tensor_report(view_path) -> dict:
    """What a tensor consumer must report for a plain view, from the tests' own parser of the container."""
    metadata, raw = read_raw(view_path)
    return {"metadata": metadata,
            "tensors": {name: [dtype, shape, hashlib.sha256(data).hexdigest()] for name, (dtype, shape, data) in raw.items()}}


def test_the_expected_views_hold_the_original_tensors(served):
    _, views = served
    for name, view in views.items():
        metadata, raw = read_raw(view)
        assert metadata == SERVED_METADATA, name
        assert {n: data for n, (_, _, data) in raw.items()} == {n: a.tobytes() for n, a in served_tensors().items()}


# One child per consumer reads every file: each child pays for its imports (torch) once.
@pytest.mark.parametrize("kind", TENSOR_CONSUMERS)
def test_tensor_consumers_see_the_plain_tensors(served, kind):
    mount, views = served
    run = consume(kind, *(mount.path(name) for name in SERVED_NAMES))
    assert run.returncode == 0, run.stderr
    for name, got in zip(SERVED_NAMES, run.results, strict=True):
        want = tensor_report(views[name])
        if kind not in WITH_METADATA:
            want["metadata"] = None
        assert got == want, name


@pytest.mark.parametrize("kind", BYTE_CONSUMERS)
def test_byte_consumers_see_the_plain_file(served, kind):
    mount, views = served
    run = consume(kind, *(mount.path(name) for name in SERVED_NAMES))
    assert run.returncode == 0, run.stderr
    for name, got in zip(SERVED_NAMES, run.results, strict=True):
        plain = views[name].read_bytes()
        assert got == {"size": len(plain), "sha256": hashlib.sha256(plain).hexdigest()}, name


# -- transformers --------------------------------------------------------------------------------------

LOAD_AND_RUN = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
with torch.no_grad():
    torch.save(model(torch.tensor(%r)).logits, sys.argv[2])
""" % (DEMO_TOKEN_IDS,)


def test_transformers_loads_a_sharded_model_from_the_mount_with_the_original_logits(tmp_path):
    plain, encrypted = tmp_path / "plain", tmp_path / "encrypted"
    original = make_tiny_llama(plain, seed=0, shards=3)
    keys = make_keys()
    options = EncryptOptions("2", 8192)
    shards = transform_tree(plain, encrypted, lambda s, d: encrypt_file(s, d, keys.enc, keys.sign, options))
    assert len(shards) == 3
    index = json.loads((plain / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(str(s) for s in shards)
    with torch.no_grad():
        want = original(torch.tensor(DEMO_TOKEN_IDS)).logits
    key_file = write_key_file(tmp_path / "keys.jwk", keys)
    with mounted(encrypted, tmp_path / "mnt", "--keys", str(key_file)) as mount:
        assert sorted(os.listdir(mount.mountpoint)) == sorted(os.listdir(plain))
        for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
            assert mount.path(name).read_bytes() == (plain / name).read_bytes(), name
        logits_file = tmp_path / "logits.pt"
        load = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(mount.mountpoint), str(logits_file)],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert load.returncode == 0, load.stderr[-3000:]
    got = torch.load(logits_file)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"


def test_the_demo_reproduces_the_logits_and_unmounts(tmp_path):
    demo = subprocess.run([sys.executable, "-m", "demo", "--workdir", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=3 * CHILD_TIMEOUT, stdin=subprocess.DEVNULL)
    assert demo.returncode == 0, demo.stdout + demo.stderr[-3000:]
    assert "torch.equal to the original: True, max abs diff = 0" in demo.stdout
    assert demo.stdout.rstrip().endswith("demo passed")
    assert mountinfo_entry(tmp_path / "mnt") is None
