"""--verify full below the FUSE layer: a shard's check ahead of its open and the open meeting it."""

from __future__ import annotations

import json
import threading
from collections import defaultdict

from conftest import write_plain
from mounting import SERVED_CHUNK_SIZE, served_tensors

from ctfs.daemon.chunk_cache import ChunkCache
from ctfs.daemon.source import ModelSource, SourceOptions
from ctfs.files.encrypt import EncryptOptions, encrypt_file

NAMES = ["model-1.safetensors", "model-2.safetensors"]
WAIT = 30  # seconds: only a broken run waits this long


def test_an_open_meeting_the_check_ahead_of_its_shard_waits_for_it_and_checks_nothing_again(tmp_path, keys):
    src = tmp_path / "src"
    src.mkdir()
    plain = write_plain(tmp_path / "plain.safetensors", served_tensors())
    for name in NAMES:
        encrypt_file(plain, src / name, keys.enc, keys.sign, EncryptOptions("2", SERVED_CHUNK_SIZE))
    weight_map = {f"w{i}": name for i, name in enumerate(NAMES)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    source = ModelSource(src, keys.store, ChunkCache(1 << 20), SourceOptions(verify_full=True))
    entries = {name: source.child(source.root_entry(), name, f"/{name}") for name in NAMES}
    stored: defaultdict[str, int] = defaultdict(int)
    held, release = threading.Event(), threading.Event()

    def publisher(path, entry):
        def publish(offset, data):
            if path == f"/{NAMES[1]}":  # the check ahead of model-2 stops in its first store
                held.set()
                release.wait(WAIT)
            stored[path] += len(data)
        return publish

    first = source.open(f"/{NAMES[0]}", entries[NAMES[0]], None, publisher)
    assert held.wait(WAIT)
    opened = []
    second_open = threading.Thread(
        target=lambda: opened.append(source.open(f"/{NAMES[1]}", entries[NAMES[1]], None, publisher)))
    second_open.start()
    second_open.join(0.5)
    assert second_open.is_alive()  # waiting for the check under way, not checking on its own
    release.set()
    second_open.join(WAIT)
    assert opened
    for version in (first, *opened):
        version.let_go()
    source.close()
    encrypted_bytes = sum(t.nbytes for t in served_tensors().values())
    assert source.stats()["verified_bytes"] == 2 * encrypted_bytes  # each shard checked once
    assert stored == {f"/{name}": entries[name].size for name in NAMES}  # and published once
