"""Key rotation: data keys re-wrapped, header re-signed, tensor bytes untouched, crash-safe, interoperable."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cryptotensors
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    Keys,
    assert_same_tensors,
    edit_header,
    load_upstream,
    make_keys,
    seeded_tensors,
    split_file,
    write_plain,
    write_upstream,
)

from ctfs.cli import main
from ctfs.errors import CtfsError, IntegrityError, UntrustedSigner
from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypted import EncryptedFile
from ctfs.files.rewrap import ALREADY_NEW, REWRAPPED, rewrap_file

OLD = make_keys(seed=0)  # enc1 / sign1
NEW = make_keys(seed=1, enc_kid="enc2", sign_kid="sign2")
POLICY = 'package model\nallow if { time.now_ns() > 0 }'
KILL_TIMEOUT = 120.0  # only keeps a stuck child from hanging the run

# Runs `ctfs` in a child that the kernel kills, as abruptly as kill -9, at the first write past argv[1]
# bytes of any file: a kill at a chosen byte of the output, whatever the machine's speed.
DRIVER = """\
import ctypes, resource, signal, sys
from ctfs.cli import main
limit = int(sys.argv[1])
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no core file
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it, which turns the kill into an exception
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
main(sys.argv[2:])
"""


def key_file(path: Path, keys: Keys) -> str:
    path.write_text(json.dumps({"keys": [keys.enc_jwk, keys.sign_jwk]}))
    path.chmod(0o600)
    return str(path)


def crypto_fields(path: Path) -> tuple[dict, dict, dict]:
    """(metadata, __crypto_keys__, __encryption__) of a file, parsed independently of ctfs."""
    metadata = split_file(path)[0]["__metadata__"]
    return metadata, json.loads(metadata["__crypto_keys__"]), json.loads(metadata["__encryption__"])


def opens_with(path: Path, keys: Keys) -> bool:
    try:
        with EncryptedFile(path, keys.store) as ef:
            ef.unwrap_all()
            ef.verify_all()
    except (IntegrityError, UntrustedSigner):
        return False
    return True


def decrypted(path: Path, keys: Keys, tmp_path: Path) -> bytes:
    out = tmp_path / f"plain-{random.random()}"
    decrypt_file(path, out, keys.store)
    return out.read_bytes()


# -- what a rewrap changes, and what it keeps ----------------------------------------------------------

@pytest.mark.parametrize("config", [{"version": "2", "chunk_size": 7}, {"version": "1"},
                                    {"version": "2", "tensors": ["weight", "ids"]}],
                         ids=["v2-chunk7", "v1", "partial"])
def test_rewrap_changes_only_the_keys_and_the_reference_library_reads_it(tmp_path, config):
    tensors = seeded_tensors()
    path = write_upstream(tmp_path / "m.safetensors", tensors, OLD, {"owner": "team-a", "__other__": "x"},
                          policy={"local": POLICY}, **config)
    before_meta, before_keys, before_enc = crypto_fields(path)
    before_data = split_file(path)[1]
    plain = decrypted(path, OLD, tmp_path)

    assert rewrap_file(path, OLD.store, NEW.store) == REWRAPPED

    after_meta, after_keys, after_enc = crypto_fields(path)
    assert split_file(path)[1] == before_data  # tensor bytes untouched
    for key in ("owner", "__other__", "__policy__"):
        assert after_meta[key] == before_meta[key]
    assert {k: after_keys[k] for k in ("version", "chunk_size") if k in after_keys} == \
           {k: before_keys[k] for k in ("version", "chunk_size") if k in before_keys}
    assert (after_keys["enc"]["kid"], after_keys["sign"]["kid"]) == ("enc2", "sign2")
    assert after_enc.keys() == before_enc.keys()
    for name, entry in after_enc.items():
        old = before_enc[name]
        assert entry["key_iv"] != old["key_iv"] and entry["wrapped_key"] != old["wrapped_key"]
        assert {k: v for k, v in entry.items() if not k.startswith(("wrapped", "key_"))} == \
               {k: v for k, v in old.items() if not k.startswith(("wrapped", "key_"))}

    assert decrypted(path, NEW, tmp_path) == plain
    assert_same_tensors(load_upstream(path, NEW), tensors)
    assert not opens_with(path, OLD)
    with pytest.raises(Exception, match="Verification"):
        load_upstream(path, OLD)


def test_a_file_rewrapped_by_the_reference_library_opens_in_ctfs(tmp_path):
    path = write_upstream(tmp_path / "m.safetensors", seeded_tensors(), OLD)
    plain = decrypted(path, OLD, tmp_path)
    cryptotensors.rewrap_file(str(path), NEW.config, old_config=OLD.config)
    assert decrypted(path, NEW, tmp_path) == plain
    assert not opens_with(path, OLD)


def test_rewrapping_twice_in_a_row_is_a_no_op_the_second_time(tmp_path):
    path = write_upstream(tmp_path / "m.safetensors", seeded_tensors(), OLD)
    rewrap_file(path, OLD.store, NEW.store)
    rewritten = path.read_bytes()
    assert rewrap_file(path, OLD.store, NEW.store) == ALREADY_NEW
    assert path.read_bytes() == rewritten


def test_changing_the_algorithm_is_refused_and_the_file_left_alone(tmp_path):
    path = write_upstream(tmp_path / "m.safetensors", seeded_tensors(), OLD)
    original = path.read_bytes()
    chacha = make_keys("chacha20poly1305", seed=2, enc_kid="enc2", sign_kid="sign2")
    with pytest.raises(CtfsError, match="algorithm mismatch: the file uses aes256gcm"):
        rewrap_file(path, OLD.store, chacha.store)
    assert path.read_bytes() == original


def test_a_file_the_old_keys_do_not_verify_is_not_rewrapped(tmp_path):
    path = write_upstream(tmp_path / "m.safetensors", seeded_tensors(), OLD)
    edit_header(path, lambda h: None, sign_with=make_keys(seed=66).seed)  # signed by someone else
    original = path.read_bytes()
    with pytest.raises(IntegrityError, match="signature"):
        rewrap_file(path, OLD.store, NEW.store)
    assert path.read_bytes() == original


def test_a_symlink_keeps_pointing_at_the_rewrapped_file_and_modes_are_kept(tmp_path):
    blob = write_upstream(tmp_path / "blob", seeded_tensors(), OLD)
    blob.chmod(0o640)
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob.name)
    rewrap_file(link, OLD.store, NEW.store)
    assert link.is_symlink() and opens_with(blob, NEW)
    assert blob.stat().st_mode & 0o777 == 0o640


# -- the command, on a model directory ------------------------------------------------------------------

def test_ctfs_rewrap_rotates_a_model_directory_and_a_second_run_resumes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for index in (1, 2):
        write_upstream(model / f"model-0000{index}-of-00002.safetensors", seeded_tensors(index), OLD)
    write_plain(model / "plain.safetensors", seeded_tensors(3))
    (model / "config.json").write_text("{}")
    (model / "alias.safetensors").symlink_to("model-00001-of-00002.safetensors")
    old, new = key_file(tmp_path / "old.jwk", OLD), key_file(tmp_path / "new.jwk", NEW)

    first = CliRunner().invoke(main, ["rewrap", str(model), "--keys", old, "--new-keys", new])
    assert first.exit_code == 0, first.output
    assert first.output.count(f": {REWRAPPED}") == 2 and "plain safetensors, skipped" in first.output
    assert "rewrapped 2 of 3 file(s)" in first.output
    assert all(opens_with(model / f"model-0000{i}-of-00002.safetensors", NEW) for i in (1, 2))
    assert (model / "alias.safetensors").is_symlink()

    again = CliRunner().invoke(main, ["rewrap", str(model), "--keys", old, "--new-keys", new])
    assert again.exit_code == 0, again.output
    assert again.output.count(ALREADY_NEW) == 2 and "rewrapped 0 of 3 file(s)" in again.output


def test_ctfs_rewrap_refuses_new_keys_without_a_signing_key_before_touching_anything(tmp_path):
    path = write_upstream(tmp_path / "m.safetensors", seeded_tensors(), OLD)
    original = path.read_bytes()
    enc_only = tmp_path / "new.jwk"
    enc_only.write_text(json.dumps(NEW.enc_jwk))
    enc_only.chmod(0o600)
    result = CliRunner().invoke(main, ["rewrap", str(path), "--keys", key_file(tmp_path / "o.jwk", OLD),
                                       "--new-keys", str(enc_only)])
    assert result.exit_code == 1 and "signing key" in result.output
    assert path.read_bytes() == original


# -- killed at every stage of the write --------------------------------------------------------------------

def few_megabytes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"embed": rng.standard_normal((2048, 1024)).astype(np.float32),  # 8 MiB
            "head": rng.standard_normal((256, 1024)).astype(np.float16), **seeded_tensors(7)}


def rewrap_killed_at(driver: Path, limit: int, path: Path, old: str, new: str) -> int:
    """`ctfs rewrap` in a child the kernel kills, by SIGXFSZ, when a write would take a file past `limit`
    bytes; its exit status."""
    proc = subprocess.run([sys.executable, str(driver), str(limit), "rewrap", str(path), "--keys", old,
                           "--new-keys", new], check=False, capture_output=True, timeout=KILL_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    return proc.returncode


def test_a_kill_at_any_byte_of_the_write_leaves_the_old_file_and_once_written_the_new_one(tmp_path):
    pristine = write_upstream(tmp_path / "pristine", few_megabytes(), OLD, None, chunk_size=256 * 1024)
    old, new = key_file(tmp_path / "old.jwk", OLD), key_file(tmp_path / "new.jwk", NEW)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # Where the rewrapped file's header ends and the file ends (the same for every rewrap of it).
    finished = shutil.copyfile(pristine, tmp_path / "finished")
    rewrap_file(finished, OLD.store, NEW.store)
    size = finished.stat().st_size
    header_end = size - len(split_file(finished)[1])
    work = tmp_path / "work"
    work.mkdir()
    target = work / "model.safetensors"

    for limit in (0, 1, header_end - 1, header_end, header_end + 1, (header_end + size) // 2, size - 1):
        shutil.copyfile(pristine, target)
        assert rewrap_killed_at(driver, limit, target, old, new) == -signal.SIGXFSZ, limit
        # The new file has no name until complete, so a kill mid-write leaves nothing beside the target.
        assert [p for p in work.iterdir() if p != target] == [], limit
        assert target.read_bytes() == pristine.read_bytes(), limit

    shutil.copyfile(pristine, target)
    assert rewrap_killed_at(driver, size, target, old, new) == 0  # the whole file fits: nothing kills it
    assert list(work.iterdir()) == [target]
    assert opens_with(target, NEW)
