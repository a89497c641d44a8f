"""The benchmarks run end to end at small sizes, so the README's figures stay reproducible. Their
figures are not checked here: timings belong to bench/, never to tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mounting import requires_fuse

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_format_bench_decrypts_to_the_original_and_prints_every_target(tmp_path):
    result = run_bench(str(BENCH / "format_bench.py"), "--size", "8M", "--tmpdir", str(tmp_path), timeout=300)
    # It prints PASS or FAIL beside each target and exits 0 either way: anything else is a crash.
    assert result.returncode == 0, result.stderr
    assert "decrypted file identical to the source: True" in result.stdout
    for line in ("ctfs encrypt_file >= 1.0x reference save", "ctfs decrypt_file >= 1.0x reference load",
                 "write+fsync only"):
        assert line in result.stdout
    assert list(tmp_path.iterdir()) == []  # its work directory is removed


@requires_fuse
def test_mount_bench_quick_measures_everything_and_leaves_nothing_mounted(tmp_path):
    workdir = tmp_path / "not" / "made" / "yet"  # the bench creates it
    # vLLM is left out: one engine start alone takes half a minute here (tests/vllm_client covers vLLM).
    profiles = tmp_path / "profiles"
    result = run_bench(str(BENCH / "mount_bench.py"), "--quick", "--workdir", str(workdir), "--vllm-python", "none",
                       "--profile", str(profiles), timeout=600)
    # A quick run's sizes are too small for the targets, so its verdicts are shown but do not set the exit
    # status: anything but 0 is a failure of the bench itself.
    assert result.returncode == 0, result.stderr
    for row in ("cold 1 MiB reads", "cold CPU s/GiB", "warm re-read: ctfs vs null daemon",
                "transformers load + forward, cold", "with --verify full", "decrypted / served bytes",
                "vLLM 'Loading weights', cold, strategy default", "vLLM 'Loading weights', cold, strategy prefetch",
                "daemon peak RSS", "1 parallel reader(s)", "2 parallel reader(s)",
                "load_file, null daemon vs plaintext page cache", "AES-256-GCM", "--model-pubkey (signed directory",
                "bytes decrypted (checks included)", "same, memory images", "a second transformers load",
                "same, disk null daemon (any FUSE mount's ceiling)", "held the GIL per GB served"):
        assert row in result.stdout, row
    assert sorted(p.name for p in profiles.iterdir()) == ["ctfs-readers-2-gil.txt", "ctfs-readers-2.svg"]
    assert "not measured (no vLLM venv)" in result.stdout
    assert "nan" not in result.stdout  # every figure was measured, the daemon's stats read
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert list(workdir.iterdir()) == []
