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
    result = run_bench(str(BENCH / "mount_bench.py"), "--quick", "--workdir", str(tmp_path), timeout=600)
    # A quick run's sizes are too small for the targets, so its verdicts are shown but do not set the exit
    # status: anything but 0 is a failure of the bench itself.
    assert result.returncode == 0, result.stderr
    for row in ("cold read, 1 MiB reads", "warm re-read", "load_file cold mount", "decrypted / served",
                "daemon peak RSS", "ceiling: null FUSE daemon (no disk, no crypto)",
                "ceiling: null FUSE daemon warm re-read"):
        assert row in result.stdout, row
    assert "n/a" not in result.stdout  # the daemon's stats were read
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert list(tmp_path.iterdir()) == []
