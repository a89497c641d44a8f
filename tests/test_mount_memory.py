"""Memory images: with FUSE passthrough, an encrypted file is decrypted whole at its first open into a sealed
memory file the kernel reads itself. Reads never reach the daemon, tampering fails the open, a file that does
not fit the budget is served through the chunk cache, and one node's opens never mix the two."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import threading

import numpy as np
import pytest
from conftest import flip_file_bit, make_keys, write_plain
from mounting import (
    CHILD_TIMEOUT,
    SERVED_CHUNK_SIZE,
    call_with_timeout,
    consume,
    ctfs,
    mounted,
    requires_fuse,
    served_tensors,
    wait_until,
    write_key_file,
)

from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file

pytestmark = requires_fuse

KERNEL_PASSTHROUGH = "encrypted files are served from memory images"
IMAGES = ("--memory-budget", "1G")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Two encrypted files of the same tensors (one with a ciphertext bit flipped) and their plain view."""
    root = tmp_path_factory.mktemp("memory")
    keys = make_keys()
    src = root / "src"
    src.mkdir()
    plain = write_plain(root / "plain.safetensors", served_tensors())
    for name in ("a.safetensors", "b.safetensors", "flipped.safetensors"):
        encrypt_file(plain, src / name, keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    flip_file_bit(src / "flipped.safetensors", (src / "flipped.safetensors").stat().st_size - 1000)
    decrypt_file(src / "a.safetensors", root / "a.plain", keys.store)
    return {"src": src, "keys": write_key_file(root / "keys.jwk", keys), "plain": (root / "a.plain").read_bytes()}


def stats(mount) -> dict:
    return json.loads(os.getxattr(mount.mountpoint, "user.ctfs.stats"))


def read_all(path) -> bytes:
    return call_with_timeout(path.read_bytes)


def require_passthrough(mount) -> None:
    """These tests are about the kernel's passthrough; say so loudly where the kernel has none."""
    if KERNEL_PASSTHROUGH not in mount.log():
        pytest.fail(f"the daemon did not get FUSE passthrough (kernel {os.uname().release}):\n{mount.log()}")


def test_reads_and_mmaps_are_served_by_the_kernel_from_the_image(tree, tmp_path):
    with mounted(tree["src"], tmp_path / "mnt", "--keys", str(tree["keys"]), *IMAGES) as mount:
        require_passthrough(mount)
        path = mount.path("a.safetensors")
        assert read_all(path) == tree["plain"]
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert hashlib.sha256(mapped).digest() == hashlib.sha256(tree["plain"]).digest()
        direct = consume("o_direct", path)
        assert direct.result["sha256"] == hashlib.sha256(tree["plain"]).hexdigest(), direct.stderr
        counters = stats(mount)
    assert counters["read_requests"] == 0  # not one read reached the daemon
    assert counters["images_built"] == 1  # three opens, one decryption
    assert counters["image_decrypted_bytes"] == sum(t.nbytes for t in served_tensors().values())
    assert counters["decrypted_bytes"] == 0


def test_a_tampered_file_fails_at_open_not_in_a_readers_mmap(tree, tmp_path):
    with mounted(tree["src"], tmp_path / "mnt", "--keys", str(tree["keys"]), *IMAGES) as mount:
        require_passthrough(mount)
        with pytest.raises(OSError) as refused:
            call_with_timeout(lambda: open(mount.path("flipped.safetensors"), "rb"))
        assert refused.value.errno == errno.EIO
        assert read_all(mount.path("a.safetensors")) == tree["plain"]  # the daemon serves on
        assert "flipped.safetensors" in mount.log() and "tag" in mount.log()
        assert stats(mount)["images"] == 1


def test_a_file_larger_than_the_budget_is_served_through_the_chunk_cache(tree, tmp_path):
    budget = str(len(tree["plain"]) - 1)
    with mounted(tree["src"], tmp_path / "mnt", "--keys", str(tree["keys"]), "--memory-budget", budget) as mount:
        require_passthrough(mount)
        assert read_all(mount.path("a.safetensors")) == tree["plain"]
        counters = stats(mount)
    assert counters["images"] == 0 and counters["read_requests"] > 0
    assert counters["decrypted_bytes"] >= sum(t.nbytes for t in served_tensors().values())


def test_an_unused_image_makes_room_and_one_nodes_opens_never_mix_modes(tree, tmp_path):
    """Room for one image: b is served through the cache while a's image is in use; an open of b while that
    cached open lives stays cached (the kernel would fail a passthrough open beside it), and once b has no
    open left, its next open drops a's unused image for b's own."""
    budget = str(len(tree["plain"]) + 4096)
    with mounted(tree["src"], tmp_path / "mnt", "--keys", str(tree["keys"]), "--memory-budget", budget) as mount:
        require_passthrough(mount)
        with open(mount.path("a.safetensors"), "rb") as a:
            with open(mount.path("b.safetensors"), "rb") as b:
                assert stats(mount)["images"] == 1
        # a is closed now, b's cached open too: hold a new cached open of b, then open b again beside it
        with open(mount.path("a.safetensors"), "rb") as a, open(mount.path("b.safetensors"), "rb") as b:
            a.close()
            with open(mount.path("b.safetensors"), "rb") as b2:
                assert call_with_timeout(b2.read) == tree["plain"]
            assert call_with_timeout(b.read) == tree["plain"]
            assert stats(mount)["images_built"] == 1
        assert read_all(mount.path("b.safetensors")) == tree["plain"]
        counters = stats(mount)
    assert counters["images_built"] == 2 and counters["images"] == 1


def test_a_replaced_file_gets_a_new_image_while_the_old_reader_keeps_its_bytes(tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tree["src"], src)
    with mounted(src, tmp_path / "mnt", "--keys", str(tree["keys"]), *IMAGES) as mount:
        require_passthrough(mount)
        with open(mount.path("a.safetensors"), "rb") as old:
            os.replace(src / "flipped.safetensors", src / "a.safetensors")
            with pytest.raises(OSError) as refused:
                call_with_timeout(lambda: open(mount.path("a.safetensors"), "rb"))
            assert refused.value.errno == errno.EIO
            assert call_with_timeout(old.read) == tree["plain"]


def test_memory_budget_zero_serves_through_the_chunk_cache(tree, tmp_path):
    with mounted(tree["src"], tmp_path / "mnt", "--keys", str(tree["keys"]), "--memory-budget", "0") as mount:
        assert read_all(mount.path("a.safetensors")) == tree["plain"]
        counters = stats(mount)
    assert KERNEL_PASSTHROUGH not in mount.log()
    assert "images" not in counters and counters["read_requests"] > 0


def test_an_open_that_waits_leaves_the_daemon_answering_everything_else(tree, tmp_path):
    """An encrypted file's open may take long (a whole-file decryption, a key service): it is answered from
    its own thread, so even a daemon with one FUSE worker keeps answering, its health check included."""
    keys = make_keys()
    gate, fifo = tmp_path / "gate", tmp_path / "fifo"
    os.mkfifo(fifo)
    master = tmp_path / "master.jwk"
    master.write_text(json.dumps(keys.enc_jwk))
    command = tmp_path / "key-command"
    started = tmp_path / "started"
    # Prints the master key; while `gate` exists, only once a line arrives on `fifo`.
    command.write_text(f"#!/bin/sh\nif [ -e {gate} ]; then touch {started}; read line < {fifo}; fi\ncat {master}\n")
    command.chmod(0o700)
    trust = write_key_file(tmp_path / "trust.jwk", keys, private=False)
    config = tmp_path / "one-worker.toml"
    config.write_text("threads = 1\n")
    with mounted(tree["src"], tmp_path / "mnt", "--key-command", str(command), "--trust", str(trust),
                 "--config", str(config)) as mount:
        gate.touch()
        reload = ctfs("reload", str(mount.mountpoint))  # a new key chain: the next open runs the command again
        assert reload.returncode == 0, reload.stderr
        assert wait_until(lambda: "keys and policy reloaded" in mount.log()), mount.log()
        outcome = {}
        opening = threading.Thread(target=lambda: outcome.update(data=mount.path("a.safetensors").read_bytes()),
                                   daemon=True)
        opening.start()
        assert wait_until(started.exists), mount.log()  # the open waits in the key command now
        assert call_with_timeout(lambda: os.getxattr(mount.mountpoint, "user.ctfs.pid"), timeout=30)
        assert sorted(call_with_timeout(lambda: os.listdir(mount.mountpoint), timeout=30)) == sorted(
            os.listdir(tree["src"]))
        assert opening.is_alive() and not outcome
        with open(fifo, "w") as release:
            release.write("go\n")
        opening.join(CHILD_TIMEOUT)
        assert outcome.get("data") == tree["plain"]


def test_while_a_shard_is_read_the_next_one_in_the_index_is_built(tree, tmp_path):
    """transformers and vLLM read a sharded model's files in the sorted order of its index: opening one
    builds the image of the next, so the loader's work on one overlaps the decryption of the next."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("model-1.safetensors", "model-2.safetensors", "model-3.safetensors", "other.safetensors"):
        shutil.copy(tree["src"] / "a.safetensors", src / name)
    # Same bytes, so one image would do: each gets its own version all the same (a path and an inode).
    weight_map = {"w1": "model-1.safetensors", "w2": "model-2.safetensors", "w3": "model-3.safetensors"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with mounted(src, tmp_path / "mnt", "--keys", str(tree["keys"]), *IMAGES) as mount:
        require_passthrough(mount)
        assert read_all(mount.path("model-1.safetensors")) == tree["plain"]
        assert wait_until(lambda: stats(mount)["images_built"] == 2)  # model-1's, and model-2's ahead of its open
        assert read_all(mount.path("model-2.safetensors")) == tree["plain"]
        assert wait_until(lambda: stats(mount)["images_built"] == 3)  # model-3's: the last
        assert read_all(mount.path("model-3.safetensors")) == tree["plain"]
        assert read_all(mount.path("other.safetensors")) == tree["plain"]  # in no index: nothing after it
        counters = stats(mount)
    assert counters["images_built"] == 4 and counters["images"] == 4


def test_an_unmount_while_the_next_shard_is_built_ends_the_daemon_cleanly(tree, tmp_path):
    """The image built ahead of its open registers with the FUSE session: an unmount during that build must
    stop it before the session goes, not crash the daemon on its way out."""
    keys = make_keys()
    src = tmp_path / "src"
    src.mkdir()
    big = write_plain(tmp_path / "big.safetensors", {"w": np.zeros(64 * 2**20, dtype=np.float32)})  # 256 MiB
    encrypt_file(big, src / "model-2.safetensors", keys.enc, keys.sign, EncryptOptions("2"))
    small = write_plain(tmp_path / "small.safetensors", served_tensors())
    encrypt_file(small, src / "model-1.safetensors", keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    weight_map = {"w1": "model-1.safetensors", "w2": "model-2.safetensors"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    key_file = write_key_file(tmp_path / "keys.jwk", keys)
    with mounted(src, tmp_path / "mnt", "--keys", str(key_file), *IMAGES) as mount:
        require_passthrough(mount)
        assert len(read_all(mount.path("model-1.safetensors"))) > 0  # model-2's image is built from now on
        result = ctfs("umount", str(mount.mountpoint))
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: f"unmounted {mount.mountpoint}" in mount.log()), mount.log()
